"""Coverage-guided fuzzing of the SASL decoders and encoders (emailproxy/protocols/sasl.py) and of the
server error-challenge decoder (line_session.describe_error_challenge).

The whole input is offered to every decoder, as bytes and as text. Checks:

- b64decode_strict, decode_plain and decode_text return or raise SaslError, nothing else, and agree
  with the standard library's strict base64 decoding; decode_plain returns the authcid and password
  of an ``authzid NUL authcid NUL password`` message (the authzid when the authcid is empty);
- is_cancel is true exactly for a lone ``*``; describe_error_challenge never raises;
- encoding then decoding round-trips: PLAIN for a user name and password cut from the input, and the
  XOAUTH2 / OAUTHBEARER blobs carry the user name (OAUTHBEARER's escaped as RFC 7628 says) and token.

Run by hand (fuzz/README.md): ``python -m fuzz.fuzz_sasl CORPUS -max_total_time=240``.
"""

from __future__ import annotations

import base64
import binascii

from emailproxy.protocols import sasl
from emailproxy.protocols.line_session import describe_error_challenge
from emailproxy.secret import Secret


def strict(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def check_decoders(data: bytes) -> None:
    expected = strict(data)
    try:
        assert sasl.b64decode_strict(data) == expected
    except sasl.SaslError:
        assert expected is None
    text = data.decode("latin-1")
    try:
        sasl.b64decode_strict(text)
    except sasl.SaslError:
        pass
    try:
        username, password = sasl.decode_plain(data)
    except sasl.SaslError:
        pass
    else:
        assert expected is not None
        authzid, authcid, passwd = expected.split(b"\0")
        assert password.reveal() == passwd.decode("utf-8")
        assert username == (authcid.decode("utf-8") or authzid.decode("utf-8", "replace"))
    try:
        value = sasl.decode_text(data)
    except sasl.SaslError:
        pass
    else:
        assert expected is not None and value == expected.decode("utf-8")
    assert sasl.is_cancel(data) == (data.strip() == b"*")
    assert isinstance(describe_error_challenge(data), str)


def check_round_trips(data: bytes) -> None:
    text = data.decode("utf-8", "replace").replace("\0", "").replace("\x01", "")  # both are separators
    cut = len(text) // 2
    user, secret = text[:cut], text[cut:]
    assert sasl.decode_plain(sasl.b64encode(f"\0{user}\0{secret}")) == (user, Secret(secret))
    token = Secret(secret)
    xoauth2 = base64.b64decode(sasl.xoauth2(user, token)).decode("utf-8")
    assert xoauth2 == f"user={user}\x01auth=Bearer {token.reveal()}\x01\x01"
    bearer = base64.b64decode(sasl.oauthbearer(user, token)).decode("utf-8")
    gs2, _, rest = bearer.partition("\x01")
    assert gs2.startswith("n,a=") and gs2.endswith(",") and rest == f"auth=Bearer {token.reveal()}\x01\x01"
    authzid = gs2[4:-1]
    assert "," not in authzid
    assert authzid.replace("=2C", ",").replace("=3D", "=") == user


def test_one_input(data: bytes) -> None:
    check_decoders(data)
    check_round_trips(data)


if __name__ == "__main__":
    from fuzz.atheris_runner import fuzz

    fuzz(test_one_input)
