"""``check --online``: connect to each upstream server and token endpoint as configured; explain the result.

Servers are reached exactly as the proxy reaches them: implicit TLS, or a plain-text greeting followed by
STARTTLS, with the proxy's TLS settings (``SSL_CERT_FILE`` is honoured). What a probe saw is kept in a
:class:`ServerProbe` or :class:`TokenProbe`; the ``*_findings`` functions turn those into findings and are
pure. Token endpoints get a client-credentials request without any secret: a real endpoint answers with an
OAuth error, which proves it is reachable (and, for Microsoft, says whether the tenant and client exist).
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from urllib.parse import urlsplit

from emailproxy.checks import ERROR, OK, WARNING, Finding, all_accounts
from emailproxy.config import Config, ServerConfig
from emailproxy.oauth.endpoint import TokenEndpoint, TokenEndpointError, TokenNetworkError
from emailproxy.tls import upstream_context

#: how long a server configured for STARTTLS may take to send its plain-text greeting
GREETING_WAIT = 5.0
_MAX_LINE = 8192
_SHOWN = 100  # characters of a server's greeting shown in a finding


@dataclass(frozen=True, slots=True)
class ServerProbe:
    """What connecting to one upstream server as configured showed (filled in by ``check --online``)."""

    address: str
    port: int
    starttls: bool  # as configured: plain greeting then STARTTLS (True) or implicit TLS (False)
    connect_error: str | None = None
    certificate_error: str | None = None
    tls_error: str | None = None
    tls_version: str | None = None
    greeting: str | None = None
    #: implicit TLS configured: the server sent this plain-text greeting instead of a TLS handshake
    plain_greeting: str | None = None
    #: STARTTLS configured: no plain-text greeting came, but a TLS handshake worked
    implicit_tls_works: bool = False
    #: STARTTLS configured: the server did not offer or refused STARTTLS (its reply)
    starttls_refused: str | None = None
    #: SASL mechanisms offered over TLS (None when they could not be read)
    mechanisms: tuple[str, ...] | None = None


_GREETINGS = {"IMAP": "* OK", "POP": "+OK", "SMTP": "220"}
_TLS_PORT = {"IMAP": 993, "POP": 995, "SMTP": 465}


def server_probe_findings(server: ServerConfig, probe: ServerProbe) -> list[Finding]:
    name = server.section
    where = f"{probe.address}:{probe.port}"
    if probe.connect_error is not None:
        return [
            Finding(
                ERROR,
                name,
                "server_address",
                f"cannot connect to {where}: {probe.connect_error}",
                "check server_address, server_port and the firewall",
            )
        ]
    if probe.certificate_error is not None:
        return [
            Finding(
                ERROR,
                name,
                "server_address",
                f"the certificate of {where} is not accepted: {probe.certificate_error}",
                "server_address must be a name in the server's certificate; a private CA can be trusted "
                "with SSL_CERT_FILE",
            )
        ]
    if probe.plain_greeting is not None:
        return [
            Finding(
                ERROR,
                name,
                "server_starttls",
                f"{where} answered with a plain-text greeting ('{probe.plain_greeting}') instead of TLS: "
                "this port starts in plain text and upgrades with STARTTLS",
                "set server_starttls = True (or use the implicit-TLS port, usually "
                f"{_TLS_PORT[server.protocol]})",
            )
        ]
    if probe.implicit_tls_works:
        return [
            Finding(
                ERROR,
                name,
                "server_starttls",
                f"{where} sent no plain-text greeting but accepted a TLS handshake: this port uses "
                "implicit TLS",
                "set server_starttls = False (or remove it)",
            )
        ]
    if probe.starttls_refused is not None:
        return [
            Finding(
                ERROR,
                name,
                "server_starttls",
                f"{where} does not offer STARTTLS ({probe.starttls_refused}); the proxy never sends a token "
                "in clear, so logins will fail",
                "use the server's implicit-TLS port with server_starttls = False",
            )
        ]
    if probe.tls_error is not None:
        return [Finding(ERROR, name, None, f"no TLS session with {where}: {probe.tls_error}")]
    found: list[Finding] = []
    expected = _GREETINGS[server.protocol]
    if probe.greeting is not None and not probe.greeting.upper().startswith(expected):
        found.append(
            Finding(
                WARNING,
                name,
                "server_port",
                f"the greeting from {where} ('{probe.greeting}') does not look like {server.protocol}",
                "check that server_port is the server's " + server.protocol + " port",
            )
        )
    oauth = [m for m in probe.mechanisms or () if m.upper() in ("XOAUTH2", "OAUTHBEARER")]
    if probe.mechanisms is not None and not oauth:
        offered = ", ".join(probe.mechanisms) or "none"
        found.append(
            Finding(
                WARNING,
                name,
                None,
                f"{where} does not offer XOAUTH2 or OAUTHBEARER (it offers: {offered}), so the token cannot "
                "be used",
                "check that OAuth logins are enabled for this server or mailbox",
            )
        )
    if not found:
        how = "STARTTLS" if probe.starttls else "implicit TLS"
        details = f"{how}, {probe.tls_version}" if probe.tls_version else how
        offers = f"; offers {' and '.join(oauth)}" if oauth else ""
        greeting = f"; greeting '{probe.greeting}'" if probe.greeting else ""
        found.append(Finding(OK, name, None, f"{where} reachable ({details}){greeting}{offers}"))
    return found


@dataclass(frozen=True, slots=True)
class TokenProbe:
    """What a token request without credentials got back (filled in by ``check --online``)."""

    url: str
    network_error: str | None = None
    status: int | None = None
    error: str | None = None  # the OAuth error code, or ``http_<status>`` when the body was not one
    description: str | None = None


_AADSTS_RE = re.compile(r"AADSTS(\d+)")
#: Microsoft error codes that mean the configuration is wrong even though the endpoint answered
_AADSTS_PROBLEMS = {
    "90002": ("the tenant in token_url does not exist", "token_url"),
    "900023": ("the tenant in token_url is not a valid tenant ID or domain", "token_url"),
    "700016": ("the endpoint does not know this client_id (in this tenant)", "client_id"),
    "90014": ("the endpoint expected a client_id", "client_id"),
}


def token_probe_findings(section: str, probe: TokenProbe) -> list[Finding]:
    host = urlsplit(probe.url).netloc or probe.url
    if probe.network_error is not None:
        return [
            Finding(
                ERROR,
                section,
                "token_url",
                f"cannot reach the token endpoint: {probe.network_error}",
                "check the address, DNS, the firewall and any HTTPS proxy (HTTPS_PROXY)",
            )
        ]
    answer = f"HTTP {probe.status}"
    if probe.error is None:
        return [
            Finding(OK, section, "token_url", f"{host} answered a request without credentials ({answer})")
        ]
    if probe.error.startswith("http_"):
        return [
            Finding(
                WARNING,
                section,
                "token_url",
                f"{host} answered {answer} without an OAuth error: this does not look like a token endpoint",
                "check the path of token_url (Microsoft: .../oauth2/v2.0/token)",
            )
        ]
    described = f"{answer} {probe.error}" + (f": {probe.description}" if probe.description else "")
    code = _AADSTS_RE.search(probe.description or "")
    if code is not None and code.group(1) in _AADSTS_PROBLEMS:
        message, key = _AADSTS_PROBLEMS[code.group(1)]
        return [Finding(ERROR, section, key, f"{message} ({described})")]
    return [
        Finding(
            OK,
            section,
            "token_url",
            f"token endpoint {host} reachable; a request without credentials got the expected OAuth error "
            f"({described})",
        )
    ]


# ------------------------------------------------------------------------------------------ probing


def online_findings(config: Config, timeout: float) -> list[Finding]:
    """Probe every server and token endpoint (in parallel); findings in configuration order."""
    jobs: list[Callable[[], list[Finding]]] = [
        partial(_server_job, server, timeout) for server in config.servers
    ]
    seen: set[tuple[str, str | None]] = set()
    for account in all_accounts(config):
        if not account.token_url or (account.token_url, account.client_id) in seen:
            continue
        seen.add((account.token_url, account.client_id))
        jobs.append(partial(_token_job, account.section, account.token_url, account.client_id, timeout))
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    return [finding for result in results for finding in result]


def _server_job(server: ServerConfig, timeout: float) -> list[Finding]:
    return server_probe_findings(server, probe_server(server, timeout))


def _token_job(section: str, url: str, client_id: str | None, timeout: float) -> list[Finding]:
    return token_probe_findings(section, probe_token_endpoint(url, client_id, timeout))


def probe_token_endpoint(url: str, client_id: str | None, timeout: float) -> TokenProbe:
    """POST a client-credentials request without a secret: a real endpoint answers with an OAuth error."""
    form = {"grant_type": "client_credentials"}
    if client_id:
        form["client_id"] = client_id
    endpoint = TokenEndpoint(timeout=timeout)
    try:
        endpoint.post(url, form)
    except TokenNetworkError as error:
        return TokenProbe(url, network_error=str(error))
    except TokenEndpointError as error:
        return TokenProbe(url, status=error.status, error=error.error, description=error.description)
    finally:
        endpoint.close()
    return TokenProbe(url, status=200)


class _Lines:
    """Line reading over a (TLS or plain) socket, for the few commands a probe sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def readline(self) -> str:
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                break
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")


