"""The shared redirect listener: receives the authorization-code redirects of every account, and shows
a small page of pending authorisations.

One :class:`RedirectListener` holds the table of expected responses, keyed by ``state``, and serves it
on every address an account needs (``redirect_listen_address``, else the host and port of
``redirect_uri``). A request is an authorisation response only when its ``state`` is expected and its
path is the account's ``redirect_uri`` path (a trailing ``/`` does not matter, nor does the scheme); it
is then consumed. Anything else (a favicon, a probe, an unknown, forged or replayed ``state``) is
answered 404 or 400 and consumes nothing. ``GET /`` shows the authorisation page: plain HTML that
refreshes itself, no scripts, no external assets; it is served to loopback clients only unless
``allow_remote_page`` is set. Plain HTTP, one request per connection, small bounded reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from emailproxy.config import AccountConfig, Config
from emailproxy.oauth import flows
from emailproxy.oauth.authcode import (
    CALLBACK_FIELDS,
    Callback,
    CallbackError,
    normalised_path,
    parse_callback,
    query_fields,
    redirect_path,
)

logger = logging.getLogger("emailproxy.authorisation")

HEAD_LIMIT = 16 * 1024
READ_TIMEOUT = 10.0
PAGE_REFRESH_SECONDS = 5
DEFAULT_HTTP_PORT = 80

Address = tuple[str, int]


def listen_address(account: AccountConfig) -> Address | None:
    """Where this account's redirects arrive: ``redirect_listen_address``, else ``redirect_uri``'s
    host and port (port 80 when none is given, as the reference). None without a usable URL."""
    raw = account.redirect_listen_address or account.redirect_uri
    if not raw:
        return None
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return (parts.hostname or "localhost", port or DEFAULT_HTTP_PORT)


def redirect_addresses(config: Config) -> list[Address]:
    """The addresses to listen on for the authorization-code accounts of ``config`` (catch-all
    sections included when they are allowed), each once, in file order."""
    found: dict[Address, None] = {}
    for name in config.account_sections:
        if name.startswith("@") and not config.options.allow_catch_all_accounts:
            continue
        account = config.find_account("*" + name if name.startswith("@") else name)
        if account is None or flows.effective_flow(account) != flows.AUTHORIZATION_CODE:
            continue
        address = listen_address(account)
        if address is not None:
            found.setdefault((address[0].lower(), address[1]))
    return list(found)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- page data


@dataclasses.dataclass(frozen=True, slots=True)
class PendingView:
    """One pending authorisation as the page shows it: a link to open, or a code to enter."""

    username: str
    started: float
    link: str | None = None
    user_code: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ResultView:
    username: str
    ok: bool
    detail: str
    finished: float


@dataclasses.dataclass(frozen=True, slots=True)
class PageData:
    now: float
    pending: Sequence[PendingView] = ()
    results: Sequence[ResultView] = ()


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;width:100%}"
    "th,td{text-align:left;padding:.4em;border-bottom:1px solid #ccc;vertical-align:top}"
    "code{font-size:1.2em}.ok{color:#060}.failed{color:#a00}td a{word-break:break-all}"
)


def _document(title: str, body: str, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">' if refresh else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def render_page(data: PageData) -> str:
    """The authorisation page: pending authorisations (account, what to do, age) and recent results."""
    e = html.escape
    parts = ["<h1>emailproxy: authorisations</h1>", "<h2>Waiting for you</h2>"]
    if data.pending:
        parts.append("<table><tr><th>Account</th><th>What to do</th><th>Waiting for</th></tr>")
        for item in data.pending:
            if item.user_code is not None:
                link = item.link or ""
                code = e(item.user_code)
                todo = f'Visit <a href="{e(link)}">{e(link)}</a> and enter the code <code>{code}</code>'
            else:
                todo = f'<a href="{e(item.link or "")}">Sign in to authorise this account</a>'
            parts.append(
                f"<tr><td>{e(item.username)}</td><td>{todo}</td><td>{_age(data.now - item.started)}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append(
            "<p>No authorisation is pending. One starts when a mail client logs in to an account "
            "that has no valid token, or with <code>emailproxy authorize ACCOUNT</code>.</p>"
        )
    parts.append("<h2>Recent results</h2>")
    if data.results:
        parts.append("<table><tr><th>Account</th><th>Result</th><th>When</th></tr>")
        for result in data.results:
            css, word = ("ok", "authorised") if result.ok else ("failed", "failed")
            parts.append(
                f'<tr><td>{e(result.username)}</td><td class="{css}">{word}: {e(result.detail)}</td>'
                f"<td>{_age(data.now - result.finished)} ago</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>None yet.</p>")
    parts.append(f"<p><small>This page refreshes every {PAGE_REFRESH_SECONDS} s.</small></p>")
    return _document("emailproxy: authorisations", "".join(parts), refresh=True)


# ---------------------------------------------------------------------------------------------- routing


CallbackHandler = Callable[[Callback], None]


@dataclasses.dataclass(slots=True)
class _Expected:
    username: str
    path: str
    handler: CallbackHandler


@dataclasses.dataclass(frozen=True, slots=True)
class Routed:
    """What became of one request or pasted URL. ``status`` 200 means it was consumed."""

    status: int
    message: str
    username: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclasses.dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: str
    content_type: str = "text/html; charset=utf-8"

    _REASONS = {
        200: "OK",
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        431: "Request Header Fields Too Large",
    }

    def encode(self, include_body: bool = True) -> bytes:
        body = self.body.encode("utf-8")
        head = [
            f"HTTP/1.1 {self.status} {self._REASONS.get(self.status, 'Error')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Referrer-Policy: no-referrer",
            "X-Frame-Options: DENY",
            "X-Content-Type-Options: nosniff",
            "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'",
            "Connection: close",
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if include_body else b"")


def _message_page(status: int, title: str, message: str) -> HttpResponse:
    body = f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
    return HttpResponse(status, _document(title, body))


def _host_of(header: str | None) -> str | None:
    if not header:
        return None
    try:
        return urlsplit("//" + header.strip()).hostname
    except ValueError:
        return None


class RedirectListener:
    """Expected authorisation responses by ``state``, served over HTTP on any number of addresses."""

    def __init__(
        self,
        *,
        allow_remote_page: bool = False,
        page_source: Callable[[], PageData] | None = None,
    ) -> None:
        self.allow_remote_page = allow_remote_page
        #: gives the page's content (the broker sets it)
        self.page_source = page_source
        self._expected: dict[str, _Expected] = {}
        self._servers: dict[Address, list[asyncio.Server]] = {}
        self._binding: dict[Address, asyncio.Lock] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        #: addresses that could not be bound (tried again when asked, but reported once)
        self._failed: set[Address] = set()

    def __repr__(self) -> str:
        return f"RedirectListener(addresses={self.addresses}, expected={len(self._expected)})"

    # ------------------------------------------------------------------------------------ expectations

    def expect(self, state: str, redirect_uri: str, username: str, handler: CallbackHandler) -> None:
        """Route the response carrying ``state`` (on ``redirect_uri``'s path) to ``handler``, once."""
        self._expected[state] = _Expected(username, redirect_path(redirect_uri), handler)

    def forget(self, state: str) -> None:
        self._expected.pop(state, None)

    @property
    def expected_count(self) -> int:
        return len(self._expected)

    def route(self, path: str, query: str) -> Routed:
        """Deliver an authorisation response. ``path`` "" (a pasted query string) skips the path check."""
        try:
            callback = parse_callback(query)
        except CallbackError as exc:
            return Routed(400, f"This is not an authorisation response: {exc}.")
        expected = self._expected.get(callback.state)
        if expected is None:
            return Routed(
                400,
                "This authorisation response is not expected: its state is unknown or was already used. "
                "Start again by logging in with your mail client.",
            )
        if path and normalised_path(path) != expected.path:
            return Routed(404, "Not found.")
        del self._expected[callback.state]
        expected.handler(callback)
        if callback.error is not None:
            return Routed(
                200,
                f"The sign-in for account {expected.username} was refused ({callback.error}). "
                "Log in with your mail client to start again.",
                expected.username,
            )
        return Routed(
            200,
            f"Authorisation received for account {expected.username}. The proxy is now fetching its "
            "tokens; you can close this window.",
            expected.username,
        )

    # ------------------------------------------------------------------------------------ HTTP

    def page_allowed(self, host_header: str | None, peer: str | None) -> bool:
        """The page lists sign-in links: loopback clients only (by address and Host), unless allowed."""
        if self.allow_remote_page:
            return True
        host = _host_of(host_header)
        return is_loopback(peer) and (host_header is None or is_loopback(host))

    def respond(self, method: str, target: str, host_header: str | None, peer: str | None) -> HttpResponse:
        """The answer to one request (pure apart from consuming a matching expectation)."""
        if method not in ("GET", "HEAD"):
            return _message_page(405, "Method not allowed", "Only GET is supported here.")
        try:
            parts = urlsplit(target)
            fields = query_fields(parts.query)
        except (ValueError, CallbackError):
            return _message_page(400, "Bad request", "The request target cannot be parsed.")
        path = parts.path or "/"
        if CALLBACK_FIELDS & fields.keys():
            routed = self.route(path, parts.query)
            if routed.status == 404:
                return _message_page(404, "Not found", routed.message)
            title = "Authorisation received" if routed.accepted else "Authorisation response refused"
            if routed.accepted:
                logger.info(
                    "Redirect listener: received the authorisation response of account %s", routed.username
                )
            else:
                logger.info(
                    "Redirect listener: refused a request for %r (HTTP %d)", path[:100], routed.status
                )
            return _message_page(routed.status, title, routed.message)
        if normalised_path(path) == "/":
            if not self.page_allowed(host_header, peer):
                return _message_page(
                    403, "Forbidden", "The authorisation page is only shown to clients on this machine."
                )
            if self.page_source is None:
                return HttpResponse(200, render_page(PageData(now=0.0)))
            return HttpResponse(200, render_page(self.page_source()))
        return _message_page(404, "Not found", "Nothing here.")

    def _answer(self, head: bytes, peer: str | None) -> tuple[HttpResponse, str]:
        lines = head.decode("latin-1").split("\r\n")
        words = lines[0].split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return _message_page(400, "Bad request", "Malformed request line."), "GET"
        method, target = words[0], words[1]
        host = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip()
        return self.respond(method, target, host, peer), method

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                response, method = _message_page(431, "Request too large", "The request is too large."), "GET"
            else:
                response, method = self._answer(head, peer)
            writer.write(response.encode(include_body=method != "HEAD"))
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # ------------------------------------------------------------------------------------ sockets

    @property
    def addresses(self) -> list[Address]:
        """The socket addresses being served (real ports, also when port 0 was asked for)."""
        bound: list[Address] = []
        for servers in self._servers.values():
            for server in servers:
                for sock in server.sockets:
                    name = sock.getsockname()
                    bound.append((str(name[0]), int(name[1])))
        return bound

    def serves(self, address: Address) -> bool:
        return (address[0].lower(), address[1]) in self._servers

    async def ensure(self, address: Address) -> bool:
        """Listen on ``address`` unless already done. Logs and returns False when it cannot."""
        key = (address[0].lower(), address[1])
        lock = self._binding.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._servers:
                return True
            servers = await self._bind(*address, quiet=key in self._failed)
            if not servers:
                self._failed.add(key)
                return False
            self._failed.discard(key)
            self._servers[key] = servers
        return True

    async def _bind(self, host: str, port: int, quiet: bool = False) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        level = logging.DEBUG if quiet else logging.ERROR
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            logger.log(level, "Cannot listen for authorisation redirects on %s:%d: %s", host, port, exc)
            return []
        servers: list[asyncio.Server] = []
        problems: list[str] = []
        for ip in dict.fromkeys(str(info[4][0]) for info in infos):
            try:
                servers.append(await asyncio.start_server(self._serve_client, ip, port, limit=HEAD_LIMIT))
            except OSError as exc:
                problems.append(f"{ip}: {exc.strerror or exc}")
            if port == 0 and servers:
                break  # port 0 gives each address its own port; one is enough
        if not servers:
            logger.log(
                level,
                "Cannot listen for authorisation redirects on %s:%d (%s); set redirect_listen_address to "
                "a free local address and port",
                host,
                port,
                "; ".join(problems),
            )
            return []
        bound = sorted({f"{sock.getsockname()[0]}" for server in servers for sock in server.sockets})
        actual = int(servers[0].sockets[0].getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        logger.info(
            "Listening for authorisation redirects on %s port %d (%s); authorisation page: http://%s:%d/",
            host,
            actual,
            ", ".join(bound),
            shown,
            actual,
        )
        if problems:
            logger.debug("Redirect listener: some addresses of %s were not usable: %s", host, problems)
        return servers

    async def close(self) -> None:
        servers = [server for group in self._servers.values() for server in group]
        self._servers.clear()
        for server in servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in servers:
            await server.wait_closed()
        self._expected.clear()
