"""The operations commands end to end: `register` with a vendor's flags -> `check` -> the proxy runs on the
written file -> `test ACCOUNT --send-to` logs in through it and delivers a message -> `accounts` shows the
cached token -> `logs` shows the proxy's log. Also `check --online` against the world's servers and
identity provider, and `check` explaining a vendor's permission_url + client_credentials combination.

Every command runs as a subprocess (`python -m emailproxy <command>`) trusting the test CA, as an
administrator would run it.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, proxy_env, record_command
from tests.integration.world.ports import LOOPBACK

CLIENT_ID = "ops-ccg-client"
CLIENT_SECRET = "ops-ccg-secret-value"
SCOPE = "https://outlook.office365.com/.default"
DELIVERY_TIMEOUT = 30.0


def emailproxy(
    world: World, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "emailproxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=proxy_env(world.ca_path),
        timeout=timeout,
        check=False,
    )
    record_command(args, done.stdout, done.stderr)  # scanned for secrets at the end of the session
    return done


def register_flags(world: World, config: Path, ports: dict[str, int]) -> list[str]:
    """The vendor's flag names (senhasegura guide) with values for the test world, stray spaces included."""
    dovecot, postfix = world.dovecot.ports, world.postfix.ports
    return [
        "register",
        f"--config-file={config}",
        f"--imap-server-address={dovecot.host}",
        f"--imap-server-port={dovecot.imaps}",
        f"--pop-server-address={dovecot.host}",
        f"--pop-server-port={dovecot.pop3}",
        "--pop-server-starttls",
        f"--smtp-server-address={LOOPBACK}",
        f"--smtp-server-port={postfix.submission}",
        "--smtp-server-starttls",
        f"--imap-local-port={ports['IMAP']}",
        f"--pop-local-port={ports['POP']}",
        f"--smtp-local-port={ports['SMTP']}",
        f"--oauth2-token-url={world.idp.token_url()} ",
        f"--oauth2-scope= {SCOPE} ",
        '--oauth2-flow=client_credentials',
        f"--oauth2-client-id={CLIENT_ID}",
        f"--oauth2-client-secret= {CLIENT_SECRET}",
        "--force",
    ]


def wait_for_messages(world: World, user: str, count: int) -> list[bytes]:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        messages = world.dovecot.messages(user)
        if len(messages) >= count:
            return messages
        if time.monotonic() > deadline:
            log = world.postfix.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{user}: {len(messages)} of {count} delivered; postfix log:\n{log}")
        time.sleep(0.05)