def _shown(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _read_greeting(lines: _Lines, protocol: str) -> str:
    first = line = lines.readline()
    while protocol == "SMTP" and len(line) > 3 and line[3] == "-":
        line = lines.readline()
    return first


def _smtp_reply(lines: _Lines) -> list[str]:
    replies = [lines.readline()]
    while len(replies[-1]) > 3 and replies[-1][3] == "-":
        replies.append(lines.readline())
    return replies


def _capabilities(lines: _Lines, protocol: str, greeting: str) -> list[str]:
    """The server's capability words (IMAP CAPABILITY, POP CAPA lines, SMTP EHLO keywords), upper case."""
    if protocol == "IMAP":
        if "[CAPABILITY " in greeting.upper():
            text = greeting.upper().split("[CAPABILITY ", 1)[1].split("]", 1)[0]
            return text.split()
        lines.send("c1 CAPABILITY")
        words: list[str] = []
        while not (line := lines.readline()).lower().startswith("c1 "):
            if line.upper().startswith("* CAPABILITY "):
                words += line.upper().split()[2:]
        return words
    if protocol == "POP":
        lines.send("CAPA")
        if not lines.readline().startswith("+OK"):
            return []
        words = []
        while (line := lines.readline()) != ".":
            words.append(line.upper())
        return words
    lines.send("EHLO emailproxy-check")
    return [reply[4:].upper() for reply in _smtp_reply(lines) if reply.startswith("250")]


def _mechanisms(protocol: str, capabilities: list[str]) -> tuple[str, ...]:
    if protocol == "IMAP":
        return tuple(word[5:] for word in capabilities if word.startswith("AUTH="))
    mechanisms: list[str] = []
    for line in capabilities:
        words = line.replace("=", " ").split()
        if words and words[0] == ("SASL" if protocol == "POP" else "AUTH"):
            mechanisms += words[1:]
    return tuple(mechanisms)


def _offers_starttls(protocol: str, capabilities: list[str]) -> bool:
    word = "STLS" if protocol == "POP" else "STARTTLS"
    return any(line.split()[:1] == [word] for line in capabilities)


def _quit(lines: _Lines, protocol: str) -> None:
    try:
        lines.send("z LOGOUT" if protocol == "IMAP" else "QUIT")
    except OSError:
        pass


def probe_server(server: ServerConfig, timeout: float) -> ServerProbe:
    """Connect as the proxy would and describe what happened (never raises for network problems)."""
    address, port = server.server_address, server.server_port
    base = ServerProbe(address, port, server.server_starttls)
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as error:
        return replace(base, connect_error=_error_text(error))
    with sock:
        if server.server_starttls:
            return _probe_starttls(server, sock, timeout, base)
        return _probe_implicit(server, sock, timeout, base)


def _error_text(error: BaseException) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _handshake(sock: socket.socket, address: str) -> ssl.SSLSocket:
    return upstream_context().wrap_socket(sock, server_hostname=address)


def _probe_implicit(
    server: ServerConfig, sock: socket.socket, timeout: float, base: ServerProbe
) -> ServerProbe:
    protocol = server.protocol
    try:
        tls = _handshake(sock, server.server_address)
    except ssl.SSLCertVerificationError as error:
        return replace(base, certificate_error=str(error.verify_message or error))
    except (ssl.SSLError, OSError) as error:
        plain = _plain_greeting(server, min(timeout, GREETING_WAIT))
        if plain is not None:
            return replace(base, plain_greeting=_shown(plain))
        return replace(base, tls_error=_error_text(error))
    with tls:
        lines = _Lines(tls)
        try:
            greeting = _read_greeting(lines, protocol)
            mechanisms = _mechanisms(protocol, _capabilities(lines, protocol, greeting))
        except OSError as error:
            return replace(base, tls_error=f"after the handshake: {_error_text(error)}")
        _quit(lines, protocol)
        return replace(
            base,
            tls_version=tls.version(),
            greeting=_shown(greeting),
            mechanisms=mechanisms,
        )


def _plain_greeting(server: ServerConfig, wait: float) -> str | None:
    """The first line a server sends on a fresh plain connection within ``wait`` seconds, if any."""
    try:
        with socket.create_connection((server.server_address, server.server_port), timeout=wait) as sock:
            line = _Lines(sock).readline()
    except OSError:
        return None
    return line if line and line.isprintable() else None


def _probe_starttls(
    server: ServerConfig, sock: socket.socket, timeout: float, base: ServerProbe
) -> ServerProbe:
    protocol = server.protocol
    lines = _Lines(sock)
    sock.settimeout(min(timeout, GREETING_WAIT))
    try:
        greeting = _read_greeting(lines, protocol)
    except OSError as error:
        if _implicit_tls_works(server, timeout):
            return replace(base, implicit_tls_works=True)
        return replace(base, tls_error=f"no plain-text greeting: {_error_text(error)}")
    sock.settimeout(timeout)
    try:
        capabilities = _capabilities(lines, protocol, greeting)
        if not _offers_starttls(protocol, capabilities):
            return replace(base, greeting=_shown(greeting), starttls_refused="not advertised")
        command = {"IMAP": "s1 STARTTLS", "POP": "STLS", "SMTP": "STARTTLS"}[protocol]
        lines.send(command)
        reply = _smtp_reply(lines)[-1] if protocol == "SMTP" else lines.readline()
        accepted = reply.startswith({"IMAP": "s1 OK", "POP": "+OK", "SMTP": "220"}[protocol])
        if not accepted:
            return replace(base, greeting=_shown(greeting), starttls_refused=_shown(reply))
    except OSError as error:
        return replace(base, greeting=_shown(greeting), tls_error=_error_text(error))
    try:
        tls = _handshake(sock, server.server_address)
    except ssl.SSLCertVerificationError as error:
        return replace(base, certificate_error=str(error.verify_message or error))
    except (ssl.SSLError, OSError) as error:
        return replace(base, greeting=_shown(greeting), tls_error=_error_text(error))
    with tls:
        secure = _Lines(tls)
        try:
            after = _capabilities(secure, protocol, "")
        except OSError as error:
            return replace(base, tls_error=f"after STARTTLS: {_error_text(error)}")
        _quit(secure, protocol)
        return replace(
            base,
            tls_version=tls.version(),
            greeting=_shown(greeting),
            mechanisms=_mechanisms(protocol, after),
        )


def _implicit_tls_works(server: ServerConfig, timeout: float) -> bool:
    try:
        with socket.create_connection((server.server_address, server.server_port), timeout=timeout) as sock:
            _handshake(sock, server.server_address).close()
    except OSError:  # ssl.SSLError is an OSError
        return False
    return True
