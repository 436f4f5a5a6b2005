"""The shared redirect listener (routing by state, the page, real loopback sockets) and the broker of
interactive authorisations behind the TokenManager (fake token endpoint, no identity provider)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import pytest
from cryptography.fernet import Fernet

from emailproxy.config import AccountConfig, Config, GlobalOptions, load_config
from emailproxy.oauth import authcode, redirect
from emailproxy.oauth.crypto import KeyCache, fernet_key
from emailproxy.oauth.endpoint import TokenEndpointError
from emailproxy.oauth.interactive import AuthorisationBroker, TerminalPaste
from emailproxy.oauth.redirect import PageData, PendingView, RedirectListener, ResultView
from emailproxy.oauth.tokens import TokenManager
from emailproxy.protocols.events import TokenFailure, TokenOk
from emailproxy.secret import Secret

USER = "user@example.com"


@pytest.fixture(autouse=True)
def _emailproxy_logs_reach_caplog() -> Any:
    """Other tests may have run setup_logging() (propagate off); caplog listens at the root logger."""
    logger = logging.getLogger("emailproxy")
    saved = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = saved
PASSWORD = "local-password"
REDIRECT = "http://localhost:8080/callback"


# ---------------------------------------------------------------------------------------- routing (pure)


class Handler:
    def __init__(self) -> None:
        self.callbacks: list[authcode.Callback] = []

    def __call__(self, callback: authcode.Callback) -> None:
        self.callbacks.append(callback)


def listener_with(state: str = "st-1", **kwargs: Any) -> tuple[RedirectListener, Handler]:
    listener = RedirectListener(**kwargs)
    handler = Handler()
    listener.expect(state, REDIRECT, USER, handler)
    return listener, handler


def get(
    listener: RedirectListener, target: str, host: str | None = "localhost:8080", peer: str = "127.0.0.1"
):
    return listener.respond("GET", target, host, peer)


def test_stray_requests_do_not_consume_the_expected_response() -> None:
    listener, handler = listener_with()
    assert get(listener, "/favicon.ico").status == 404
    assert get(listener, "/robots.txt?x=1").status == 404
    assert get(listener, "/callback?state=forged&code=evil").status == 400  # unknown state
    assert get(listener, "/callback?state=st-1").status == 400  # no code, no error
    assert get(listener, "/elsewhere?state=st-1&code=c").status == 404  # wrong path
    assert get(listener, "/callback?state=st-1&state=st-1&code=c").status == 400  # duplicated
    assert listener.respond("POST", "/callback?state=st-1&code=c", "localhost", "127.0.0.1").status == 405
    assert handler.callbacks == [] and listener.expected_count == 1
    response = get(listener, "/callback/?code=the-code&state=st-1")  # trailing slash does not matter
    assert response.status == 200 and "Authorisation received for account user@example.com" in response.body
    assert handler.callbacks == [authcode.Callback("st-1", "the-code")]
    replay = get(listener, "/callback?code=the-code&state=st-1")
    assert replay.status == 400 and "already used" in replay.body
    assert len(handler.callbacks) == 1


def test_an_error_response_is_delivered_once() -> None:
    listener, handler = listener_with()
    response = get(listener, "/callback?error=access_denied&error_description=no&state=st-1")
    assert response.status == 200 and "refused (access_denied)" in response.body
    assert handler.callbacks == [authcode.Callback("st-1", None, "access_denied", "no")]
    assert listener.expected_count == 0


def test_routing_is_by_state_across_accounts() -> None:
    listener = RedirectListener()
    first, second = Handler(), Handler()
    listener.expect("s-a", "http://localhost:8080/", "a@example.com", first)
    listener.expect("s-b", "http://localhost:8080/", "b@example.com", second)
    assert get(listener, "/?state=s-b&code=cb").status == 200
    assert get(listener, "/?state=s-a&code=ca").status == 200
    assert [c.code for c in first.callbacks] == ["ca"] and [c.code for c in second.callbacks] == ["cb"]


def test_page_only_for_loopback_clients_unless_allowed() -> None:
    listener, _ = listener_with()
    listener.page_source = lambda: PageData(now=100.0, pending=[PendingView(USER, 40.0, "https://idp/x")])
    page = get(listener, "/")
    assert page.status == 200 and "https://idp/x" in page.body and "1 min 0 s" in page.body
    assert get(listener, "/", host=None).status == 200  # HTTP/1.0 without Host
    assert get(listener, "/", host="[::1]:8080", peer="::1").status == 200
    assert get(listener, "/", peer="192.0.2.7").status == 403
    assert get(listener, "/", host="attacker.example:8080").status == 403  # DNS rebinding
    listener.allow_remote_page = True
    assert get(listener, "/", host="proxy.example", peer="192.0.2.7").status == 200
    head = listener.respond("HEAD", "/", "localhost", "127.0.0.1").encode(include_body=False)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


def test_page_lists_pending_and_results_escaped_without_scripts() -> None:
    data = PageData(
        now=1000.0,
        pending=[
            PendingView("<b>a</b>@example.com", 995.0, "https://idp/auth?a=1&b=2"),
            PendingView("dev@example.com", 700.0, "https://idp/device", "WXYZ-1234"),
        ],
        results=[
            ResultView("ok@example.com", True, "tokens saved", 990.0),
            ResultView("bad@example.com", False, "refused <script>", 400.0),
        ],
    )
    html = redirect.render_page(data)
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "&lt;b&gt;a&lt;/b&gt;@example.com" in html and "<b>a</b>" not in html
    assert 'href="https://idp/auth?a=1&amp;b=2"' in html
    assert "<code>WXYZ-1234</code>" in html and "5 min 0 s" in html
    assert "authorised: tokens saved" in html and "refused &lt;script&gt;" in html
    assert "<script" not in html and "src=" not in html


@pytest.mark.parametrize(
    ("settings", "address"),
    [
        ({"redirect_uri": "http://localhost:8080/cb"}, ("localhost", 8080)),
        (
            {"redirect_uri": "https://vault.example/x", "redirect_listen_address": "http://127.0.0.1:8801/"},
            ("127.0.0.1", 8801),
        ),
        ({"redirect_uri": "http://localhost/"}, ("localhost", 80)),
        ({"redirect_uri": "http://[::1]:9000/"}, ("::1", 9000)),
        ({"redirect_uri": "urn:ietf:wg:oauth:2.0:oob"}, None),
        ({}, None),
    ],
)
def test_listen_address(settings: dict[str, str], address: tuple[str, int] | None) -> None:
    account = AccountConfig(username=USER, section=USER, matched_section=USER, **settings)
    assert redirect.listen_address(account) == address


def test_redirect_addresses_of_a_config(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        "[emailproxy]\nallow_catch_all_accounts = True\n"
        "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n"
        "[a@example.com]\npermission_url = https://idp/auth\ntoken_url = https://idp/token\n"
        "oauth2_scope = s\nclient_id = c\nredirect_uri = http://localhost:8080/\n"
        "[b@example.com]\npermission_url = https://idp/auth\ntoken_url = https://idp/token\n"
        "oauth2_scope = s\nclient_id = c\nredirect_uri = http://LOCALHOST:8080/other\n"
        "[@example.org]\npermission_url = https://idp/auth\ntoken_url = https://idp/token\n"
        "oauth2_scope = s\nclient_id = c\nredirect_uri = https://vault.example/cb\n"
        "redirect_listen_address = http://127.0.0.1:8801\n"
        "[d@example.com]\npermission_url = https://idp/devicecode\noauth2_flow = device\n"
        "token_url = https://idp/token\noauth2_scope = s\nclient_id = c\nredirect_uri = http://localhost:9999/\n"
        "[c@example.com]\ntoken_url = https://idp/token\noauth2_scope = s\nclient_id = c\n"
        "oauth2_flow = client_credentials\nredirect_uri = http://localhost:7777/\n"
    )
    config = load_config(path)
    assert redirect.redirect_addresses(config) == [("localhost", 8080), ("127.0.0.1", 8801)]


# ---------------------------------------------------------------------------------------- sockets


async def http_get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def test_listener_serves_real_sockets() -> None:
    async def scenario() -> None:
        listener, handler = listener_with("st-9")
        try:
            assert await listener.ensure(("127.0.0.1", 0))
            port = listener.addresses[0][1]
            assert await listener.ensure(("127.0.0.1", 0))  # already served: not bound twice
            assert len(listener.addresses) == 1
            favicon = await http_get(port, b"GET /favicon.ico HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert favicon.startswith(b"HTTP/1.1 404 ")
            huge = await http_get(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
            assert huge.startswith(b"HTTP/1.1 431 ")
            garbage = await http_get(port, b"\x16\x03\x01 hello\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400 ")
            page = await http_get(port, b"GET / HTTP/1.0\r\n\r\n")
            assert page.startswith(b"HTTP/1.1 200 ") and b"Content-Security-Policy" in page
            assert handler.callbacks == []
            done = await http_get(
                port, b"GET /callback?state=st-9&code=abc HTTP/1.1\r\nHost: localhost\r\n\r\n"
            )
            assert done.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in done
            assert handler.callbacks == [authcode.Callback("st-9", "abc")]
        finally:
            await listener.close()
        assert listener.addresses == []

    asyncio.run(scenario())


def test_a_busy_port_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        listener = RedirectListener()
        try:
            assert not await listener.ensure(("127.0.0.1", port))
            assert not await listener.ensure(("127.0.0.1", port))  # tried again, reported once
            assert listener.addresses == []
        finally:
            await listener.close()
            blocker.close()
            await blocker.wait_closed()

    with caplog.at_level(logging.ERROR, "emailproxy"):
        asyncio.run(scenario())
    assert caplog.text.count("Cannot listen for authorisation redirects on 127.0.0.1") == 1


# ---------------------------------------------------------------------------------------- broker + tokens


@dataclasses.dataclass
class FakeConfig:
    options: GlobalOptions
    accounts: dict[str, AccountConfig]

    def find_account(self, username: str) -> AccountConfig | None:
        account = self.accounts.get(username.lower())
        return None if account is None else dataclasses.replace(account, username=username)


class FakeEndpoint:
    """Answers by URL: a list of dicts/exceptions per URL, consumed in order (the last one repeats)."""

    def __init__(self, answers: Mapping[str, list[Any]]) -> None:
        self.answers = {url: list(items) for url, items in answers.items()}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        with self._lock:
            self.requests.append((url, dict(form)))
            items = self.answers[url]
            answer = items.pop(0) if len(items) > 1 else items[0]
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


class FakeStore:
    def __init__(self) -> None:
        self.saves: list[tuple[str, dict[str, str | None]]] = []

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        self.saves.append((section, dict(changes)))


def fast_derive(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 1)


def code_account(**kwargs: Any) -> AccountConfig:
    settings: dict[str, Any] = {
        "token_url": "https://idp.test/token",
        "permission_url": "https://idp.test/authorize",
        "oauth2_scope": "IMAP.AccessAsUser.All offline_access",
        "client_id": "client-1",
        "client_secret": "secret-1",
        "redirect_uri": REDIRECT,
        "oauth2_flow": "authorization_code",
        "use_pkce": True,
    }
    settings.update(kwargs)
    return AccountConfig(username=USER, section=USER, matched_section=USER, **settings)


def device_account() -> AccountConfig:
    return code_account(permission_url="https://idp.test/devicecode", oauth2_flow="device", redirect_uri=None)


TOKENS = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600}
DEVICE = {
    "device_code": "dc-1",
    "user_code": "QWER-TY",
    "verification_uri": "https://idp.test/device",
    "expires_in": 900,
    "interval": 1,
}


@dataclasses.dataclass
class Rig:
    manager: TokenManager
    broker: AuthorisationBroker
    endpoint: FakeEndpoint
    store: FakeStore
    slept: list[float]

    def login(self, password: str = PASSWORD) -> Any:
        return self.manager.get_token(USER, Secret(password))

    def url(self) -> str:
        [pending] = self.broker.pending()
        assert pending.link is not None
        return pending.link

    def token_requests(self) -> list[dict[str, str]]:
        return [form for url, form in self.endpoint.requests if url == "https://idp.test/token"]


class SocketlessListener(RedirectListener):
    """Routes like the real one but records the addresses it is asked to serve instead of binding them."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, int]] = []

    async def ensure(self, address: tuple[str, int]) -> bool:
        self.asked.append(address)
        return True