def test_register_run_test_send_accounts_logs(world: World, tmp_path: Path) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "POP", "SMTP")
    config = tmp_path / "emailproxy.config"

    registered = emailproxy(world, *register_flags(world, config, ports))
    assert registered.returncode == 0, registered.stderr
    assert "`emailproxy check` finds no problems." in registered.stdout
    assert CLIENT_SECRET not in registered.stdout + registered.stderr
    checked = emailproxy(world, "check", "--config-file", str(config))
    assert checked.returncode == 0 and "No problems found." in checked.stdout, checked.stdout

    proxy = Proxy(config, tmp_path / "proxy.log", ports, proxy_env(world.ca_path))
    proxy.start()
    try:
        user, recipient = world.new_user(), world.new_user("rcpt")
        world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "waiting", "body"))
        tested = emailproxy(
            world,
            "test", user, "--config-file", str(config), "--password-stdin", "--send-to", recipient,
            stdin="local-password\n",
        )
        out = tested.stdout
        assert tested.returncode == 0, out + tested.stderr + proxy.log()[-3000:]
        imap, pop, smtp = (f"[{name}-{ports[name]}]" for name in ("IMAP", "POP", "SMTP"))
        assert re.search(rf"^{re.escape(imap)} log in as {re.escape(user)} \.\.\. ok", out, re.M), out
        assert f"{imap} select INBOX ... ok: 1 message(s)" in out
        assert re.search(rf"^{re.escape(pop)} mailbox size \.\.\. ok: 1 message\(s\)", out, re.M), out
        sent = re.search(rf"^{re.escape(smtp)} send a test message to {re.escape(recipient)} \.\.\. ok.*: "
                         r"250 .*; Message-ID (<[^>]+>)$", out, re.M)
        assert sent is not None, out
        assert out.rstrip().endswith("All steps passed.")
        assert "local-password" not in out

        (delivered,) = wait_for_messages(world, recipient, 1)
        message = email.message_from_bytes(delivered, policy=email.policy.default)
        assert (message["From"], message["To"]) == (user, recipient)
        assert message["Subject"] == "emailproxy test message"
        assert message["Message-ID"] == sent.group(1)
        assert f"as {user}\n" in message.get_content()
        # one client-credentials token for the three logins (cached and reused), for the registered client
        requests = world.idp.token_requests("client_credentials")
        assert len(requests) == 1 and requests[0].form["client_id"] == CLIENT_ID
        assert requests[0].form["scope"] == SCOPE

        # a wrong local password: the step fails with the proxy's explanation, and the exit status says so
        refused = emailproxy(
            world, "test", user, "--config-file", str(config), "--password-stdin", "--protocol", "imap",
            stdin="not-the-password\n",
        )
        assert refused.returncode == 1, refused.stdout
        assert f"{imap} log in as {user} ... FAILED: " in refused.stdout
        assert "Email OAuth 2.0 Proxy: " in refused.stdout and "1 step(s) failed." in refused.stdout
        assert "[POP-" not in refused.stdout

        listed = emailproxy(world, "accounts", "--config-file", str(config))
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith(user))
        assert "client_credentials" in row and "access" in row
        assert re.search(r"in (\d+ min|1 h) \(", row), row
        section = rf"^\[{re.escape(user)}\]\n(?:.*\n)*?access_token = (\S+)"
        stored = re.search(section, config.read_text(), re.M)
        assert stored is not None and stored.group(1) not in listed.stdout
        assert CLIENT_SECRET not in listed.stdout

        shown = emailproxy(world, "logs", "--log-file", str(proxy.log_path), "-n", "3")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [line for line in proxy.log().splitlines() if line][-3:]
    finally:
        assert proxy.stop() == 0, proxy.output()


def test_check_online_against_the_world(world: World, tmp_path: Path) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "POP", "SMTP", "BAD_SMTP", "BAD_IMAP")
    config = tmp_path / "emailproxy.config"
    registered = emailproxy(world, *register_flags(world, config, ports))
    assert registered.returncode == 0, registered.stderr

    online = emailproxy(world, "check", "--config-file", str(config), "--online", "--timeout", "5")
    out = online.stdout
    assert online.returncode == 0, out
    dovecot, postfix = world.dovecot.ports, world.postfix.ports
    imap, pop = f"{dovecot.host}:{dovecot.imaps}", f"{dovecot.host}:{dovecot.pop3}"
    smtp = f"{LOOPBACK}:{postfix.submission}"
    assert f"OK       [IMAP-{ports['IMAP']}]: {imap} reachable (implicit TLS, TLSv1." in out
    assert f"OK       [POP-{ports['POP']}]: {pop} reachable (STARTTLS, TLSv1." in out
    assert f"OK       [SMTP-{ports['SMTP']}]: {smtp} reachable (STARTTLS, TLSv1." in out
    assert len(re.findall(r"offers XOAUTH2 and OAUTHBEARER", out)) == 3, out
    assert "OK       [@] token_url: token endpoint 127.0.0.1" in out and "invalid_client" in out
    assert "No problems found." in out
    # the probe asked the token endpoint without a secret
    (probe,) = world.idp.token_requests("client_credentials")
    assert probe.form == {"grant_type": "client_credentials", "client_id": CLIENT_ID}

    # a section set for implicit TLS on the STARTTLS submission port, one set for STARTTLS on the
    # implicit-TLS IMAP port, and an account whose client_id the identity provider does not know
    with open(config, "a") as handle:
        handle.write(
            f"\n[SMTP-{ports['BAD_SMTP']}]\nserver_address = {LOOPBACK}\nserver_port = {postfix.submission}\n"
            f"\n[IMAP-{ports['BAD_IMAP']}]\nserver_address = {dovecot.host}\nserver_port = {dovecot.imaps}\n"
            "server_starttls = True\n"
            f"\n[typo@example.com]\ntoken_url = {world.idp.token_url()}\noauth2_scope = {SCOPE}\n"
            "oauth2_flow = client_credentials\nclient_id = ops-ccg-clinet\nclient_secret = x\n"
        )
    online = emailproxy(world, "check", "--config-file", str(config), "--online", "--timeout", "2")
    out = online.stdout
    assert online.returncode == 1, out
    assert (
        f"ERROR    [SMTP-{ports['BAD_SMTP']}] server_starttls: {smtp} answered with a plain-text greeting "
        "('220 mail.example.com ESMTP test world') instead of TLS" in out
    ), out
    assert "-> set server_starttls = True" in out
    assert (
        f"ERROR    [IMAP-{ports['BAD_IMAP']}] server_starttls: {imap} sent no plain-text greeting but "
        "accepted a TLS handshake" in out
    ), out
    assert "ERROR    [typo@example.com] client_id: the endpoint does not know this client_id" in out
    assert "AADSTS700016" in out
    assert "3 problem(s): 3 error(s), 0 warning(s)." in out


