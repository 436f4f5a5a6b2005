"""Stateful fuzzing of the IMAP, POP3 and SMTP sessions: random interleavings of client bytes, server bytes,
token results and TLS completions, split at random points, checked against the session contract.

The machine and the invariants are in tests/session_model.py; this module gives each protocol its
vocabulary (realistic commands, logins in every form, server replies, garbage) and runs the machines.
The last tests plant a bug in a session and check that the machine notices, so the invariants can fail.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from emailproxy.protocols import sasl
from emailproxy.protocols.events import Action, Log, NeedToken, SendToClient, TokenOk, TokenResult
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession
from emailproxy.protocols.smtp import SmtpSession
from tests.session_dialect import ATOM_TEXT, PREFIX, Dialect, plain_blob
from tests.session_model import SessionMachine

CHALLENGE = b"eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIn0="  # {"status":"400","schemes":"Bearer"}
USERS = st.sampled_from(["user@example.com", "alice"])
_IMAP_TAGGED = re.compile(rb"([A-Za-z0-9]+) [A-Za-z]")


def pick(data: st.DataObject, items: list[bytes], label: str) -> bytes:
    return data.draw(st.sampled_from(items), label=label)


def replies(data: st.DataObject, fragments: list[bytes]) -> bytes:
    """One to three reply fragments, mostly CRLF-terminated, sometimes with bare LF."""
    chosen = data.draw(st.lists(st.sampled_from(fragments), min_size=1, max_size=3), label="replies")
    end = data.draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]), label="line end")
    return b"".join(fragment.replace(b"\r\n", end) + end for fragment in chosen)


# ----------------------------------------------------------------------------------------------- IMAP


def imap_quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class ImapDialect(Dialect):
    session_cls = ImapSession
    upstream_setup = frozenset({b"EP0 CAPABILITY\r\n", b"EP1 STARTTLS\r\n", b"EP2 CAPABILITY\r\n"})
    auth_command = re.compile(rb"\S+ AUTHENTICATE (XOAUTH2|OAUTHBEARER)\r\n|\r\n")
    failure = re.compile(rb"(?m)^\S+ NO (LOGIN|AUTHENTICATE) " + re.escape(PREFIX))
    success = re.compile(rb"\A(\S+ OK|\* PREAUTH)\b", re.I)
    starttls_ok = re.compile(rb" OK Begin TLS negotiation now\r\n$")
    starttls_refused = re.compile(rb" BAD STARTTLS not available\r\n")
    taint = re.compile(rb"(?m)^\+")  # the next client line may go upstream as a continuation
    noop = b"n NOOP\r\n"
    server_flood_line = b"* OK " + b"y" * 30 + b"\r\n"
    literal_slack = True
    greetings = [
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 STARTTLS LOGINDISABLED] hi",
        b"* OK IMAP4rev1 server ready",
        b"* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] hi",
        b"* PREAUTH already logged in",
        b"* BYE too busy",
    ]
    commands = [b"NOOP", b"CAPABILITY", b"ID NIL", b'SELECT "INBOX"', b"ENABLE UTF8=ACCEPT", b"LOGOUT",
                b"IDLE", b"AUTHENTICATE CRAM-MD5", b"AUTHENTICATE XOAUTH2 dXNlcj14AWF1dGg9QmVhcmVyIHgBAQ==",
                b'ID ("name" {4+}\r\ntest)', b"NAMESPACE", b"STATUS INBOX (MESSAGES)"]  # fmt: skip

    def relay_also_ok(self, machine: SessionMachine, line: bytes) -> bool:
        return line.startswith(b"* PREAUTH") or machine.forwarded_authenticate

    def greeting(self, data: st.DataObject) -> bytes:
        return pick(data, self.greetings[:3] * 3 + self.greetings[3:], "greeting") + b"\r\n"

    def command(self, data: st.DataObject, machine: SessionMachine) -> None:
        tag = b"c%d" % machine.fresh()
        kind = data.draw(st.sampled_from(["plain"] * 6 + ["untagged", "sync literal"]), label="kind")
        if kind == "untagged":
            machine.client_payload(data, pick(data, [b"DONE\r\n", b"\r\n", b"* x\r\n"], "untagged"))
            return
        machine.tags.append(tag)
        if kind == "plain":
            machine.client_payload(data, tag + b" " + pick(data, self.commands, "command") + b"\r\n")
            return
        machine.begin_exchange(  # a well-behaved client waits for "+" before a synchronising literal
            data,
            tag + b" APPEND INBOX {5}\r\n",
            prompt=re.compile(rb"(?m)^\+"),
            error=re.compile(rb"(?m)^" + tag + rb" "),
            steps=[(b"hello\r\n", None)],
        )

    def login(self, data: st.DataObject, machine: SessionMachine) -> None:
        tag = b"L%d" % machine.fresh()
        machine.tags.append(tag)
        user = data.draw(USERS, label="user")
        verb = pick(data, [b"LOGIN", b"login", b"Login"], "verb")
        form = data.draw(
            st.sampled_from(
                ["atom", "quoted", "literal", "literal+", "literal steps", "plain", "plain two", "authzid"]
            ),
            label="form",
        )
        head = tag + b" " + verb + b" "
        if form == "atom":
            password = machine.password(data, ATOM_TEXT)
            machine.new_login(user, password)
            machine.client_payload(data, head + user.encode() + b" " + password.encode() + b"\r\n")
        elif form == "quoted":
            password = machine.password(data)
            machine.new_login(user, password)
            machine.client_payload(data, head + imap_quoted(user) + b" " + imap_quoted(password) + b"\r\n")
        elif form in ("literal", "literal+"):
            password = machine.password(data)
            raw_user, raw = user.encode(), password.encode()
            plus = b"+" if form == "literal+" else b""
            # a synchronising literal sent without waiting is only safe if the proxy accepts it
            fits = max(len(raw_user), len(raw)) <= machine.options.max_literal
            machine.new_login(user, password, vouched=bool(plus) or fits)
            payload = head + b"{%d%s}\r\n%s {%d%s}\r\n%s\r\n" % (
                len(raw_user),
                plus,
                raw_user,
                len(raw),
                plus,
                raw,
            )
            machine.client_payload(data, payload)
        elif form == "literal steps":
            password = machine.password(data)
            raw = password.encode()
            machine.new_login(user, password)
            machine.begin_exchange(
                data,
                head + imap_quoted(user) + b" {%d}\r\n" % len(raw),
                prompt=re.compile(rb"(?m)^\+ Ready for literal data\r\n"),
                error=re.compile(rb"(?m)^" + tag + rb" BAD "),
                steps=[(raw + b"\r\n", None)],
            )
        else:
            password = machine.password(data)
            blob = plain_blob(user, password, "admin" if form == "authzid" else "")
            machine.new_login(user, password, blob)
            middle = b"\r\n" if form == "plain two" else b" "
            machine.client_payload(data, tag + b" AUTHENTICATE PLAIN" + middle + blob + b"\r\n")

    def starttls(self, marker: bytes, machine: SessionMachine) -> bytes:
        number = machine.fresh()
        machine.tags.append(b"i%d" % number)
        return b"t%d STARTTLS\r\ni%d NOOP %s\r\n" % (number, number, marker)

    def server_reply(self, data: st.DataObject, machine: SessionMachine) -> bytes:
        tags = [*machine.tags[-3:], b"EP0", b"EP1", b"EP2", b"*"]
        tag = pick(data, tags, "tag")
        fragments = [
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2 SASL-IR",
            b"* CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER LOGINDISABLED",
            tag + b" OK done",
            tag + b" OK done",
            tag + b" OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ok",
            tag + b" NO [AUTHENTICATIONFAILED] nope",
            tag + b" BAD syntax",
            b"* 1 EXISTS",
            b"* 1 FETCH (BODY[] {5}\r\nhello)",
            b'* ID ("name" "srv")',
            b"* BYE shutting down",
            *self.greetings,
        ]
        return replies(data, fragments)

    def server_continuation(self, data: st.DataObject) -> bytes:
        return pick(data, [b"+ ", b"+ " + CHALLENGE, b"+ go ahead", b"+"], "continuation") + b"\r\n"

    def good_greetings(self) -> list[bytes]:
        return self.greetings[:-1]

    def sensible(self, machine: SessionMachine) -> list[bytes]:
        if not machine.upstream:
            return []
        last = machine.upstream[-1]
        if last == b"EP0 CAPABILITY\r\n":
            return [
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2\r\nEP0 OK",
                b"* CAPABILITY IMAP4rev1\r\nEP0 OK",
            ]
        if last == b"EP1 STARTTLS\r\n":
            return [b"EP1 OK begin TLS", b"EP1 OK begin TLS", b"EP1 NO not now"]
        if last == b"EP2 CAPABILITY\r\n":
            return [
                b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\nEP2 OK",
                b"* CAPABILITY IMAP4rev1\r\nEP2 OK",
            ]
        tagged = [m.group(1) for m in map(_IMAP_TAGGED.match, machine.upstream) if m]
        tag = tagged[-1] if tagged else b"*"
        if re.fullmatch(rb"\S+ AUTHENTICATE (XOAUTH2|OAUTHBEARER)\r\n", last):
            return [b"+ ", b"+ ", tag + b" NO no such mechanism"]
        if machine.auth_phase:  # the token went up
            return [tag + b" OK [CAPABILITY IMAP4rev1 IDLE] logged in"] * 3 + [
                b"+ " + CHALLENGE,
                tag + b" NO bad",
            ]
        return [
            tag + b" OK done",
            tag + b" OK done",
            b"* 1 EXISTS\r\n" + tag + b" OK done",
            tag + b" NO nope",
        ]


# ----------------------------------------------------------------------------------------------- POP3


class PopDialect(Dialect):
    session_cls = PopSession
    upstream_setup = frozenset({b"STLS\r\n"})
    auth_command = re.compile(rb"AUTH (XOAUTH2|OAUTHBEARER)\r\n|\r\n")
    failure = re.compile(rb"-ERR Authentication failed\. " + re.escape(PREFIX))
    success = re.compile(rb"\A\+OK")
    starttls_ok = re.compile(rb"^\+OK Begin TLS negotiation\r\n$")
    starttls_refused = re.compile(rb"-ERR STLS not available\r\n")
    noop = b"NOOP\r\n"
    server_flood_line = b"y" * 30 + b"\r\n"
    greetings = [b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>", b"+OK ready", b"-ERR busy"]
    commands = [b"CAPA", b"STAT", b"LIST", b"LIST 1", b"UIDL", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"NOOP",
                b"RSET", b"QUIT", b"AUTH", b"AUTH CRAM-MD5", b"APOP mrose c4c9334bac560ecc979e58001b3e22fb",
                b"", b"XTND XMIT", b"USER bob\r\nNOOP", b"capa"]  # fmt: skip

    def greeting(self, data: st.DataObject) -> bytes:
        return pick(data, self.greetings[:2] * 3 + self.greetings[2:], "greeting") + b"\r\n"

    def command(self, data: st.DataObject, machine: SessionMachine) -> None:
        machine.client_payload(data, pick(data, self.commands, "command") + b"\r\n")

    def login(self, data: st.DataObject, machine: SessionMachine) -> None:
        user = data.draw(USERS, label="user")
        form = data.draw(st.sampled_from(["user pass", "plain", "plain two", "pass only"]), label="form")
        password = machine.password(data)
        if form == "user pass":
            machine.new_login(user, password)
            verbs = pick(data, [b"USER %s\r\nPASS %s\r\n", b"user %s\r\npass %s\r\n"], "verbs")
            machine.client_payload(data, verbs % (user.encode(), password.encode()))
        elif form == "pass only":  # PASS without USER: refused, never a NeedToken
            machine.new_login("(no USER: must not ask for a token)", password)
            machine.client_payload(data, b"PASS " + password.encode() + b"\r\n")
        else:
            blob = plain_blob(user, password)
            machine.new_login(user, password, blob)
            verb = pick(data, [b"AUTH PLAIN", b"auth plain"], "verb")
            machine.client_payload(data, verb + (b"\r\n" if form == "plain two" else b" ") + blob + b"\r\n")

    def starttls(self, marker: bytes, machine: SessionMachine) -> bytes:
        return b"STLS\r\nNOOP " + marker + b"\r\n"

    def server_reply(self, data: st.DataObject, machine: SessionMachine) -> bytes:
        fragments = [
            b"+OK",
            b"+OK done",
            b"-ERR no such message",
            b"+OK 2 messages:\r\n1 120\r\n2 200\r\n.",
            b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\nSTLS\r\n.",
            b"+OK\r\nSASL OAUTHBEARER\r\n.",
            b"+OK message follows\r\nSubject: x\r\n\r\n..dot\r\n.",
            b".",
            b"-ERR [AUTH] Authentication failed",
            b"+OK Logged in.",
            b"+OK Begin TLS",
            b"-ERR STLS unavailable",
            *self.greetings,
        ]
        return replies(data, fragments)

    def server_continuation(self, data: st.DataObject) -> bytes:
        return pick(data, [b"+ ", b"+ " + CHALLENGE, b"+"], "continuation") + b"\r\n"

    def good_greetings(self) -> list[bytes]:
        return self.greetings[:-1]

    def sensible(self, machine: SessionMachine) -> list[bytes]:
        if not machine.upstream:
            return []
        last = machine.upstream[-1].upper()
        if last == b"STLS\r\n":
            return [b"+OK Begin TLS", b"+OK Begin TLS", b"-ERR not now"]
        if last.startswith(b"AUTH "):
            return [b"+ ", b"+ ", b"-ERR unknown mechanism"]
        if machine.auth_phase:  # the token went up
            return [b"+OK Logged in."] * 3 + [b"+ " + CHALLENGE, b"-ERR [AUTH] failed"]
        if last.startswith(b"CAPA"):
            return [b"+OK\r\nTOP\r\nSASL XOAUTH2 OAUTHBEARER\r\nSTLS\r\n.", b"+OK\r\nSASL OAUTHBEARER\r\n."]
        if last.startswith((b"LIST\r", b"UIDL\r", b"RETR", b"TOP")):
            return [b"+OK follows\r\n1 120\r\n..x\r\n.", b"-ERR no"]
        return [b"+OK", b"+OK done", b"-ERR no"]


# ----------------------------------------------------------------------------------------------- SMTP

SMTP_ERROR = re.compile(rb"(?m)^50[134] 5\.5\.\d ")  # the proxy's local answers that end an AUTH exchange


class SmtpDialect(Dialect):
    session_cls = SmtpSession
    upstream_setup = frozenset({b"EHLO localhost\r\n", b"STARTTLS\r\n"})
    auth_command = re.compile(rb"AUTH (XOAUTH2|OAUTHBEARER)\r\n|\r\n")
    failure = re.compile(rb"535 5\.7\.8  Authentication credentials invalid\. " + re.escape(PREFIX))
    success = re.compile(rb"(\A|\n)235( [^\n]*)?\r?\n\Z")  # the last line decides
    starttls_ok = re.compile(rb"^220 2\.0\.0 Ready to start TLS\r\n$")
    starttls_refused = re.compile(rb"454 4\.7\.0 STARTTLS not available\r\n")
    taint = re.compile(rb"(?m)^334")  # the client would take it for the proxy's own prompt
    noop = b"NOOP\r\n"
    opening = b"EHLO client.example\r\n"
    server_flood_line = b"250-" + b"y" * 30 + b"\r\n"
    greetings = [b"220 mx.example.com ESMTP", b"220-mx.example.com\r\n220 ready", b"554 5.3.2 no service"]
    commands = [b"EHLO client.example", b"EHLO client.example", b"HELO client.example", b"ehlo x", b"NOOP",
                b"RSET", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"VRFY postmaster",
                b"HELP", b"QUIT", b"", b"DATA\r\nSubject: t\r\n\r\nbody\r\n..dot\r\n.",
                b"BDAT 10 LAST\r\nline1\r\nx.y", b"BDAT 0 LAST", b"AUTH", b"AUTH CRAM-MD5",
                b"AUTH PLAIN ="]  # fmt: skip

    def greeting(self, data: st.DataObject) -> bytes:
        return pick(data, self.greetings[:2] * 3 + self.greetings[2:], "greeting") + b"\r\n"

    def command(self, data: st.DataObject, machine: SessionMachine) -> None:
        machine.client_payload(data, pick(data, self.commands, "command") + b"\r\n")

    def login(self, data: st.DataObject, machine: SessionMachine) -> None:
        user = data.draw(USERS, label="user")
        password = machine.password(data)
        b64_user, b64_password = sasl.b64encode(user), sasl.b64encode(password)
        form = data.draw(st.sampled_from(["plain", "plain steps", "login steps", "login ir"]), label="form")
        # a client says EHLO before AUTH (pipelined here); without a 250 for it the proxy answers 503
        ehlo = b"" if b"EHLO" in machine.client_stream.upper() else self.opening
        if form.startswith("plain"):
            blob = plain_blob(user, password)
            machine.new_login(user, password, blob)
            verb = pick(data, [b"AUTH PLAIN", b"auth plain"], "verb")
            if form == "plain":
                machine.client_payload(data, ehlo + verb + b" " + blob + b"\r\n")
                return
            prompt = re.compile(rb"(?m)^334 \r\n")
            machine.begin_exchange(data, ehlo + verb + b"\r\n", prompt, SMTP_ERROR, [(blob + b"\r\n", None)])
            return
        machine.new_login(user, password, b64_password)
        ask_password = re.compile(rb"(?m)^334 UGFzc3dvcmQ6\r\n")
        if form == "login ir":
            first = ehlo + b"AUTH LOGIN " + b64_user + b"\r\n"
            machine.begin_exchange(data, first, ask_password, SMTP_ERROR, [(b64_password + b"\r\n", None)])
            return
        machine.begin_exchange(
            data,
            ehlo + b"AUTH LOGIN\r\n",
            re.compile(rb"(?m)^334 VXNlcm5hbWU6\r\n"),
            SMTP_ERROR,
            [(b64_user + b"\r\n", ask_password), (b64_password + b"\r\n", None)],
        )

    def starttls(self, marker: bytes, machine: SessionMachine) -> bytes:
        return b"STARTTLS\r\nNOOP " + marker + b"\r\n"

    def server_reply(self, data: st.DataObject, machine: SessionMachine) -> bytes:
        fragments = [
            b"250-mx.example.com\r\n250-PIPELINING\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n"
            b"250-STARTTLS\r\n250 8BITMIME",
            b"250-mx.example.com\r\n250-AUTH=LOGIN OAUTHBEARER\r\n250 STARTTLS",
            b"250-mx.example.com\r\n250 SIZE 1000",
            b"250 2.0.0 OK",
            b"250 ok",
            b"354 go ahead",
            b"235 2.7.0 Accepted",
            b"535 5.7.8 Username and Password not accepted",
            b"504 5.7.4 Unrecognized authentication type",
            b"421 4.7.0 closing",
            b"220 2.0.0 ready for TLS",
            b"454 4.7.0 TLS not available",
            b"500 5.5.1 unknown command",
            b"250-partial",
            b"221 2.0.0 bye",
            *self.greetings,
        ]
        return replies(data, fragments)

    def server_continuation(self, data: st.DataObject) -> bytes:
        return pick(data, [b"334 ", b"334 " + CHALLENGE, b"334 VXNlcm5hbWU6"], "continuation") + b"\r\n"

    def good_greetings(self) -> list[bytes]:
        return self.greetings[:-1]

    def sensible(self, machine: SessionMachine) -> list[bytes]:
        if not machine.upstream:
            return []
        last = machine.upstream[-1].upper()
        ehlo = [b"250-mx.example.com\r\n250-AUTH PLAIN XOAUTH2\r\n250-STARTTLS\r\n250 8BITMIME",
                b"250-mx.example.com\r\n250 AUTH OAUTHBEARER"]  # fmt: skip
        if last == b"STARTTLS\r\n":
            return [b"220 2.0.0 ready", b"220 2.0.0 ready", b"454 4.7.0 not now"]
        if last.startswith(b"EHLO"):
            return ehlo
        if last.startswith(b"AUTH "):
            return [b"334 ", b"334 ", b"504 5.7.4 unknown mechanism"]
        if machine.auth_phase:  # the token went up
            return [b"235 2.7.0 Accepted"] * 3 + [b"334 " + CHALLENGE, b"535 5.7.8 bad"]
        if last.startswith(b"DATA"):
            return [b"354 go ahead", b"554 5.5.1 no valid recipients"]
        return [b"250 2.0.0 OK", b"250 ok", b"550 no"]


# ----------------------------------------------------------------------------------------------- runs

#: EMAILPROXY_FUZZ_SCALE=20 runs twenty times as many examples (a deeper run by hand; CI keeps 1)
SCALE = int(os.environ.get("EMAILPROXY_FUZZ_SCALE", "1"))
STATEFUL = settings(
    max_examples=30 * SCALE,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class ImapMachine(SessionMachine):
    dialect = ImapDialect()


class PopMachine(SessionMachine):
    dialect = PopDialect()


class SmtpMachine(SessionMachine):
    dialect = SmtpDialect()


TestImapStateful = ImapMachine.TestCase
TestImapStateful.settings = STATEFUL
TestPopStateful = PopMachine.TestCase
TestPopStateful.settings = STATEFUL
TestSmtpStateful = SmtpMachine.TestCase
TestSmtpStateful.settings = STATEFUL


# ---------------------------------------------------------------------------------- the invariants bite

MUTANT = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


class PasswordLoggingImap(ImapSession):
    def client_data(self, data: bytes) -> list[Action]:
        actions = super().client_data(data)
        leaks = [Log(20, f"login {a.password.reveal()}") for a in actions if isinstance(a, NeedToken)]
        return actions + leaks


class TokenEchoingPop(PopSession):
    def token_result(self, result: TokenResult) -> list[Action]:
        actions = super().token_result(result)
        if isinstance(result, TokenOk) and any(not isinstance(a, Log) for a in actions):
            actions.append(SendToClient(result.access_token.reveal().encode()))
        return actions


class ChattySmtp(SmtpSession):
    def server_data(self, data: bytes) -> list[Action]:
        if self._finished:
            return [SendToClient(b"250 still here\r\n")]
        return super().server_data(data)


@pytest.mark.parametrize(
    ("machine", "session_cls", "complaint"),
    [
        (ImapMachine, PasswordLoggingImap, "password logged"),
        (PopMachine, TokenEchoingPop, "token sent to the client"),
        (SmtpMachine, ChattySmtp, "actions after Relay/Close"),
    ],
)
def test_the_machines_catch_a_planted_bug(
    machine: type[SessionMachine], session_cls: type, complaint: str
) -> None:
    mutant = type("Mutant" + machine.__name__, (machine,), {"session_cls": session_cls})
    with pytest.raises(AssertionError, match=complaint):
        run_state_machine_as_test(mutant, settings=MUTANT)  # type: ignore[no-untyped-call]