def rig(account: AccountConfig, answers: Mapping[str, list[Any]], wait: float | None = 5.0) -> Rig:
    endpoint = FakeEndpoint(answers)
    store = FakeStore()
    slept: list[float] = []

    async def fast_sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0.01)

    broker = AuthorisationBroker(endpoint, SocketlessListener(), wait_seconds=wait, sleep=fast_sleep)
    config = FakeConfig(GlobalOptions(), {USER: account})
    manager = TokenManager(
        cast(Config, config), store, endpoint, key_cache=KeyCache(derive=fast_derive), interactive=broker
    )
    return Rig(manager, broker, endpoint, store, slept)


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def deliver(r: Rig, **params: str) -> redirect.Routed:
    state = dict(parse_qsl(urlsplit(r.url()).query))["state"]
    query = "&".join(f"{k}={v}" for k, v in {"state": state, **params}.items())
    return r.broker.listener.route("/callback", query)


def decrypt(store: FakeStore, name: str, password: str = PASSWORD) -> str:
    saved = store.saves[-1][1]
    salt = base64.b64decode(saved["token_salt"] or "")
    fernet = Fernet(fernet_key(fast_derive(password, salt, 0)))
    return fernet.decrypt((saved[name] or "").encode()).decode()


def test_concurrent_logins_share_one_authorisation_and_one_token_request() -> None:
    r = rig(code_account(), {"https://idp.test/token": [TOKENS]})

    async def scenario() -> list[Any]:
        logins = [asyncio.ensure_future(r.login()) for _ in range(10)]
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        await asyncio.sleep(0.05)  # every login has joined by now
        assert len(r.broker.pending()) == 1 and r.broker.listener.expected_count == 1
        assert deliver(r, code="the-code").accepted
        return list(await asyncio.gather(*logins))

    results = asyncio.run(scenario())
    assert all(isinstance(result, TokenOk) and result.access_token.reveal() == "at-new" for result in results)
    [form] = r.token_requests()
    assert form["grant_type"] == "authorization_code" and form["code"] == "the-code"
    assert form["client_secret"] == "secret-1" and form["redirect_uri"] == REDIRECT
    assert len(r.store.saves) == 1
    assert decrypt(r.store, "access_token") == "at-new" and decrypt(r.store, "refresh_token") == "rt-new"
    assert cast(SocketlessListener, r.broker.listener).asked == [("localhost", 8080)]


