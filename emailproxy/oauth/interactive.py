"""The broker of interactive authorisations: one pending authorisation per account, shared by every
login that needs it, running in the background until a person completes it.

The TokenManager hands over an :class:`AuthorisationRequest` when an account needs a person (no usable
token and an ``authorization_code`` or ``device`` flow). The first request for an account starts a
pending authorisation: for the authorization-code flow a ``state`` (and the token client's PKCE),
an authorize URL logged as ``Please visit the following URL to authenticate account <user>: <url>``
and a callback expected by the shared :class:`~emailproxy.oauth.redirect.RedirectListener` (or pasted
into a terminal with ``--external-auth``); for the device flow a device code, logged and polled for.
Later requests for the same account join it. Each waiting client is held for at most
``wait_seconds``; then it gets a TokenFailure that tells it what to do (the URL or the code) while the
authorisation stays pending. When it completes, the token response is handed to the request's
``complete`` callback (the TokenManager encrypts it with the password of the login that started it
and saves it), and every waiting login logs in again through the normal path, which now finds the
token. All token requests go through a :class:`~emailproxy.oauth.client.TokenClient`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO, TypeVar

from emailproxy.config import AccountConfig, Config
from emailproxy.oauth import authcode, device, flows
from emailproxy.oauth.client import TokenClient, as_client
from emailproxy.oauth.credentials import CredentialError
from emailproxy.oauth.endpoint import TokenEndpointError, TokenEndpointProtocol, TokenNetworkError
from emailproxy.oauth.redirect import (
    PageData,
    PendingView,
    RedirectListener,
    ResultView,
    listen_address,
    redirect_addresses,
)
from emailproxy.protocols.events import TokenFailure, TokenOk, TokenResult

logger = logging.getLogger("emailproxy.authorisation")

#: how long a mail client's login is held while an authorisation is pending (``authorisation_wait_seconds``)
DEFAULT_WAIT_SECONDS = 60.0
#: how long an authorization-code request stays open for its redirect
CODE_LIFETIME = 3600.0
#: how long a client waits at most for the device code to be known, to put it into its error text
READY_GRACE = 15.0
RECENT_RESULTS = 20

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorisationRequest:
    """What the broker needs from the TokenManager to run one account's interactive flow.

    ``client_secret`` is the secret the token client authenticates with (None: certificate or public
    client). ``complete`` saves a token response (encrypting it with the starting login's password) and
    returns the resulting TokenOk or TokenFailure.
    """

    account: AccountConfig
    username: str
    client_secret: str | None = dataclasses.field(repr=False)
    complete: Callable[[Mapping[str, Any]], Awaitable[TokenResult]] = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class InteractionNeeded:
    """Returned by the TokenManager's login step when a person must authorise the account."""

    request: AuthorisationRequest


@dataclasses.dataclass(frozen=True, slots=True)
class Authorised:
    """The authorisation completed and its tokens were saved: log in again to use them."""


Outcome = Authorised | TokenFailure
Relogin = Callable[[], Awaitable["TokenResult | InteractionNeeded"]]
Announcer = Callable[["PendingAuthorisation"], None]


def code_message(username: str, url: str) -> str:
    """The log line vendors tell users to search for (the reference's exact wording)."""
    return f"Please visit the following URL to authenticate account {username}: {url}"


def device_message(username: str, uri: str, code: str) -> str:
    return f"Please visit {uri} and enter the code {code} to authenticate account {username}"


def _failure(username: str, reason: str) -> TokenFailure:
    return TokenFailure(f"Login failed for account {username}: {reason}")


class PendingAuthorisation:
    """One account's authorisation in progress. ``done`` resolves to Authorised or a TokenFailure."""

    def __init__(self, key: str, request: AuthorisationRequest, started: float) -> None:
        self.key = key
        self.request = request
        self.username = request.username
        self.flow = flows.effective_flow(request.account) or flows.AUTHORIZATION_CODE
        self.started = started
        self.done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        #: set once the link or code is known (the device flow asks the provider for it first)
        self.ready = asyncio.Event()
        self.link: str | None = None
        self.user_code: str | None = None
        self.state: str | None = None
        self.callback: asyncio.Future[authcode.Callback] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PendingAuthorisation({self.username!r}, flow={self.flow!r})"

    @property
    def is_device(self) -> bool:
        return self.user_code is not None

    def instructions(self) -> str:
        if self.user_code is not None and self.link is not None:
            return device_message(self.username, self.link, self.user_code)
        if self.link is not None:
            return code_message(self.username, self.link)
        return f"An authorisation for account {self.username} has been started; see the proxy's log"

    def waiting_failure(self) -> TokenFailure:
        """What a client that cannot wait any longer is told: what to do, then log in again."""
        return _failure(
            self.username,
            f"authorisation needed. {self.instructions()} - then log in again",
        )

    def deliver(self, callback: authcode.Callback) -> None:
        if not self.callback.done():
            self.callback.set_result(callback)

    def view(self) -> PendingView:
        return PendingView(self.username, self.started, self.link, self.user_code)


class AuthorisationBroker:
    """Runs interactive flows, one per account at a time; see the module docstring.

    ``wait_seconds`` None holds each login until its authorisation finishes (the ``authorize`` command).
    ``client`` obtains the tokens (a bare token endpoint is wrapped in the routing TokenClients).
    """

    def __init__(
        self,
        client: TokenClient | TokenEndpointProtocol,
        listener: RedirectListener | None = None,
        *,
        wait_seconds: float | None = DEFAULT_WAIT_SECONDS,
        code_lifetime: float = CODE_LIFETIME,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._client = as_client(client)
        self.listener = listener if listener is not None else RedirectListener()
        self.listener.page_source = self.page
        self.wait_seconds = wait_seconds
        self.code_lifetime = code_lifetime
        self._clock = clock
        self._sleep = sleep
        self._pending: dict[str, PendingAuthorisation] = {}
        self._results: collections.deque[ResultView] = collections.deque(maxlen=RECENT_RESULTS)
        #: called with each new pending authorisation once its link or code is known
        self.announcers: list[Announcer] = []

    def __repr__(self) -> str:
        return f"AuthorisationBroker(pending={sorted(self._pending)}, wait_seconds={self.wait_seconds})"

    @classmethod
    def for_config(cls, config: Config, client: TokenClient | TokenEndpointProtocol) -> AuthorisationBroker:
        """The proxy's broker, with a redirect listener set up from ``[emailproxy]`` options."""
        listener = RedirectListener(allow_remote_page=config.options.allow_remote_authorisation_page)
        return cls(client, listener, wait_seconds=config.options.authorisation_wait_seconds)

    async def configure(self, config: Config) -> None:
        """Apply (re)loaded options, and listen on every redirect address the accounts need."""
        self.wait_seconds = config.options.authorisation_wait_seconds
        self.listener.allow_remote_page = config.options.allow_remote_authorisation_page
        for address in redirect_addresses(config):
            await self.listener.ensure(address)

    def start_terminal(self, stdin: TextIO | None = None, *, prompt: bool = True) -> bool:
        """``--external-auth``: also accept redirect URLs pasted into the terminal, when there is one.

        ``prompt`` prints a request to paste for each new authorization-code request. False without a TTY.
        """
        stream = stdin if stdin is not None else sys.stdin
        if stream is None or not stream.isatty():
            logger.warning(
                "--external-auth needs a terminal (stdin is not a TTY), so pasted URLs cannot be read; "
                "authorisation redirects are still received by the redirect listener"
            )
            return False
        TerminalPaste(self, stream, prompt=prompt).start()
        return True

    async def stop(self) -> None:
        """Stop pending authorisations and the redirect listener (the proxy is stopping)."""
        await self.close()
        await self.listener.close()

    # ------------------------------------------------------------------------------------ entry points

    async def login(self, request: AuthorisationRequest, relogin: Relogin) -> TokenResult:
        """Authorise (or join the pending authorisation), then log in again through the normal path."""
        outcome = await self.authorise(request)
        if isinstance(outcome, TokenFailure):
            return outcome
        result = await relogin()
        if not isinstance(result, InteractionNeeded):
            return result
        # the new tokens did not serve this login (another password, say): do not hold it a second time
        again = await self.authorise(result.request, wait=0.0)
        if isinstance(again, TokenFailure):
            return again
        return _failure(request.username, "the authorisation completed, but this login could not use it")

    async def authorise(self, request: AuthorisationRequest, wait: float | None = -1.0) -> Outcome:
        """Start or join the account's pending authorisation; wait for it up to ``wait`` seconds
        (default: ``wait_seconds``; None: until it finishes)."""
        key = request.account.section.casefold()
        pending = self._pending.get(key)
        if pending is None or pending.done.done():
            pending = self._start(key, request)
        else:
            logger.info("Login for account %s joins the pending authorisation", request.username)
        limit = self.wait_seconds if wait is not None and wait < 0 else wait
        try:
            return await asyncio.wait_for(asyncio.shield(pending.done), limit)
        except TimeoutError:
            pass
        if not pending.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.ready.wait(), READY_GRACE)
        if pending.done.done():
            return pending.done.result()
        logger.info(
            "Login for account %s: authorisation still pending; telling the client what to do",
            request.username,
        )
        return pending.waiting_failure()

    def deliver_pasted_url(self, text: str) -> str:
        """``--external-auth``: route a URL pasted from a browser. Returns what to tell the user."""
        try:
            path, query = authcode.split_pasted_url(text)
        except authcode.CallbackError as exc:
            return f"Not accepted: {exc}"
        routed = self.listener.route(path, query)
        return routed.message

    def pending(self) -> list[PendingAuthorisation]:
        return [item for item in self._pending.values() if not item.done.done()]

    def page(self) -> PageData:
        views = [item.view() for item in self.pending() if item.ready.is_set()]
        return PageData(now=self._clock(), pending=views, results=list(reversed(self._results)))

    async def close(self) -> None:
        """Stop every pending authorisation (the proxy is stopping)."""
        tasks = []
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_result(_failure(pending.username, "the proxy is stopping"))
            if pending.task is not None:
                pending.task.cancel()
                tasks.append(pending.task)
        self._pending.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------ running

    def _start(self, key: str, request: AuthorisationRequest) -> PendingAuthorisation:
        pending = PendingAuthorisation(key, request, self._clock())
        self._pending[key] = pending
        pending.task = asyncio.get_running_loop().create_task(self._run(pending))
        return pending

    async def _run(self, pending: PendingAuthorisation) -> None:
        logger.info("Starting the %s authorisation of account %s", pending.flow, pending.username)
        try:
            if pending.flow == flows.DEVICE:
                response = await self._device_flow(pending)
            else:
                response = await self._code_flow(pending)
            result = await pending.request.complete(response)
        except _FlowFailed as failed:
            result = _failure(pending.username, failed.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("Unexpected error in the authorisation of account %s", pending.username)
            result = _failure(
                pending.username, f"internal error during the authorisation ({type(exc).__name__})"
            )
        finally:
            if pending.state is not None:
                self.listener.forget(pending.state)
            pending.ready.set()
            if self._pending.get(pending.key) is pending:
                del self._pending[pending.key]
        if isinstance(result, TokenOk):
            logger.info("Authorisation of account %s complete; its tokens are saved", pending.username)
            self._record(pending.username, True, "tokens saved")
            outcome: Outcome = Authorised()
        else:
            logger.error("Authorisation of account %s failed: %s", pending.username, result.message)
            self._record(pending.username, False, result.message)
            outcome = result
        if not pending.done.done():
            pending.done.set_result(outcome)

    def _record(self, username: str, ok: bool, detail: str) -> None:
        self._results.append(ResultView(username, ok, detail, self._clock()))

    def _announce(self, pending: PendingAuthorisation) -> None:
        pending.ready.set()
        for announce in list(self.announcers):
            try:
                announce(pending)
            except Exception:
                logger.exception("Could not announce the authorisation of account %s", pending.username)

    async def _call(self, what: str, work: Callable[..., T], *args: Any) -> T:
        """Run a blocking token-client call in a thread; its errors become a _FlowFailed naming ``what``."""
        try:
            return await asyncio.to_thread(work, *args)
        except CredentialError as exc:  # name the problem, keep going no further
            raise _FlowFailed(str(exc)) from None
        except TokenEndpointError as exc:
            raise _FlowFailed(f"{what} failed: {exc}") from None
        except TokenNetworkError as exc:
            raise _FlowFailed(
                f"{what} failed - please check your internet connection and retry ({exc})"
            ) from None

    async def _code_flow(self, pending: PendingAuthorisation) -> dict[str, Any]:
        request = pending.request
        account = request.account
        if not account.redirect_uri:
            raise _FlowFailed("the authorization code flow needs a redirect_uri in the account's settings")
        state = authcode.new_state()
        client = self._client
        begun = await self._call(
            "preparing the sign-in",
            client.begin_code,
            account,
            request.username,
            state,
            request.client_secret,
        )
        pending.link = begun.url
        address = listen_address(account)
        if address is not None:
            await self.listener.ensure(address)
        pending.state = state
        self.listener.expect(state, account.redirect_uri, request.username, pending.deliver)
        logger.info("%s", code_message(request.username, pending.link))
        self._announce(pending)
        try:
            callback = await asyncio.wait_for(asyncio.shield(pending.callback), self.code_lifetime)
        except TimeoutError:
            raise _FlowFailed(f"no authorisation response within {self.code_lifetime:g} s") from None
        if callback.error is not None:
            detail = f"; {callback.error_description}" if callback.error_description else ""
            raise _FlowFailed(f"the sign-in was refused ({callback.error}{detail})")
        logger.info("Redeeming the authorisation code of account %s", request.username)
        return await self._call(
            "the token request", client.redeem_code, account, begun, callback, request.client_secret
        )

    async def _device_flow(self, pending: PendingAuthorisation) -> dict[str, Any]:
        request = pending.request
        account = request.account
        client = self._client
        try:
            authorization = await self._call(
                "the device code request", client.start_device, account, request.client_secret
            )
        except device.DeviceFlowError as exc:
            raise _FlowFailed(str(exc)) from None
        started = time.monotonic()
        pending.link = authorization.link
        pending.user_code = authorization.user_code
        logger.info("%s", device_message(request.username, authorization.link, authorization.user_code))
        self._announce(pending)

        async def poll_once() -> dict[str, Any]:
            try:
                return await asyncio.to_thread(
                    client.poll_device, account, authorization, request.client_secret
                )
            except CredentialError as exc:
                raise _FlowFailed(str(exc)) from None

        try:
            return await device.poll(
                poll_once, authorization, started=started, sleep=self._sleep, username=request.username
            )
        except device.DeviceFlowError as exc:
            raise _FlowFailed(f"the device authorisation ended: {exc}") from None


class _FlowFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TerminalPaste:
    """``--external-auth``: read redirect URLs pasted into the terminal and deliver them.

    A daemon thread reads lines (it never blocks shutdown); each line is handed to the broker on the
    event loop. Every new authorization-code request prints a prompt.
    """

    def __init__(
        self,
        broker: AuthorisationBroker,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        *,
        prompt: bool = True,
    ) -> None:
        self._broker = broker
        self._prompt_enabled = prompt
        self._stream = stream if stream is not None else sys.stdin
        self._out = out if out is not None else sys.stderr
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._prompt_enabled:
            self._broker.announcers.append(self._prompt)
        self._thread = threading.Thread(target=self._read, name="emailproxy-paste", daemon=True)
        self._thread.start()

    def _prompt(self, pending: PendingAuthorisation) -> None:
        if pending.is_device:
            return
        print(
            f"\n{code_message(pending.username, pending.link or '')}\n"
            f"After signing in, paste the full address the browser ended on here and press Return:",
            file=self._out,
            flush=True,
        )

    def _read(self) -> None:
        loop = self._loop
        assert loop is not None
        for line in self._stream:
            text = line.strip()
            if text:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self._deliver, text)

    def _deliver(self, text: str) -> None:
        print(self._broker.deliver_pasted_url(text), file=self._out, flush=True)
