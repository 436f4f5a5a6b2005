"""A private Dovecot instance on free loopback ports that accepts only XOAUTH2/OAUTHBEARER logins.

Tokens are checked by `checkpassword.py`, which asks the test identity provider (`IdentityProvider.check_url`)
whether the token is valid for the SASL user. All state lives in one directory; the instance runs in the
foreground (`dovecot -F`) as a child of the test process, in its own process group, so stopping it never
touches any other Dovecot on the machine.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import shlex
import smtplib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.world import (
    WorldError,
    end_process_group,
    find_program,
    log_tail,
    require_root,
    require_traversable,
)
from tests.integration.world.ca import CertificateFiles
from tests.integration.world.checkpassword import CHECK_URL_VARIABLE
from tests.integration.world.ports import DOVECOT_LOOPBACK, free_ports, wait_listening
from tests.integration.world.token_table import lua_available, lua_script, passdb_block

CHECKPASSWORD_SCRIPT = Path(__file__).with_name("checkpassword.py")
MAIL_USER = "mail"
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class DovecotPorts:
    """The address and TCP ports of one Dovecot instance.

    `host` is 127.0.0.2, not 127.0.0.1: Dovecot counts a connection from its own IP as secured and would
    then allow authentication without TLS on the plain ports. Clients connect from 127.0.0.1.
    """

    host: str
    imaps: int  # IMAP with implicit TLS
    imap: int  # IMAP plain; STARTTLS required before authentication
    pop3s: int  # POP3 with implicit TLS
    pop3: int  # POP3 plain; STLS required before authentication
    lmtp: int  # LMTP delivery (used by Postfix)
    auth: int  # Dovecot SASL auth protocol (used by Postfix)


@dataclass(frozen=True)
class DovecotTuning:
    """Changes for benchmarks; the defaults give the integration tests' configuration unchanged."""

    # check the tokens listed in this file in-process (Lua passdb, see token_table.py) before checkpassword
    token_table: Path | None = None
    imap_client_limit: int = 1  # IMAP sessions served by one imap process (Dovecot's default: 1)
    max_userip_connections: int = 1000  # per user and client IP