def test_pkce_verifier_in_the_token_request_matches_the_challenge_in_the_url() -> None:
    r = rig(code_account(), {"https://idp.test/token": [TOKENS]})

    async def scenario() -> tuple[str, Any]:
        login = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        url = r.url()
        deliver(r, code="c")
        return url, await login

    url, result = asyncio.run(scenario())
    assert isinstance(result, TokenOk)
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["code_challenge_method"] == "S256" and query["login_hint"] == USER
    assert authcode.pkce_challenge(r.token_requests()[0]["code_verifier"]) == query["code_challenge"]


def test_a_client_that_cannot_wait_gets_the_url_and_the_next_login_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig(code_account(use_pkce=False), {"https://idp.test/token": [TOKENS]}, wait=0.05)

    async def scenario() -> tuple[Any, Any, Any]:
        first = await r.login()
        url = r.url()
        assert r.token_requests() == []
        assert deliver(r, code="c").accepted
        await until(lambda: not r.broker.pending())
        second = await r.login()
        return first, url, second

    with caplog.at_level(logging.INFO, "emailproxy"):
        first, url, second = asyncio.run(scenario())
    assert isinstance(first, TokenFailure)
    assert first.message.startswith(f"Login failed for account {USER}: authorisation needed")
    assert f"Please visit the following URL to authenticate account {USER}: {url}" in first.message
    assert f"Please visit the following URL to authenticate account {USER}: {url}" in caplog.text
    assert "code_challenge" not in url
    assert isinstance(second, TokenOk) and second.access_token.reveal() == "at-new"
    assert len(r.token_requests()) == 1
    assert "secret-1" not in caplog.text and "at-new" not in caplog.text


