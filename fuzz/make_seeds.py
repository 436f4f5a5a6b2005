"""Write the seed corpus in fuzz/corpus/<harness>/ from the readable transcripts below.

Run ``python -m fuzz.make_seeds`` after changing a transcript (the seeds are committed; the smoke test
tests/test_fuzz_smoke.py plays every seed through its harness, and checks a few reach their goal).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from fuzz.session_driver import (
    CLIENT,
    COMPLETION,
    SERVER,
    TLS_CLIENT,
    TLS_SERVER,
    TOKEN_FAILURE,
    TOKEN_OK,
    Event,
    encode,
    options_byte,
)

CORPUS = Path(__file__).parent / "corpus"


def c(data: bytes) -> Event:
    return (CLIENT, data)


def s(data: bytes) -> Event:
    return (SERVER, data)


OK, FAIL = (COMPLETION, TOKEN_OK), (COMPLETION, TOKEN_FAILURE)
TLS_C, TLS_S = (COMPLETION, TLS_CLIENT), (COMPLETION, TLS_SERVER)
PLAIN = base64.b64encode(b"\0user@example.com\0Pw!secret#1")
CHALLENGE = b"eyJzdGF0dXMiOiI0MDAifQ=="
DEFAULT = options_byte()
SMALL = options_byte(max_line=64, max_buffer=128, max_literal=8)

SESSIONS: dict[str, list[tuple[int, list[Event]]]] = {
    "imap": [
        (DEFAULT, [s(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 LOGINDISABLED] hi\r\n"),
                   c(b"a1 CAPABILITY\r\n"), s(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\na1 OK\r\n"),
                   c(b"a2 LOGIN user@example.com Pw!secret#1\r\na3 SELECT INBOX\r\n"), OK,
                   s(b"a2 OK logged in\r\n* 1 EXISTS\r\n")]),
        (DEFAULT, [s(b"* OK hi\r\n"), c(b'a LOGIN {16}\r\nuser@example.com "Pw!\\"q#1"\r\n'), FAIL,
                   c(b"b LOGIN {4+}\r\nuser {11}\r\nPw!secret#1\r\n"), OK, s(b"+ \r\n"),
                   s(b"+ " + CHALLENGE + b"\r\nb NO [AUTHENTICATIONFAILED] no\r\n")]),
        (DEFAULT, [s(b"* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] hi\r\n"),
                   c(b"t AUTHENTICATE PLAIN\r\n"), c(PLAIN + b"\r\n"), OK, s(b"+ \r\nt OK done\r\n")]),
        (DEFAULT, [s(b"* OK hi\r\n"), c(b'x ID ("n" {3+}\r\nabc)\r\n'), s(b"+ go\r\n* ID NIL\r\nx OK\r\n"),
                   c(b"y AUTHENTICATE CRAM-MD5\r\n"), s(b"+ PDE+\r\n"), c(b"dXNlcg==\r\n"), s(b"y OK\r\n")]),
        (options_byte(server_starttls=True, local_starttls=True),
         [s(b"* OK ready\r\n"), s(b"* CAPABILITY IMAP4rev1 STARTTLS\r\nEP0 OK\r\n"),
          s(b"EP1 OK go\r\n"), TLS_S,
          s(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nEP2 OK\r\n"), c(b"s STARTTLS\r\nz NOOP\r\n"), TLS_C,
          c(b"a AUTHENTICATE PLAIN " + PLAIN + b"\r\n"), OK, s(b"a OK\r\n")]),
        (SMALL, [s(b"* OK hi\r\n"), c(b"a LOGIN {9}\r\n"), c(b"a NOOP\r\n" * 30), s(b"x" * 200)]),
        (DEFAULT, [s(b"* PREAUTH welcome\r\n"), c(b"a SELECT INBOX\r\n")]),
        (DEFAULT, [c(b"a NOOP\r\n"), s(b"* BYE too busy\r\n")]),
        (options_byte(server_starttls=True),
         [s(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"), s(b"EP1 OK\r\n"), TLS_S, s(b"EP2 OK\r\n"),
          c(b"a AUTHENTICATE PLAIN\r\n*\r\nb LOGIN {99999+}\r\n")]),
        (options_byte(server_starttls=True), [s(b"* PREAUTH hi\r\n")]),
    ],
    "pop": [
        (DEFAULT, [s(b"+OK POP3 ready\r\n"), c(b"CAPA\r\n"),
                   s(b"+OK\r\nTOP\r\nSASL PLAIN XOAUTH2\r\nSTLS\r\n.\r\n"),
                   c(b"USER user@example.com\r\nPASS Pw!secret#1\r\nSTAT\r\n"), OK, s(b"+ \r\n"),
                   s(b"+OK Logged in.\r\n+OK 1 2\r\n")]),
        (DEFAULT, [s(b"+OK hi\r\n"), c(b"AUTH PLAIN\r\n" + PLAIN + b"\r\n"), OK,
                   s(b"-ERR unknown\r\n+ \r\n+ " + CHALLENGE + b"\r\n-ERR failed\r\n"),
                   c(b"AUTH\r\nAPOP a b\r\n")]),
        (DEFAULT, [s(b"+OK hi\r\n"), c(b"LIST\r\nPASS x\r\nUSER u\r\nNOOP\r\nPASS y\r\n"),
                   s(b"+OK\r\n1 20\r\n..x\r\n.\r\n+OK\r\n"), c(b"AUTH PLAIN " + PLAIN + b"\r\n"), FAIL]),
        (options_byte(server_starttls=True, local_starttls=True),
         [s(b"+OK hi\r\n"), s(b"+OK go\r\n"), TLS_S, c(b"STLS\r\nUSER injected\r\n"), TLS_C,
          c(b"USER u\r\nPASS Pw!secret#1\r\n"), OK, s(b"+ \r\n+OK\r\n")]),
        (SMALL, [s(b"+OK hi\r\n"), c(b"RETR 1\r\n" * 40), s(b"y" * 100)]),
        (options_byte(local_starttls=True),
         [s(b"+OK hi\r\n"), c(b"CAPA\r\n"), s(b"+OK\r\nSTLS\r\nSTLS\r\n.\r\n"), c(b"CAPA\r\n"),
          s(b"+OK\r\n.\r\n"), c(b"AUTH PLAIN\r\n*\r\n")]),
    ],
    "smtp": [
        (DEFAULT, [s(b"220-mx.example.com ESMTP\r\n220 ready\r\n"), c(b"EHLO client\r\n"),
                   s(b"250-mx.example.com\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n"
                     b"250-STARTTLS\r\n250 8BITMIME\r\n"),
                   c(b"AUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a@example.com>\r\n"), OK, s(b"334 \r\n"),
                   s(b"235 2.7.0 Accepted\r\n250 ok\r\n")]),
        (DEFAULT, [s(b"220 hi\r\n"), c(b"AUTH LOGIN\r\n"), c(b"EHLO x\r\n"),
                   s(b"250 AUTH=LOGIN OAUTHBEARER\r\n"),
                   c(b"AUTH LOGIN dXNlcg==\r\n"), c(base64.b64encode(b"Pw!secret#1") + b"\r\n"), OK,
                   s(b"334 " + CHALLENGE + b"\r\n535 5.7.8 no\r\n"), c(b"AUTH PLAIN\r\n*\r\n")]),
        (DEFAULT, [s(b"220 hi\r\n"), c(b"HELO x\r\nMAIL FROM:<a@b>\r\nDATA\r\n"),
                   s(b"250 ok\r\n250 ok\r\n354 go\r\n"),
                   c(b"Subject: x\r\n\r\n..hi\r\n.\r\nBDAT 5 LAST\r\n12345"),
                   s(b"250 queued\r\n250 ok\r\n")]),
        (options_byte(server_starttls=True, local_starttls=True),
         [s(b"220 hi\r\n"), s(b"250-x\r\n250 STARTTLS\r\n"), s(b"220 go\r\n"), TLS_S,
          c(b"EHLO c\r\n"), s(b"250-x\r\n250 AUTH PLAIN\r\n"), c(b"STARTTLS\r\nRSET\r\n"), TLS_C,
          c(b"EHLO c\r\n"), s(b"250 ok\r\n"), c(b"AUTH PLAIN " + PLAIN + b"\r\n"), FAIL]),
        (SMALL, [s(b"220 hi\r\n"), c(b"NOOP\r\n" * 40), s(b"250-" + b"y" * 40 + b"\r\n") ]),
    ],
}  # fmt: skip

SYNTAX = [
    b"\x00a LOGIN {16}\r\nuser@example.com {11+}\r\nPw!secret#1\r\n",
    b'\x02a LOGIN "user" "p\\\\w\\"d"\r\n',
    b"\x12* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 LOGINDISABLED STARTTLS] hi\r\n",
    b"\x06* CAPABILITY IMAP4rev1 auth=plain sasl-ir\r\nEP0 OK\r\n",
    b"\x0a* 1 FETCH (BODY[] {12}\r\nhello\r\nworld)\r\n",
    b"\x01" + b"x" * 80 + b"\r\n",
    b"\x0ba NO [AUTHENTICATIONFAILED] nope\r\n+ eyJzIjoxfQ==\r\n",
    b"\x00a LOGIN user pass word\r\nb LOGIN {99999999999999999999}\r\n",
]

SASL = [
    PLAIN,
    base64.b64encode(b"admin\0\0Pw!x"),
    base64.b64encode("\0usér\0pässword".encode()),
    b"*",
    b"=",
    b"dXNlcg==",
    b"not base64!",
    CHALLENGE,
    b"n,a=us=2Cer=3D,\x01auth=Bearer t\x01\x01",
]


def write(name: str, seeds: list[bytes]) -> None:
    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    for seed in seeds:
        (folder / f"seed-{hashlib.sha1(seed).hexdigest()[:12]}").write_bytes(seed)  # noqa: S324


def main() -> None:
    for name, transcripts in SESSIONS.items():
        write(name, [encode(options, events) for options, events in transcripts])
    write("imapsyntax", SYNTAX)
    write("sasl", SASL)


if __name__ == "__main__":
    main()
