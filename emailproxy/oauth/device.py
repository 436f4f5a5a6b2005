"""The device authorization grant (RFC 8628): ask for a device code, show it, poll the token endpoint.

The device-code request is a form POST to ``permission_url`` (section 3.1; the reference sends a GET).
Polling follows section 3.5: wait ``interval`` seconds (default 5) before every poll, keep waiting on
``authorization_pending``, add 5 seconds to the interval on ``slow_down``, and give up when the device
code's ``expires_in`` has passed. Network errors and 5xx answers are retried at the same pace. The
caller supplies one poll (a token client's ``poll_device``), so this module does no I/O itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from emailproxy.config import AccountConfig
from emailproxy.oauth.endpoint import TokenEndpointError, TokenNetworkError

logger = logging.getLogger("emailproxy.tokens")

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
#: used when the response has no usable ``expires_in`` (RFC 8628 makes it required)
DEFAULT_EXPIRES_IN = 900.0

PollOnce = Callable[[], Awaitable[dict[str, Any]]]


class DeviceFlowError(Exception):
    """The device flow ended without a token. ``error`` is the OAuth error code (or our own word)."""

    def __init__(self, error: str, description: str | None = None) -> None:
        self.error = error
        self.description = description
        super().__init__(f"{error}; {description}" if description else error)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """A device authorization response (RFC 8628 section 3.2). The device code stays out of reprs.

    ``flow`` is what a token client needs to poll besides the device code (msal's device-flow dict).
    """

    device_code: str = dataclasses.field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: float = DEFAULT_EXPIRES_IN
    interval: float = DEFAULT_INTERVAL
    flow: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def link(self) -> str:
        """The page to open: the one with the code filled in, when the provider gives it."""
        return self.verification_uri_complete or self.verification_uri


def device_request(account: AccountConfig) -> dict[str, str]:
    """The form POSTed to the device authorization endpoint: client_id and scope."""
    return {"client_id": account.client_id or "", "scope": (account.oauth2_scope or "").strip()}


def _seconds(value: Any, default: float) -> float:
    if value is None or isinstance(value, bool):
        return default
    try:
        number = float(str(value).strip())
    except ValueError:
        return default
    return number if number > 0 else default


def parse_device_response(body: Mapping[str, Any]) -> DeviceAuthorization:
    """Validate a device authorization response. Google's older ``verification_url`` is accepted too."""
    device_code = body.get("device_code")
    user_code = body.get("user_code")
    uri = body.get("verification_uri") or body.get("verification_url")
    if not isinstance(device_code, str) or not device_code:
        raise DeviceFlowError("invalid_response", "the device authorization response has no device_code")
    if not isinstance(user_code, str) or not user_code:
        raise DeviceFlowError("invalid_response", "the device authorization response has no user_code")
    if not isinstance(uri, str) or not uri:
        raise DeviceFlowError("invalid_response", "the device authorization response has no verification_uri")
    complete = body.get("verification_uri_complete")
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete if isinstance(complete, str) and complete else None,
        expires_in=_seconds(body.get("expires_in"), DEFAULT_EXPIRES_IN),
        interval=_seconds(body.get("interval"), DEFAULT_INTERVAL),
    )


def poll_form(authorization: DeviceAuthorization) -> dict[str, str]:
    """The grant-specific fields of a poll; the caller adds the client's authentication fields."""
    return {"grant_type": GRANT_TYPE, "device_code": authorization.device_code}


async def poll(
    poll_once: PollOnce,
    authorization: DeviceAuthorization,
    *,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    username: str = "",
) -> dict[str, Any]:
    """Poll until the user approves (returns the token response) or the code expires (DeviceFlowError).

    ``started`` is when the device code was issued (``clock()`` time); ``poll_once`` asks the token endpoint
    once and returns the token response, raising TokenEndpointError/TokenNetworkError like TokenEndpoint.
    """
    deadline = (clock() if started is None else started) + authorization.expires_in
    interval = authorization.interval
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise DeviceFlowError("expired_token", "the device code expired before the sign-in was completed")
        await sleep(min(interval, remaining))
        if clock() > deadline:
            raise DeviceFlowError("expired_token", "the device code expired before the sign-in was completed")
        try:
            return await poll_once()
        except TokenEndpointError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN_STEP
                logger.info(
                    "Device flow for account %s: asked to slow down; polling every %g s", username, interval
                )
                continue
            if exc.is_oauth_error:  # access_denied, expired_token, invalid_grant, ...
                raise DeviceFlowError(exc.error, exc.description) from None
            logger.warning("Device flow for account %s: token endpoint failed (%s); retrying", username, exc)
        except TokenNetworkError as exc:
            logger.warning("Device flow for account %s: %s; retrying", username, exc)