def test_a_refused_sign_in_fails_the_waiters_and_the_next_login_starts_afresh() -> None:
    r = rig(code_account(), {"https://idp.test/token": [TOKENS]})

    async def scenario() -> tuple[Any, str, str]:
        login = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        first_url = r.url()
        deliver(r, error="access_denied")
        result = await login
        again = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        second_url = r.url()
        await r.broker.close()
        await again
        return result, first_url, second_url

    result, first_url, second_url = asyncio.run(scenario())
    assert isinstance(result, TokenFailure) and "refused (access_denied)" in result.message
    assert first_url != second_url and r.token_requests() == []
    [refused] = r.broker.page().results  # (stopping the broker records nothing)
    assert not refused.ok and refused.username == USER and "access_denied" in refused.detail


def test_a_rejected_code_is_reported() -> None:
    error = TokenEndpointError(400, "invalid_grant", "AADSTS70000: bad code")
    r = rig(code_account(), {"https://idp.test/token": [error]})

    async def scenario() -> Any:
        login = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        deliver(r, code="c")
        return await login

    result = asyncio.run(scenario())
    assert isinstance(result, TokenFailure) and "invalid_grant" in result.message and r.store.saves == []


def test_a_pasted_url_completes_the_authorisation() -> None:
    r = rig(code_account(), {"https://idp.test/token": [TOKENS]})

    async def scenario() -> tuple[str, str, Any]:
        login = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        state = dict(parse_qsl(urlsplit(r.url()).query))["state"]
        wrong = r.broker.deliver_pasted_url("http://localhost:8080/callback?code=x&state=forged")
        right = r.broker.deliver_pasted_url(f"http://localhost:8080/callback?code=pasted&state={state}")
        return wrong, right, await login

    wrong, right, result = asyncio.run(scenario())
    assert "not expected" in wrong and "Authorisation received" in right
    assert isinstance(result, TokenOk) and r.token_requests()[0]["code"] == "pasted"


