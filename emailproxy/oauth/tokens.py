"""TokenManager: from a login (user name + local password) to an OAuth 2.0 access token.

It keeps the reference's token cache (encrypted with a key derived from the local password) in the
account's config section, and adds what the reference lacks:

* single-flight per account: concurrent logins for one account wait for one refresh or fetch;
* derived keys cached in memory, so a login with a cached token costs microseconds;
* only a rejected grant (HTTP 400 / ``invalid_grant``) discards tokens; network errors and 5xx keep
  the cache and give a retryable error.

The :class:`~emailproxy.config.Config` object is frozen, so after the first load the per-account state
held here is authoritative; every change is written through a :class:`TokenStore`. Blocking work
(PBKDF2, HTTP, file writes) runs in worker threads. No secret is ever logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from emailproxy.config import AccountConfig, CachedTokens, Config
from emailproxy.oauth import credentials, flows, localpassword
from emailproxy.oauth.client import TokenClient, as_client
from emailproxy.oauth.crypto import (
    ITERATIONS,
    Decrypted,
    DecryptionFailed,
    KeyCache,
    KeyNotCached,
    TokenCrypto,
    decode_salt,
    new_salt,
    parse_iterations,
)
from emailproxy.oauth.endpoint import TokenEndpointError, TokenEndpointProtocol, TokenNetworkError
from emailproxy.oauth.interactive import AuthorisationBroker, AuthorisationRequest, InteractionNeeded
from emailproxy.protocols.events import TokenFailure, TokenOk, TokenResult
from emailproxy.secret import Secret

logger = logging.getLogger("emailproxy.tokens")

#: A cached access token is used only while it has at least this many seconds left (the reference's value).
TOKEN_EXPIRY_MARGIN = 600
#: Lifetime assumed when a token response has no ``expires_in``.
DEFAULT_TOKEN_LIFETIME = 3600

T = TypeVar("T")
_LoginResult = TokenResult | InteractionNeeded


class TokenStore(Protocol):
    """Persists cache keys of one account section. ``None`` deletes a key. Blocking; may raise OSError."""

    def save(self, section: str, changes: Mapping[str, str | None]) -> None: ...


# ---------------------------------------------------------------------------------------------- messages
# The reference's wording (reference-behaviour 4.6), without the "Email OAuth 2.0 Proxy: " prefix.


def no_entry_message(username: str) -> str:
    return (
        f"No config file entry found for account {username} - please add a new section with values for "
        "permission_url, token_url, oauth2_scope, redirect_uri, client_id and client_secret"
    )


def incomplete_message(username: str) -> str:
    return (
        f"Incomplete config file entry found for account {username} - please make sure all required "
        "fields are added (at least token_url, oauth2_scope and client_id)"
    )


def no_flow_message(username: str) -> str:
    return (
        f"Incomplete config file entry found for account {username} - please make sure an `oauth2_flow` "
        "value is specified when using a method that does not require a `permission_url`"
    )


def no_password_message(username: str) -> str:
    return f"Login failed - no password provided for account {username}"


def wrong_password_message(username: str) -> str:
    return f"Login failed - the password for account {username} is incorrect"


def oauth_error_message(username: str, error: str, description: str | None) -> str:
    reason = f"{error}; {description}" if description else error
    return (
        f"Login failed for account {username}: OAuth 2.0 authorisation error for account {username}: {reason}"
    )


def network_message(username: str, detail: str) -> str:
    return f"Login failed for account {username} - please check your internet connection and retry ({detail})"


def interactive_message(username: str) -> str:
    return (
        f"Login failed for account {username}: an interactive authorisation is needed for this account, "
        "and this version cannot run one yet (logins work when the config file already holds the "
        "account's tokens)"
    )


def credential_message(username: str, problem: str) -> str:
    return f"Login failed for account {username}: {problem}"


def unsupported_flow_message(username: str, flow: str) -> str:
    return f"Login failed for account {username}: the `{flow}` flow is not supported in this version"


# ---------------------------------------------------------------------------------------------- state

#: how many of its own saved versions per account the manager recognises in a reloaded file
WRITTEN_KEPT = 8


@dataclasses.dataclass(slots=True)
class _Stored:
    """The cache keys of one account, as stored (strings; None when absent)."""

    token_salt: str | None = None
    token_iterations: str | None = None
    access_token: str | None = None
    access_token_expiry: str | None = None
    refresh_token: str | None = None
    client_secret_encrypted: str | None = None

    def __repr__(self) -> str:  # the values are ciphertexts, but keep them out of logs anyway
        present = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        return f"_Stored(present={present})"

    @classmethod
    def from_cached(cls, cached: CachedTokens) -> _Stored:
        return cls(
            token_salt=cached.token_salt,
            token_iterations=cached.token_iterations,
            access_token=cached.access_token,
            access_token_expiry=cached.access_token_expiry,
            refresh_token=cached.refresh_token,
            client_secret_encrypted=cached.client_secret_encrypted,
        )

    def apply(self, changes: Mapping[str, str | None]) -> None:
        for key, value in changes.items():
            if hasattr(self, key):
                setattr(self, key, value)


@dataclasses.dataclass(slots=True)
class _AccountState:
    stored: _Stored
    #: the config's values when this state was loaded (or last seen to match it)
    origin: _Stored
    #: the plaintext client_secret this manager moved into client_secret_encrypted (encrypt on first use)
    moved_secret: str | None = None
    #: the last few versions this manager wrote: a reload that read one of them (an earlier save of ours,
    #: seen after a later one) is not a user's edit
    written: list[_Stored] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class _Login:
    """Working data of one login while it holds the account's lock."""

    account: AccountConfig
    username: str
    password: str
    state: _AccountState
    crypto: TokenCrypto | None
    #: decrypted client_secret_encrypted, when there is one
    stored_secret: str | None = None
    #: unreadable values dropped in memory; deleted from the file with the next save
    dropped: list[str] = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        return f"_Login(account={self.account.section!r}, username={self.username!r})"


