"""SASL encodings: decode PLAIN and LOGIN from the client, encode XOAUTH2 and OAUTHBEARER for the server."""

from __future__ import annotations

import base64
import binascii

from emailproxy.secret import Secret


class SaslError(ValueError):
    """The client's SASL data could not be decoded."""


def b64decode_strict(data: bytes | str) -> bytes:
    """Standard base64, padding required; whitespace around is ignored."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    data = data.strip()
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SaslError("invalid base64") from e


def b64encode(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


def decode_plain(initial_response: bytes | str) -> tuple[str, Secret]:
    """RFC 4616 PLAIN: ``authzid NUL authcid NUL passwd``, base64. Returns (authcid, password)."""
    raw = b64decode_strict(initial_response)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response must have three NUL-separated fields")
    try:
        username = parts[1].decode("utf-8")
        password = parts[2].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaslError("PLAIN response is not UTF-8") from e
    if not username and parts[0]:
        username = parts[0].decode("utf-8", "replace")
    return username, Secret(password)


def decode_text(response: bytes | str) -> str:
    """One base64 value (the LOGIN mechanism's user name or password)."""
    try:
        return b64decode_strict(response).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaslError("response is not UTF-8") from e


def is_cancel(line: bytes) -> bool:
    """``*`` alone on a line cancels a SASL exchange (RFC 4422 section 3.5)."""
    return line.strip() == b"*"


def xoauth2(username: str, token: Secret) -> bytes:
    """The base64 XOAUTH2 initial response: ``user=U^Aauth=Bearer T^A^A``."""
    return b64encode(f"user={username}\x01auth=Bearer {token.reveal()}\x01\x01")


def oauthbearer(username: str, token: Secret, host: str = "", port: int = 0) -> bytes:
    """The base64 OAUTHBEARER (RFC 7628) initial response."""
    authzid = username.replace("=", "=3D").replace(",", "=2C")
    fields = f"n,a={authzid},\x01"
    if host:
        fields += f"host={host}\x01"
    if port:
        fields += f"port={port}\x01"
    fields += f"auth=Bearer {token.reveal()}\x01\x01"
    return b64encode(fields)