def test_terminal_paste_reads_lines_and_prompts(tmp_path: Path) -> None:
    r = rig(code_account(), {"https://idp.test/token": [TOKENS]})
    pipe = tmp_path / "pasted"

    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    out = Out()

    async def scenario() -> Any:
        login = asyncio.ensure_future(r.login())
        await until(lambda: r.broker.pending() and r.broker.pending()[0].ready.is_set())
        state = dict(parse_qsl(urlsplit(r.url()).query))["state"]
        pipe.write_text(f"\nnot a url\nhttp://localhost:8080/callback?state={state}&code=typed\n")
        with pipe.open() as stream:
            paste = TerminalPaste(r.broker, stream, cast(Any, out))
            paste.start()
            return await login

    result = asyncio.run(scenario())
    assert isinstance(result, TokenOk) and r.token_requests()[0]["code"] == "typed"
    assert "Not accepted" in out.text and "Authorisation received" in out.text


def test_device_flow_through_the_broker() -> None:
    pending_error = TokenEndpointError(400, "authorization_pending", None)
    r = rig(
        device_account(),
        {
            "https://idp.test/devicecode": [DEVICE],
            "https://idp.test/token": [pending_error, pending_error, TOKENS],
        },
        wait=0.01,
    )

    async def scenario() -> tuple[Any, Any]:
        first = await r.login()
        await until(lambda: not r.broker.pending())
        return first, await r.login()

    first, second = asyncio.run(scenario())
    assert isinstance(first, TokenFailure)
    assert (
        "Please visit https://idp.test/device and enter the code QWER-TY to authenticate account"
        in first.message
    )
    assert isinstance(second, TokenOk) and second.access_token.reveal() == "at-new"
    devicecode = [form for url, form in r.endpoint.requests if url == "https://idp.test/devicecode"]
    assert devicecode == [{"client_id": "client-1", "scope": "IMAP.AccessAsUser.All offline_access"}]
    polls = r.token_requests()
    assert len(polls) == 3 and all(form["device_code"] == "dc-1" for form in polls)
    assert all(form["client_secret"] == "secret-1" for form in polls)
    assert r.slept == [1.0, 1.0, 1.0]


