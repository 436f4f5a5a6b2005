"""A private Postfix on free loopback ports: submission (STARTTLS) and SMTPS, SASL via Dovecot, LMTP delivery.

Mail for the virtual domain `example.com` is delivered into the private Dovecot over LMTP; mail for any
other domain is accepted and discarded. AUTH is only offered after TLS (`smtpd_tls_auth_only`), and the
mechanisms are the ones the Dovecot auth listener offers (XOAUTH2, OAUTHBEARER). Postfix runs with
`postfix -c DIR start-fg` as a child of the test process in its own process group.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
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
from tests.integration.world.dovecot import DovecotPorts
from tests.integration.world.ports import LOOPBACK, free_ports, wait_listening

MESSAGE_SIZE_LIMIT = 100 * 1024 * 1024
VIRTUAL_DOMAIN = "example.com"
START_TIMEOUT = 20.0
POSTFIX_FILES = Path("/etc/postfix/postfix-files")

# name, type, private, unprivileged, chroot, wakeup, maxproc, command (chroot off everywhere)
_INTERNAL_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass(frozen=True)
class PostfixPorts:
    """The TCP ports (on 127.0.0.1) of one Postfix instance."""

    submission: int  # plain SMTP with STARTTLS; AUTH only after STARTTLS
    smtps: int  # implicit TLS (smtpd_tls_wrappermode)


class Postfix:
    """A private Postfix. `start()` then use `ports`; `stop()`. Logs go to `log_path`."""

    def __init__(self, directory: Path, certs: CertificateFiles, dovecot: DovecotPorts) -> None:
        self.directory = directory
        self.certs = certs
        self.dovecot = dovecot
        self.config_dir = directory / "etc"
        self.queue_dir = directory / "queue"
        self.data_dir = directory / "data"
        self.log_path = directory / "postfix.log"
        self.console_path = directory / "postfix.console"
        submission, smtps = free_ports(2)
        self.ports = PostfixPorts(submission=submission, smtps=smtps)
        self._binary = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._master_pid: int | None = None

    def _main_cf(self) -> str:
        return f"""\
# Private Postfix for the emailproxy integration tests (generated).
compatibility_level = 3.6
config_directory = {self.config_dir}
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log_path}
maillog_file_prefixes = {self.directory}
syslog_name = postfix-test

myhostname = mail.{VIRTUAL_DOMAIN}
mydomain = {VIRTUAL_DOMAIN}
myorigin = {VIRTUAL_DOMAIN}
mydestination =
mynetworks = 127.0.0.1/32
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:local delivery is disabled in the test world
relayhost =
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP test world
smtpd_peername_lookup = no
smtp_dns_support_level = disabled

virtual_mailbox_domains = {VIRTUAL_DOMAIN}
virtual_transport = lmtp:inet:{self.dovecot.host}:{self.dovecot.lmtp}
default_transport = discard:outside the test world
smtpd_reject_unlisted_recipient = no
message_size_limit = {MESSAGE_SIZE_LIMIT}
mailbox_size_limit = 0
virtual_mailbox_limit = 0

smtpd_tls_cert_file = {self.certs.cert_path}
smtpd_tls_key_file = {self.certs.key_path}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_protocols = >=TLSv1.2

smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:{self.dovecot.host}:{self.dovecot.auth}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_sasl_authenticated_header = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject

default_process_limit = 300
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_auth_rate_limit = 0
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 200
in_flow_delay = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""

    def _master_cf(self) -> str:
        return (
            f"{LOOPBACK}:{self.ports.submission} inet n - n - - smtpd\n"
            f"{LOOPBACK}:{self.ports.smtps} inet n - n - - smtpd\n"
            "  -o smtpd_tls_wrappermode=yes\n"
            "  -o smtpd_tls_security_level=encrypt\n" + _INTERNAL_SERVICES
        )

    def start(self) -> None:
        require_root("Postfix")
        self._binary = find_program("postfix")
        postfix_user = pwd.getpwnam("postfix")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        for path in (self.config_dir, self.queue_dir):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # Postfix waits (in 300 ms steps) until a just-written main.cf is a second old; backdate the files.
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))
        self._create_queue_directories()
        require_traversable(self.queue_dir, "postfix")
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(self.config_dir), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        closed = [self.ports.submission, self.ports.smtps]
        while closed and time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            closed = wait_listening(closed, timeout=0.2)
        while not closed and self._read_master_pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._master_pid = self._read_master_pid()
        if closed or self._process.poll() is not None or self._master_pid is None:
            details = log_tail(self.console_path) + "\n" + log_tail(self.log_path)
            self.stop()
            raise WorldError(f"Postfix did not start (ports not listening: {closed}):\n{details}")

    def _read_master_pid(self) -> int | None:
        """The master daemon's PID; it calls setsid(), so it leads its own process group."""
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _create_queue_directories(self) -> None:
        """Create the queue directories as /etc/postfix/postfix-files describes them, then mark the queue
        `quick-start` so that `start-fg` skips its integrity checks (a first `postfix check` takes ~2 s)."""
        owners = {"$mail_owner": "postfix", "$setgid_group": "postdrop", "root": "root", "-": "root"}
        created = 0
        for line in POSTFIX_FILES.read_text().splitlines():
            fields = line.split(":")
            if len(fields) < 5 or not fields[0].startswith("$queue_directory/") or fields[1] != "d":
                continue
            path = self.queue_dir / fields[0].removeprefix("$queue_directory/")
            path.mkdir(exist_ok=True)
            uid = pwd.getpwnam(owners[fields[2]]).pw_uid
            gid = (
                grp.getgrnam(owners[fields[3]]).gr_gid
                if fields[3] != "-"
                else pwd.getpwnam(owners[fields[2]]).pw_gid
            )
            os.chown(path, uid, gid)
            path.chmod(int(fields[4], 8))
            created += 1
        if created:
            (self.queue_dir / "quick-start").touch()
        else:
            self._postfix("check")

    def _postfix(self, command: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [self._binary, "-c", str(self.config_dir), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise WorldError(f"postfix {command} failed ({result.returncode}):\n{output}")
        return result

    def stop(self) -> None:
        """Stop the instance (`postfix stop`, then SIGKILL to its process group if it lingers)."""
        process = self._process
        if process is None:
            return
        self._process = None
        master = self._master_pid if self._master_pid is not None else self._read_master_pid()
        self._master_pid = None
        end_process_group(
            process,
            [self._binary, "-c", str(self.config_dir), "stop"],
            other_groups=() if master is None else (master,),
        )

    def log(self) -> str:
        """Postfix's log so far (`sasl_method=XOAUTH2, sasl_username=...`, `status=sent`)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Postfix master daemon (also its process group id); None when not running."""
        return self._master_pid

    def flush(self) -> None:
        """Ask Postfix to retry deferred mail now."""
        self._postfix("flush")