def test_check_explains_the_vendors_permission_url(world: World, tmp_path: Path) -> None:
    """The senhasegura flags as published: client_credentials together with a permission_url."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "SMTP")
    config = tmp_path / "emailproxy.config"
    dovecot, postfix = world.dovecot.ports, world.postfix.ports
    registered = emailproxy(
        world,
        "register",
        f"--config-file={config}",
        f"--imap-server-address={dovecot.host}",
        f"--imap-server-port={dovecot.imaps}",
        f"--smtp-server-address={LOOPBACK}",
        f"--smtp-server-port={postfix.submission}",
        "--smtp-server-starttls",
        f"--imap-local-port={ports['IMAP']}",
        f"--smtp-local-port={ports['SMTP']}",
        f"--oauth2-token-url={world.idp.token_url()} ",
        f"--oauth2-permission-url={world.idp.authorize_url()} ",
        "--oauth2-scope= https://outlook.office365.com/IMAP.AccessAsUser.All "
        "https://outlook.office365.com/SMTP.Send offline_access ",
        "--oauth2-flow=client_credentials",
        f"--oauth2-client-id={CLIENT_ID}",
        f"--oauth2-client-secret={CLIENT_SECRET}",
        "--force",
    )
    assert registered.returncode == 0, registered.stderr
    checked = emailproxy(world, "check", "--config-file", str(config))
    assert checked.returncode == 1
    explanation = (
        "WARNING  [@] oauth2_flow: oauth2_flow = client_credentials is not what runs: because "
        "permission_url is set, the authorization code flow is used (as the reference does)"
    )
    assert explanation in checked.stdout, checked.stdout
    assert "remove permission_url and set oauth2_scope = https://outlook.office365.com/.default" in (
        checked.stdout
    )
    assert "WARNING  [@] redirect_uri: the authorization code flow needs a redirect_uri" in checked.stdout
    assert "2 problem(s)" in checked.stdout

    # the proxy runs the same checks at start-up and logs them
    proxy = Proxy(config, tmp_path / "proxy.log", ports, proxy_env(world.ca_path))
    proxy.start()
    try:
        log = proxy.log()
    finally:
        assert proxy.stop() == 0, proxy.output()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    override = "[@], key 'oauth2_flow': oauth2_flow = client_credentials is not what runs"
    assert any(override in w for w in warnings), log
    assert any("[@], key 'redirect_uri'" in w for w in warnings), log
    assert world.idp.token_requests() == []