def _config(
    *,
    directory: Path,
    instance_name: str,
    ports: DovecotPorts,
    certs: CertificateFiles,
    launcher: Path,
    mail_root: Path,
    uid: int,
    gid: int,
    tuning: DovecotTuning,
    lua_path: Path,
) -> str:
    extra_passdb = passdb_block(lua_path) if tuning.token_table is not None else ""
    imap_limits = "  process_limit = 1000\n"
    if tuning.imap_client_limit != 1:
        # service_count 0: a process keeps serving new sessions (with 1, each process takes one and exits)
        imap_limits += f"  client_limit = {tuning.imap_client_limit}\n  service_count = 0\n"
    return f"""\
# Private Dovecot for the emailproxy integration tests (generated).
instance_name = {instance_name}
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
info_log_path = {directory}/dovecot.log
debug_log_path = {directory}/dovecot.log
listen = {ports.host}
hostname = mail.example.com
protocols = imap pop3 lmtp
shutdown_clients = yes

ssl = required
ssl_cert = <{certs.cert_path}
ssl_key = <{certs.key_path}
ssl_min_protocol = TLSv1.2

auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0
auth_cache_size = 0
auth_verbose = yes
auth_username_chars =
{extra_passdb}passdb {{
  driver = checkpassword
  args = {launcher}
  mechanisms = xoauth2 oauthbearer
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail_root}/%d/%n allow_all_users=yes
}}

first_valid_uid = 1
mail_location = maildir:{mail_root}/%d/%n
postmaster_address = postmaster@example.com
lmtp_save_to_detail_mailbox = no

default_client_limit = 4000
default_process_limit = 500
default_vsz_limit = 0

protocol imap {{
  mail_max_userip_connections = {tuning.max_userip_connections}
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
}}

service imap-login {{
  inet_listener imap {{
    address = {ports.host}
    port = {ports.imap}
  }}
  inet_listener imaps {{
    address = {ports.host}
    port = {ports.imaps}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 1000
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {ports.host}
    port = {ports.pop3}
  }}
  inet_listener pop3s {{
    address = {ports.host}
    port = {ports.pop3s}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 1000
}}
service imap {{
{imap_limits}}}
service pop3 {{
  process_limit = 1000
}}
service lmtp {{
  inet_listener lmtp {{
    address = {ports.host}
    port = {ports.lmtp}
  }}
}}
service auth {{
  user = root
  inet_listener auth-client {{
    address = {ports.host}
    port = {ports.auth}
  }}
  client_limit = 6000
}}
service anvil {{
  client_limit = 6000
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


class Dovecot:
    """A private Dovecot. `start()` then use `ports`, `maildir(user)`, `deliver(user, message)`; `stop()`."""

    def __init__(
        self, directory: Path, certs: CertificateFiles, check_url: str, tuning: DovecotTuning | None = None
    ) -> None:
        self.directory = directory
        self.tuning = tuning or DovecotTuning()
        self.certs = certs
        self.check_url = check_url
        self.config_path = directory / "dovecot.conf"
        self.log_path = directory / "dovecot.log"
        self.console_path = directory / "dovecot.console"
        self.mail_root = directory / "mail"
        self.instance_name = f"emailproxy-test-{os.getpid()}-{id(self):x}"
        self.host = DOVECOT_LOOPBACK
        imaps, imap, pop3s, pop3, lmtp, auth = free_ports(6, self.host)
        self.ports = DovecotPorts(
            host=self.host, imaps=imaps, imap=imap, pop3s=pop3s, pop3=pop3, lmtp=lmtp, auth=auth
        )
        self._binary = ""
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        require_root("Dovecot")
        self._binary = find_program("dovecot")
        find_program("doveconf")
        mail = pwd.getpwnam(MAIL_USER)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        self.mail_root.mkdir(exist_ok=True)
        os.chown(self.mail_root, mail.pw_uid, mail.pw_gid)
        require_traversable(self.mail_root, MAIL_USER)
        launcher = self.directory / "checkpassword"
        launcher.write_text(
            "#!/bin/sh\n"
            f"{CHECK_URL_VARIABLE}={shlex.quote(self.check_url)} "
            f'exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(CHECKPASSWORD_SCRIPT))} "$@"\n'
        )
        launcher.chmod(0o755)
        lua_path = self.directory / "token_table.lua"
        if self.tuning.token_table is not None:
            if not lua_available():
                raise WorldError("a token table needs Dovecot's Lua passdb: apt-get install dovecot-auth-lua")
            lua_path.write_text(lua_script(self.tuning.token_table))
        self.config_path.write_text(
            _config(
                directory=self.directory,
                instance_name=self.instance_name,
                ports=self.ports,
                certs=self.certs,
                launcher=launcher,
                mail_root=self.mail_root,
                uid=mail.pw_uid,
                gid=mail.pw_gid,
                tuning=self.tuning,
                lua_path=lua_path,
            )
        )
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(
                [self._binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        ports = self.ports
        closed = [ports.imaps, ports.imap, ports.pop3s, ports.pop3, ports.lmtp, ports.auth]
        while closed and time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            closed = wait_listening(closed, timeout=0.2, host=self.host)
        if closed or self._process.poll() is not None:
            details = log_tail(self.console_path) + "\n" + log_tail(self.log_path)
            self.stop()
            raise WorldError(f"Dovecot did not start (ports not listening: {closed}):\n{details}")

    def stop(self) -> None:
        """Stop the instance: SIGTERM to its master (what `dovecot stop` sends; the command itself polls for
        seconds), then SIGKILL to its process group if anything lingers."""
        process = self._process
        if process is None:
            return
        self._process = None
        end_process_group(process)

    def log(self) -> str:
        """Dovecot's log so far (logins show `method=XOAUTH2`, and `TLS` or `secured`)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Dovecot master (also its process group id)."""
        return None if self._process is None else self._process.pid

    # -- mail ----------------------------------------------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The maildir of `user` (`local@domain`, lower-cased like Dovecot's %Lu) per `mail_location`."""
        local, at, domain = user.lower().rpartition("@")
        return self.mail_root / domain / local if at else self.mail_root / user.lower()

    def messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Raw messages in a mailbox, oldest first (by maildir file name), as stored by Dovecot."""
        root = self.maildir(user)
        folder = root if mailbox.upper() == "INBOX" else root / f".{mailbox}"
        files = [
            path for sub in ("new", "cur") if (folder / sub).is_dir() for path in (folder / sub).iterdir()
        ]
        return [path.read_bytes() for path in sorted(files, key=lambda path: path.name)]

    def deliver(self, user: str, message: bytes, sender: str = "sender@example.com") -> None:
        """Deliver `message` to `user`'s INBOX through Dovecot's LMTP listener."""
        with smtplib.LMTP(self.host, self.ports.lmtp, timeout=30) as lmtp:
            refused = lmtp.sendmail(sender, [user], message)
        if refused:
            raise WorldError(f"LMTP refused {user}: {refused}")

    @staticmethod
    def make_message(sender: str, recipient: str, subject: str, body: str) -> bytes:
        """A small RFC 5322 message with CRLF line ends."""
        lines = [
            f"From: {sender}",
            f"To: {recipient}",
            f"Subject: {subject}",
            f"Date: {email.utils.formatdate()}",
            f"Message-ID: {email.utils.make_msgid(domain='example.com')}",
            "",
            body,
            "",
        ]
        return "\r\n".join(lines).encode()
