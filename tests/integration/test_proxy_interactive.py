"""End-to-end interactive authorisation: the authorization-code flow (PKCE and state) through the shared
redirect listener with a scripted browser, the device flow with a scripted approval, and
`emailproxy authorize` bootstrapping an account over a pipe, all against the test identity provider
and the real Dovecot."""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch, proxy_env, render_config, wait_for
from tests.integration.world.idp import DEVICE_CODE_GRANT, pkce_challenge

CLIENT_ID = "interactive-client"
CLIENT_SECRET = "interactive-secret-value"
PASSWORD = "local-password-1"
SCOPE = "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"
URL_LINE = "Please visit the following URL to authenticate account {user}: "


# ------------------------------------------------------------------------------------------- helpers


def logged_url(proxy_log: Callable[[], str], user: str) -> str:
    pattern = re.compile(re.escape(URL_LINE.format(user=user)) + r"(\S+)")

    def find() -> str | None:
        match = pattern.search(proxy_log())
        return match.group(1) if match else None

    url: str = wait_for(find, what=f"the authorisation URL of {user} in the log")
    return url


def browse(world: World, url: str) -> str:
    """The scripted browser: sign in at the identity provider and return where it redirects to."""
    with world.idp.session() as http:
        answer = http.get(url, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    location: str = answer.headers["Location"]
    return location


def visit(url: str) -> requests.Response:
    """A plain HTTP GET to the proxy's redirect listener, as the browser would make it."""
    with requests.Session() as http:
        http.trust_env = False
        return http.get(url, allow_redirects=False, timeout=10)


def imap_login(port: int, user: str, password: str = PASSWORD) -> str:
    """Log in and select INBOX; returns "ok" or the server's error text."""
    try:
        with imaplib.IMAP4("127.0.0.1", port, timeout=60) as imap:
            imap.login(user, password)
            typ, _ = imap.select("INBOX")
            return "ok" if typ == "OK" else f"select: {typ}"
    except imaplib.IMAP4.error as error:
        return str(error)


def account_section(world: World, redirect_port: int, **overrides: str) -> dict[str, str]:
    section = {
        "permission_url": world.idp.authorize_url(),
        "token_url": world.idp.token_url(),
        "oauth2_scope": SCOPE,
        "redirect_uri": f"http://localhost:{redirect_port}/callback",
        "redirect_listen_address": f"http://127.0.0.1:{redirect_port}",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "use_pkce": "True",
    }
    section.update(overrides)
    return section


def sections_for(world: World, ports: dict[str, int], user: str, wait: float, **overrides: str):
    return {
        "emailproxy": {"authorisation_wait_seconds": str(wait)},
        f"IMAP-{ports['IMAP']}": {
            "server_address": world.dovecot.ports.host,
            "server_port": str(world.dovecot.ports.imaps),
        },
        user: account_section(world, ports["REDIRECT"], **overrides),
    }


@pytest.fixture
def start_proxy(world: World, tmp_path: Path) -> Iterator[Callable[..., tuple[Proxy, str, dict[str, int]]]]:
    """start_proxy(wait, args=..., **account overrides) -> (proxy, user, ports); stopped afterwards."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    started: list[Proxy] = []

    def start(
        wait: float, args: list[str] | None = None, **overrides: str
    ) -> tuple[Proxy, str, dict[str, int]]:
        ports = allocate_ports("IMAP", "REDIRECT")
        user = world.new_user()
        sections = sections_for(world, ports, user, wait, **overrides)
        # device-flow accounts need no redirect listener: wait for the IMAP port only
        listening = {"IMAP": ports["IMAP"]} if overrides.get("oauth2_flow") == "device" else ports
        proxy = launch(world.ca_path, tmp_path, sections, listening, args)
        started.append(proxy)
        return proxy, user, ports

    yield start
    for proxy in started:
        assert proxy.stop() == 0, proxy.output()


# ------------------------------------------------------------------------------------------- auth code


def test_auth_code_end_to_end_while_the_client_waits(world: World, start_proxy: Any) -> None:
    proxy, user, ports = start_proxy(30, args=["--external-auth", "--local-server-auth"])
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(imap_login, ports["IMAP"], user)
        url = logged_url(proxy.log, user)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["login_hint"] == user and query["code_challenge_method"] == "S256"
        assert query["redirect_uri"] == f"http://localhost:{ports['REDIRECT']}/callback"
        assert len(query["state"]) >= 22
        location = browse(world, url)
        assert location.startswith(f"http://localhost:{ports['REDIRECT']}/callback?")
        answer = visit(location.replace("localhost", "127.0.0.1", 1))
        assert answer.status_code == 200 and "Authorisation received" in answer.text
        assert login.result(timeout=30) == "ok"
    [redeem] = world.idp.token_requests("authorization_code")
    assert redeem.form["code"] == dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["code"]
    assert pkce_challenge(redeem.form["code_verifier"]) == query["code_challenge"]  # the IdP checked it too
    assert world.idp.is_valid(user, world.idp.issued[-1].access_token)
    assert imap_login(ports["IMAP"], user) == "ok"  # cached now
    assert len(world.idp.token_requests()) == 1
    log = proxy.log()
    assert "--external-auth needs a terminal" in log
    assert CLIENT_SECRET not in log and world.idp.issued[-1].access_token not in log


def test_client_that_cannot_wait_gets_the_url_and_the_next_login_succeeds(
    world: World, start_proxy: Any
) -> None:
    # the vendor guide's setup: oauth2_flow = client_credentials with a permission_url (so the
    # authorization-code flow runs), a public redirect_uri behind a reverse proxy, and
    # redirect_listen_address on loopback
    public = "http://vault.invalid/email-oauth2-proxy-authorize/"
    proxy, user, ports = start_proxy(0.5, oauth2_flow="client_credentials", redirect_uri=public)
    failure = imap_login(ports["IMAP"], user)
    assert "NO" in failure or "Login failed" in failure
    assert f"Please visit the following URL to authenticate account {user}: " in failure
    url = re.search(r"(https://\S+?)(?: - then log in again|'|$)", failure)
    assert url is not None
    assert url.group(1) == logged_url(proxy.log, user)
    listener = f"http://127.0.0.1:{ports['REDIRECT']}"
    page = visit(f"{listener}/")
    assert page.status_code == 200 and user in page.text and 'http-equiv="refresh"' in page.text
    assert url.group(1).replace("&", "&amp;") in page.text
    location = browse(world, url.group(1))
    assert location.startswith(public + "?")
    assert (
        visit(location.replace("http://vault.invalid", listener, 1)).status_code == 200
    )  # the reverse proxy
    wait_for(lambda: f"Authorisation of account {user} complete" in proxy.log(), what="the authorisation")
    assert [r.grant_type for r in world.idp.token_requests()] == ["authorization_code"]
    assert world.idp.token_requests()[0].form["redirect_uri"] == public
    assert imap_login(ports["IMAP"], user) == "ok"
    assert len(world.idp.token_requests()) == 1  # the next login needed no token request
    assert "Recent results" in visit(f"{listener}/").text


def test_ten_concurrent_logins_cause_one_authorisation(world: World, start_proxy: Any) -> None:
    proxy, user, ports = start_proxy(30)
    with ThreadPoolExecutor(10) as pool:
        logins: list[Future[str]] = [pool.submit(imap_login, ports["IMAP"], user) for _ in range(10)]
        url = logged_url(proxy.log, user)
        wait_for(
            lambda: proxy.log().count(f"Login for account {user} joins the pending authorisation") == 9,
            what="all ten logins to wait",
        )
        assert proxy.log().count(URL_LINE.format(user=user)) == 1
        assert visit(browse(world, url)).status_code == 200
        assert [login.result(timeout=30) for login in logins] == ["ok"] * 10
    assert len([r for r in world.idp.requests if r.endpoint == "authorize"]) == 1
    assert len(world.idp.token_requests()) == 1
    assert len(world.idp.token_requests("authorization_code")) == 1


def test_forged_and_replayed_callbacks_are_refused(world: World, start_proxy: Any) -> None:
    proxy, user, ports = start_proxy(30)
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(imap_login, ports["IMAP"], user)
        location = browse(world, logged_url(proxy.log, user)).replace("localhost", "127.0.0.1", 1)
        parts = urllib.parse.urlsplit(location)
        params = dict(urllib.parse.parse_qsl(parts.query))
        base = f"{parts.scheme}://{parts.netloc}{parts.path}"
        forged = visit(f"{base}?code={params['code']}&state=forged-state-value")
        assert forged.status_code == 400
        assert visit(f"http://127.0.0.1:{ports['REDIRECT']}/favicon.ico").status_code == 404
        assert visit(f"{base}?state={params['state']}").status_code == 400  # no code
        assert world.idp.token_requests() == []
        assert visit(location).status_code == 200
        assert login.result(timeout=30) == "ok"
    replay = visit(location)
    assert replay.status_code == 400 and "already used" in replay.text
    assert len(world.idp.token_requests()) == 1


# ------------------------------------------------------------------------------------------- device flow


def test_device_flow_with_scripted_approval_and_slow_down(world: World, start_proxy: Any) -> None:
    world.idp.device_interval = 1
    world.idp.device_slow_down = 1
    proxy, user, ports = start_proxy(30, permission_url=world.idp.devicecode_url(), oauth2_flow="device")
    pattern = re.compile(
        rf"Please visit (\S+) and enter the code (\S+) to authenticate account {re.escape(user)}"
    )
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(imap_login, ports["IMAP"], user)
        match = wait_for(lambda: pattern.search(proxy.log()), what="the device code in the log")
        assert match.group(1) == f"{world.idp.base_url}/devicelogin"
        world.idp.approve_device(match.group(2), user)
        assert login.result(timeout=30) == "ok"
    [started] = [r for r in world.idp.requests if r.endpoint == "devicecode"]
    assert started.method == "POST" and started.form == {"client_id": CLIENT_ID, "scope": SCOPE}
    polls = world.idp.token_requests(DEVICE_CODE_GRANT)
    assert len(polls) == 2  # slow_down, then the approved poll
    assert polls[1].time - polls[0].time >= 1 + 5 - 0.5  # the interval grew by 5 s
    assert all(poll.form["client_secret"] == CLIENT_SECRET for poll in polls)
    assert imap_login(ports["IMAP"], user) == "ok"
    assert len(world.idp.token_requests()) == 2


# ------------------------------------------------------------------------------------------- authorize


def test_authorize_command_bootstraps_an_account(world: World, tmp_path: Path) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "REDIRECT")
    user = world.new_user()
    config = tmp_path / "emailproxy.config"
    config.write_text(render_config(sections_for(world, ports, user, 1)))
    out, err = tmp_path / "authorize.out", tmp_path / "authorize.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        command = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emailproxy",
                "authorize",
                user,
                "--config-file",
                str(config),
                "--password-stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            env=proxy_env(world.ca_path),
        )
    try:
        assert command.stdin is not None
        command.stdin.write(PASSWORD.encode() + b"\n")
        command.stdin.close()
        url = logged_url(lambda: out.read_text() + err.read_text(), user)
        assert url in out.read_text()  # shown to the person at the terminal too
        assert visit(browse(world, url).replace("localhost", "127.0.0.1", 1)).status_code == 200
        assert command.wait(timeout=30) == 0, out.read_text() + err.read_text()
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert f"Account {user} is authorised" in out.read_text()
    assert len(world.idp.token_requests()) == 1
    saved = config.read_text()
    assert "access_token = gAAAAA" in saved and "refresh_token = gAAAAA" in saved
    proxy = launch(world.ca_path, tmp_path, {}, {"IMAP": ports["IMAP"]}, config_text=saved)
    try:
        assert imap_login(ports["IMAP"], user) == "ok"
        assert imap_login(ports["IMAP"], user, "wrong-password") != "ok"
    finally:
        assert proxy.stop() == 0, proxy.output()
    assert len(world.idp.token_requests()) == 1  # the proxy needed no token request