def test_without_a_broker_interactive_accounts_are_refused() -> None:
    manager = TokenManager(
        cast(Config, FakeConfig(GlobalOptions(), {USER: code_account()})), FakeStore(), FakeEndpoint({})
    )
    result = asyncio.run(manager.get_token(USER, Secret(PASSWORD)))
    assert isinstance(result, TokenFailure) and "interactive authorisation is needed" in result.message


# ---------------------------------------------------------------------------------------- configuration


def write_config(tmp_path: Path, emailproxy: str, redirect_port: int = 8080) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        f"[emailproxy]\n{emailproxy}\n"
        "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n"
        "[a@example.com]\npermission_url = https://idp/auth\ntoken_url = https://idp/token\n"
        f"oauth2_scope = s\nclient_id = c\nredirect_uri = http://127.0.0.1:{redirect_port}/cb\n"
    )
    return path


def test_broker_for_config_listens_where_the_accounts_need(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write_config(
        tmp_path, "authorisation_wait_seconds = 2.5\nallow_remote_authorisation_page = yes", port
    )
    config = load_config(path)
    assert config.options.authorisation_wait_seconds == 2.5 and config.options.allow_remote_authorisation_page

    async def scenario() -> bytes:
        broker = AuthorisationBroker.for_config(config, FakeEndpoint({}))
        try:
            await broker.configure(config)
            assert broker.wait_seconds == 2.5 and broker.listener.allow_remote_page
            assert broker.listener.serves(("127.0.0.1", port))
            return await http_get(port, b"GET / HTTP/1.0\r\n\r\n")
        finally:
            await broker.stop()

    page = asyncio.run(scenario())
    assert page.startswith(b"HTTP/1.1 200 ") and b"No authorisation is pending" in page


def test_authorisation_wait_seconds_is_validated(tmp_path: Path) -> None:
    from emailproxy.config import ConfigError

    assert load_config(write_config(tmp_path, "")).options.authorisation_wait_seconds == 60.0
    assert (
        load_config(
            write_config(tmp_path, "authorisation_wait_seconds = 0")
        ).options.authorisation_wait_seconds
        == 0
    )
    for bad in ("soon", "-5", "7200"):
        with pytest.raises(ConfigError, match="authorisation_wait_seconds"):
            load_config(write_config(tmp_path, f"authorisation_wait_seconds = {bad}"))


def test_external_auth_without_a_terminal_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    import io

    broker = AuthorisationBroker(FakeEndpoint({}), SocketlessListener())
    with caplog.at_level(logging.WARNING, "emailproxy"):
        assert not broker.start_terminal(io.StringIO())
    assert "--external-auth needs a terminal" in caplog.text and broker.announcers == []