def _parse_expiry(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        return float(value.strip())
    except ValueError:
        return 0.0


def _parse_lifetime(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return DEFAULT_TOKEN_LIFETIME
    try:
        return int(float(str(value).strip()))
    except ValueError:
        logger.warning(
            "Token response has an unusable expires_in value; assuming %d s", DEFAULT_TOKEN_LIFETIME
        )
        return DEFAULT_TOKEN_LIFETIME


class TokenManager:
    """Answers NeedToken: ``await get_token(username, password)`` gives a TokenOk or a TokenFailure."""

    def __init__(
        self,
        config: Config,
        store: TokenStore,
        client: TokenClient | TokenEndpointProtocol,
        clock: Callable[[], float] = time.time,
        *,
        key_cache: KeyCache | None = None,
        interactive: AuthorisationBroker | None = None,
    ) -> None:
        self._config = config
        self._interactive = interactive  # runs authorization-code and device flows (None: refuse them)
        self._store = store
        self._client = as_client(client)  # a bare endpoint gets the routing TokenClients (msal or standard)
        self._clock = clock
        self._keys = key_cache if key_cache is not None else KeyCache()
        self._states: dict[str, _AccountState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unsaved: dict[str, dict[str, str | None]] = {}  # section -> changes a failed save kept

    def update_config(self, config: Config) -> None:
        """Use a reloaded config. In-memory tokens stay unless the file's cache keys were edited meanwhile."""
        self._config = config

    # ------------------------------------------------------------------------------------------ entry

    async def get_token(self, username: str, password: Secret) -> TokenResult:
        account = self._config.find_account(username)
        if account is None:
            logger.error("No config file entry for account %s; login refused", username)
            return TokenFailure(no_entry_message(username), local=True)
        problem = flows.config_problem(account)
        if problem is flows.ConfigProblem.INCOMPLETE:
            logger.error("Incomplete config file entry for account %s", username)
            return TokenFailure(incomplete_message(username))
        if problem is flows.ConfigProblem.NO_FLOW:
            logger.error("Account %s has no permission_url and no oauth2_flow", username)
            return TokenFailure(no_flow_message(username))
        if not password:
            logger.error("No password provided for account %s", username)
            return TokenFailure(no_password_message(username), local=True)
        result = await self._locked_login(account, username, password.reveal())
        if isinstance(result, InteractionNeeded):  # wait for a person outside the account's lock
            assert self._interactive is not None
            return await self._interactive.login(
                result.request, lambda: self._locked_login(account, username, password.reveal())
            )
        return result

    async def _locked_login(self, account: AccountConfig, username: str, password: str) -> _LoginResult:
        async with self._locks.setdefault(account.section.lower(), asyncio.Lock()):
            try:
                return await self._login(account, username, password)
            except Exception:
                logger.exception("Unexpected error while getting a token for account %s", username)
                return TokenFailure(
                    f"Login failed for account {username} - internal error; see the proxy's log"
                )

    # ------------------------------------------------------------------------------------------ steps

    def _state_for(self, account: AccountConfig) -> _AccountState:
        key = account.section.lower()
        from_config = _Stored.from_cached(account.cached)
        state = self._states.get(key)
        if state is not None and from_config not in (state.origin, state.stored, *state.written):
            logger.info("Cached tokens for account %s were changed in the config file; using them", key)
            state = None
        if state is None:
            state = _AccountState(stored=dataclasses.replace(from_config), origin=from_config)
            self._states[key] = state
        elif from_config != state.origin:
            state.origin = from_config  # the config now shows what this manager saved
        return state

    async def _login(self, account: AccountConfig, username: str, password: str) -> _LoginResult:
        if not await localpassword.accepts(account, password):  # before anything is read, deleted or sent
            return TokenFailure(wrong_password_message(username), local=True)
        state = self._state_for(account)
        stored = state.stored
        salt = decode_salt(stored.token_salt)
        crypto = None
        if salt is not None:
            crypto = TokenCrypto(self._keys, password, salt, parse_iterations(stored.token_iterations))
        elif stored.token_salt:
            logger.warning("Account %s has an invalid token_salt; its cached values cannot be read", username)
        login = _Login(account, username, password, state, crypto)

        # an encrypted client secret that does not decrypt always means a wrong password
        legacy = False
        if stored.client_secret_encrypted:
            if crypto is None:
                logger.warning("Cannot decrypt client_secret_encrypted for account %s", username)
                return self._refuse(login)
            try:
                secret = await self._decrypt(crypto, stored.client_secret_encrypted)
            except DecryptionFailed:
                logger.warning(
                    "The password for account %s does not decrypt client_secret_encrypted", username
                )
                return self._refuse(login, localpassword.stale_secret_message(account, username))
            login.stored_secret = secret.plaintext
            legacy = secret.iterations != ITERATIONS

        if crypto is None and (stored.access_token or stored.refresh_token):
            login.dropped += self._drop(stored, "access_token", "access_token_expiry", "refresh_token")

        access: str | None = None
        refresh: str | None = None
        if crypto is not None and (stored.access_token or stored.refresh_token):
            opened = await self._open_tokens(login)
            if opened is None:
                return await self._password_error(login)
            access, refresh, token_legacy = opened
            legacy = legacy or token_legacy
        if legacy:
            await self._rotate(login)

        now = self._clock()
        if access is not None and _parse_expiry(stored.access_token_expiry) - now >= TOKEN_EXPIRY_MARGIN:
            logger.debug("Using the cached access token for account %s", username)
            return TokenOk(username, Secret(access))

        if refresh is not None:
            result = await self._refresh(login, refresh)
            if result is not None:
                return result
        elif access is not None:
            logger.info(
                "Cached access token for account %s has expired and there is no refresh token", username
            )
        return await self._fetch(login)

    async def _open_tokens(self, login: _Login) -> tuple[str | None, str | None, bool] | None:
        """Decrypt the stored tokens: (access, refresh, used an old count), or None for a wrong password."""
        stored = login.state.stored
        assert login.crypto is not None
        values: dict[str, Decrypted] = {}
        failed: list[str] = []
        for name in ("access_token", "refresh_token"):
            token = getattr(stored, name)
            if not token:
                continue
            try:
                values[name] = await self._decrypt(login.crypto, token)
            except DecryptionFailed:
                failed.append(name)
        if not values:
            return None
        for name in failed:  # the password opened the other token, so this value is damaged
            logger.warning("Discarding an unreadable cached %s for account %s", name, login.username)
            login.dropped += self._drop(
                stored, name, *(["access_token_expiry"] if name == "access_token" else [])
            )
        access = values.get("access_token")
        refresh = values.get("refresh_token")
        legacy = any(value.iterations != ITERATIONS for value in values.values())
        return (
            access.plaintext if access else None,
            refresh.plaintext if refresh else None,
            legacy,
        )

    def _refuse(self, login: _Login, message: str | None = None) -> TokenFailure:
        if login.crypto is not None:
            login.crypto.forget()
        return TokenFailure(message or wrong_password_message(login.username), local=message is None)

    async def _password_error(self, login: _Login) -> _LoginResult:
        """The password does not open the cached tokens (reference-behaviour 2.3)."""
        options = self._config.options
        keep = not options.delete_account_token_on_password_error or flows.is_app_only(login.account)
        if keep and not localpassword.binds(login.account):  # with a hash the password is right: stale values
            logger.warning(
                "Login for account %s refused: the password does not decrypt its tokens", login.username
            )
            return self._refuse(login)
        logger.warning(
            "The password for account %s cannot decrypt its cached tokens; deleting them to authorise again",
            login.username,
        )
        stored = login.state.stored
        deleted = ["access_token", "access_token_expiry", "refresh_token"]
        if not stored.client_secret_encrypted:  # else keep the key that still opens the encrypted secret
            deleted = ["token_salt", "token_iterations", *deleted]
            if login.crypto is not None:
                login.crypto.forget()
            login.crypto = None
        changes = self._drop(stored, *deleted)
        await self._save(login, changes)
        return await self._fetch(login)

    async def _rotate(self, login: _Login) -> None:
        """Re-encrypt values that only open with an old iteration count, keeping salt and expiry."""
        stored = login.state.stored
        crypto = login.crypto
        assert crypto is not None
        names = [
            n for n in ("client_secret_encrypted", "access_token", "refresh_token") if getattr(stored, n)
        ]
        tokens = [getattr(stored, n) for n in names]

        def rotate(derive: bool) -> list[str]:
            return [crypto.rotate(token, derive=derive) for token in tokens]

        try:
            rotated = await self._fast_or_thread(rotate)
        except DecryptionFailed:
            logger.warning("Cannot re-encrypt the cached values of account %s; leaving them", login.username)
            return
        logger.info(
            "Re-encrypting the cached secrets of account %s with the current key parameters", login.username
        )
        changes: dict[str, str | None] = {}
        if "client_secret_encrypted" in names:
            changes["client_secret_encrypted"] = rotated[names.index("client_secret_encrypted")]
        changes["token_iterations"] = str(ITERATIONS)
        for name in ("access_token", "refresh_token"):
            if name in names:
                changes[name] = rotated[names.index(name)]
        stored.apply(changes)
        login.crypto = TokenCrypto(self._keys, login.password, crypto.salt, ITERATIONS)
        await self._save(login, changes)

    def _client_secret(self, login: _Login) -> str | None:
        """The secret to send: plaintext config value, else the decrypted one, else maybe the password."""
        plain = login.account.client_secret
        if plain is not None and plain == login.state.moved_secret:
            plain = None  # already moved into client_secret_encrypted; the frozen config is stale
        if plain:
            return plain
        if login.stored_secret is not None:
            return login.stored_secret
        if (
            self._config.options.use_login_password_as_client_credentials_secret
            and not login.account.permission_url
            and flows.effective_flow(login.account) == flows.CLIENT_CREDENTIALS
            and not credentials.uses_certificate(login.account)  # a certificate beats the fallback
        ):
            return login.password
        return None

    async def _refresh(self, login: _Login, refresh_token: str) -> TokenResult | None:
        """Exchange the refresh token. None means it was rejected and dropped: run the full flow."""
        account = login.account
        assert account.token_url is not None
        logger.info("Refreshing the access token for account %s", login.username)
        try:
            response = await asyncio.to_thread(
                self._client.refresh, account, self._client_secret(login), refresh_token, self._clock()
            )
        except credentials.CredentialError as exc:
            logger.error("Cannot refresh the token of account %s: %s", login.username, exc)
            return TokenFailure(credential_message(login.username, str(exc)))
        except TokenEndpointError as exc:
            if exc.is_permanent:
                logger.warning(
                    "Refresh token for account %s was rejected (%s); discarding cached tokens",
                    login.username,
                    exc.error,
                )
                changes = self._drop(
                    login.state.stored, "access_token", "access_token_expiry", "refresh_token"
                )
                await self._save(login, changes)
                return None
            return self._endpoint_failure(login, exc)
        except TokenNetworkError as exc:
            logger.error("Token refresh for account %s failed: %s; cached tokens kept", login.username, exc)
            return TokenFailure(network_message(login.username, str(exc)))
        return await self._store_response(login, response, refresh_token)

    async def _fetch(self, login: _Login) -> _LoginResult:
        """Run the account's flow for a new token."""
        account = login.account
        assert account.token_url is not None
        flow = flows.effective_flow(account)
        if flow is not None and flow not in flows.INTERACTIVE_FLOWS:
            logger.info("Requesting a new token for account %s (%s)", login.username, flow)
        try:
            response = await asyncio.to_thread(
                self._client.fresh,
                account,
                login.username,
                login.password,
                self._client_secret(login),
                self._clock(),
            )
        except credentials.CredentialError as exc:
            logger.error("Cannot request a token for account %s: %s", login.username, exc)
            return TokenFailure(credential_message(login.username, str(exc)))
        except flows.FlowUnavailable as exc:
            if exc.interactive and self._interactive is not None:
                return self._interaction(login)
            if exc.interactive:
                logger.warning("Account %s needs an interactive authorisation, which is off", login.username)
                return TokenFailure(interactive_message(login.username))
            logger.error("Account %s uses the unsupported flow %s", login.username, exc.flow)
            return TokenFailure(unsupported_flow_message(login.username, exc.flow))
        except TokenEndpointError as exc:
            return self._endpoint_failure(login, exc)
        except TokenNetworkError as exc:
            logger.error("Token request for account %s failed: %s", login.username, exc)
            return TokenFailure(network_message(login.username, str(exc)))
        return await self._store_response(login, response, None)

    def _endpoint_failure(self, login: _Login, exc: TokenEndpointError) -> TokenFailure:
        if exc.is_oauth_error:
            logger.error("Token endpoint refused account %s: %s", login.username, exc)
            return TokenFailure(oauth_error_message(login.username, exc.error, exc.description))
        logger.error("Token endpoint failed for account %s: %s; cached tokens kept", login.username, exc)
        return TokenFailure(network_message(login.username, f"the token endpoint answered HTTP {exc.status}"))

    async def _store_response(
        self, login: _Login, response: Mapping[str, Any], old_refresh: str | None
    ) -> TokenResult:
        """Encrypt and save a successful token response, then answer with its access token."""
        access = response.get("access_token")
        if not isinstance(access, str) or not access:
            logger.error("Token response for account %s has no access_token", login.username)
            return TokenFailure(network_message(login.username, "the token response has no access token"))
        refresh = response.get("refresh_token")
        new_refresh = refresh if isinstance(refresh, str) and refresh else None
        lifetime = _parse_lifetime(response.get("expires_in"))
        now = int(self._clock())
        stored = login.state.stored
        options = self._config.options

        salt_text = stored.token_salt
        crypto = login.crypto
        rekeyed = crypto is None or parse_iterations(stored.token_iterations) != ITERATIONS
        if crypto is None:
            salt_text = new_salt()
            salt = decode_salt(salt_text)
            assert salt is not None
            crypto = TokenCrypto(self._keys, login.password, salt, ITERATIONS)

        plain_secret = login.account.client_secret
        if plain_secret is not None and plain_secret == login.state.moved_secret:
            plain_secret = None
        move_secret = bool(options.encrypt_client_secret_on_first_use and plain_secret)
        secret_to_store: str | None = None
        if move_secret:
            secret_to_store = plain_secret
        elif stored.client_secret_encrypted and rekeyed and login.stored_secret is not None:
            secret_to_store = login.stored_secret
        keep_refresh = None
        if new_refresh is None and stored.refresh_token and rekeyed:
            keep_refresh = old_refresh  # re-encrypt it under the new key (None drops it)

        plaintexts = [access]
        for extra in (secret_to_store, new_refresh or keep_refresh):
            if extra is not None:
                plaintexts.append(extra)
        encrypter = crypto

        def encrypt(derive: bool) -> list[str]:
            return [encrypter.encrypt(text, derive=derive) for text in plaintexts]

        encrypted = iter(await self._fast_or_thread(encrypt))
        access_enc = next(encrypted)
        changes: dict[str, str | None] = {}
        if secret_to_store is not None:
            changes["client_secret_encrypted"] = next(encrypted)
            if move_secret:
                changes["client_secret"] = None
        assert salt_text is not None
        changes["token_salt"] = salt_text
        changes["token_iterations"] = str(ITERATIONS)
        changes["access_token"] = access_enc
        changes["access_token_expiry"] = str(now + lifetime)
        if new_refresh is not None or keep_refresh is not None:
            changes["refresh_token"] = next(encrypted)
        elif stored.refresh_token and rekeyed:
            changes["refresh_token"] = None
        for name in login.dropped:
            changes.setdefault(name, None)

        stored.apply(changes)
        if move_secret:
            login.state.moved_secret = plain_secret
            logger.info("Moving the client secret of account %s into client_secret_encrypted", login.username)
        login.crypto = crypto
        if secret_to_store is not None:
            login.stored_secret = secret_to_store
        await self._save(login, changes)
        logger.info("Got a new access token for account %s (valid for %d s)", login.username, lifetime)
        return TokenOk(login.username, Secret(access))

    def _interaction(self, login: _Login) -> InteractionNeeded:
        """Hand the account to the broker; its tokens come back through ``_complete_interaction``."""

        async def complete(response: Mapping[str, Any]) -> TokenResult:
            return await self._complete_interaction(login, response)

        request = AuthorisationRequest(login.account, login.username, self._client_secret(login), complete)
        return InteractionNeeded(request)

    async def _complete_interaction(self, login: _Login, response: Mapping[str, Any]) -> TokenResult:
        """Save an interactive flow's tokens, encrypted with the password of the login that started it."""
        async with self._locks.setdefault(login.account.section.lower(), asyncio.Lock()):
            state = self._state_for(login.account)
            if state is not login.state:  # the file's cache keys were edited meanwhile: build on them
                salt = decode_salt(state.stored.token_salt)
                count = parse_iterations(state.stored.token_iterations)
                crypto = TokenCrypto(self._keys, login.password, salt, count) if salt else None
                login = dataclasses.replace(login, state=state, crypto=crypto, dropped=[])
            return await self._store_response(login, response, None)

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _drop(stored: _Stored, *names: str) -> dict[str, str | None]:
        changes: dict[str, str | None] = dict.fromkeys(names)
        stored.apply(changes)
        return changes

    async def _save(self, login: _Login, changes: Mapping[str, str | None]) -> None:
        """Write ``changes`` with whatever earlier failed saves of the section kept; after a success, retry
        the failed saves of accounts that are not busy (a busy one retries with its own next save)."""
        section = login.account.section
        written = login.state.written
        written.append(dataclasses.replace(login.state.stored))
        del written[:-WRITTEN_KEPT]
        if not await self._write(login.username, section, {**self._unsaved.pop(section, {}), **changes}):
            return
        for other in list(self._unsaved):
            lock = self._locks.setdefault(other.lower(), asyncio.Lock())
            if other in self._unsaved and not lock.locked():
                async with lock:  # free, so taken without waiting
                    if not await self._write(other, other, self._unsaved.pop(other)):
                        return

    async def _write(self, username: str, section: str, changes: dict[str, str | None]) -> bool:
        try:
            await asyncio.to_thread(self._store.save, section, changes)
        except asyncio.CancelledError:  # the client left; the write goes on in its thread: keep a copy
            self._unsaved[section] = changes
            raise
        except Exception as exc:
            # the tokens stay in memory, so this login (and later ones) still work; the next save retries
            self._unsaved[section] = changes
            logger.error(
                "Could not save the cached tokens of account %s (%s: %s); keeping them in memory",
                username,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    @staticmethod
    async def _fast_or_thread(work: Callable[[bool], T]) -> T:
        """Run ``work(derive=False)`` inline (cached keys: microseconds), else ``work(True)`` in a thread."""
        try:
            return work(False)
        except KeyNotCached:
            return await asyncio.to_thread(work, True)

    async def _decrypt(self, crypto: TokenCrypto, token: str) -> Decrypted:
        def decrypt(derive: bool) -> Decrypted:
            return crypto.decrypt(token, derive=derive)

        return await self._fast_or_thread(decrypt)
