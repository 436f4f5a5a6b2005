"""Dovecot checkpassword program for the test world: asks the test identity provider whether a token is valid.

Dovecot runs this (through a small launcher written by `dovecot.py`) for every XOAUTH2/OAUTHBEARER login, with
`user NUL token NUL ...` on file descriptor 3 and the path of Dovecot's `checkpassword-reply` as the first
argument. The launcher sets EMAILPROXY_WORLD_CHECK_URL to the identity provider's plain-HTTP check endpoint.

Exit codes follow the checkpassword convention: on success exec the reply program; 1 means the credentials
were rejected; 111 means a temporary failure (for example the identity provider is not reachable).
Standard library only, imported lazily, because it runs once per login.
"""

from __future__ import annotations

import os
import sys

REJECTED = 1
TEMPORARY_FAILURE = 111
CHECK_URL_VARIABLE = "EMAILPROXY_WORLD_CHECK_URL"


def read_credentials(fd: int = 3) -> tuple[str, str]:
    """Read `user NUL password NUL ...` from `fd` (up to 64 KiB: tokens can be long)."""
    data = b""
    while len(data) < 65536:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    parts = data.split(b"\0")
    if len(parts) < 2:
        raise ValueError("malformed checkpassword input")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def _form_encode(fields: dict[str, str]) -> bytes:
    """application/x-www-form-urlencoded without importing urllib (it costs tens of milliseconds)."""
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
    parts = []
    for key, value in fields.items():
        encoded = "".join(chr(byte) if byte in safe else f"%{byte:02X}" for byte in value.encode())
        parts.append(f"{key}={encoded}")
    return "&".join(parts).encode()


def ask_identity_provider(url: str, user: str, token: str, service: str) -> int:
    """POST the credentials to the check endpoint; return the HTTP status (0 when unreachable).

    Uses the `_socket` C module and a hand-written HTTP/1.0 request: `http.client` and `socket` would add
    ~70 ms to every login.
    """
    import _socket

    address = url.removeprefix("http://")
    hostport, _, path = address.partition("/")
    host, _, port = hostport.rpartition(":")
    body = _form_encode({"user": user, "token": token, "service": service})
    request = (
        f"POST /{path} HTTP/1.0\r\nHost: {hostport}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect((host, int(port)))
        sock.sendall(request)
        response = b""
        while b"\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        status_line = response.split(b"\r\n", 1)[0].split(b" ")
        return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    except OSError:
        return 0
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    url = os.environ.get(CHECK_URL_VARIABLE, "")
    if not url or len(argv) < 2:
        print("checkpassword: no check URL or no reply program", file=sys.stderr)
        return TEMPORARY_FAILURE
    try:
        user, token = read_credentials()
    except (OSError, ValueError) as error:
        print(f"checkpassword: {error}", file=sys.stderr)
        return TEMPORARY_FAILURE
    status = ask_identity_provider(url, user, token, os.environ.get("SERVICE", ""))
    if status == 200:
        os.execv(argv[1], argv[1:])
    if status == 403:
        return REJECTED
    print(f"checkpassword: identity provider answered {status}", file=sys.stderr)
    return TEMPORARY_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv))
