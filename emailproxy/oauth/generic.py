"""The standards-based token client: RFC 6749 forms (with PKCE, RFC 7636; device grant, RFC 8628; client
assertions, RFC 7523) POSTed to the account's endpoints through a :class:`TokenEndpointProtocol`.

It serves every provider that is not a Microsoft v2.0 authority (Google, Yahoo, AOL, Fastmail, ... and
Microsoft v1 endpoints), and any account with ``token_backend = standard``. The forms come from
``flows``, ``authcode``, ``device`` and ``credentials``; this module only sends them. Everything blocks.
"""

from __future__ import annotations

from typing import Any

from emailproxy.config import AccountConfig
from emailproxy.oauth import authcode, credentials, device, flows
from emailproxy.oauth.authcode import Callback, CodeRequest
from emailproxy.oauth.device import DeviceAuthorization
from emailproxy.oauth.endpoint import TokenEndpointProtocol


class StandardClient:
    """A :class:`~emailproxy.oauth.client.TokenClient` that builds the forms itself and POSTs them."""

    def __init__(self, endpoint: TokenEndpointProtocol) -> None:
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"StandardClient({self.endpoint!r})"

    def fresh(
        self,
        account: AccountConfig,
        username: str,
        password: str,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        request = flows.fresh_token_request(account, username, password, client_secret, now)
        return self.endpoint.post(request.url, request.form)

    def refresh(
        self, account: AccountConfig, client_secret: str | None, refresh_token: str, now: float | None = None
    ) -> dict[str, Any]:
        form = flows.refresh_request(account, client_secret, refresh_token, now)
        return self.endpoint.post(account.token_url or "", form)

    def begin_code(
        self, account: AccountConfig, username: str, state: str, client_secret: str | None
    ) -> CodeRequest:
        """The reference's authorize URL (``permission_url`` plus its query), with PKCE when ``use_pkce``."""
        pkce = authcode.new_pkce() if account.use_pkce else None
        return CodeRequest(authcode.authorize_url(account, username, state, pkce), state, pkce=pkce)

    def redeem_code(
        self,
        account: AccountConfig,
        request: CodeRequest,
        callback: Callback,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        token_url = account.token_url or ""
        fields = credentials.client_fields(account, client_secret, token_url, now)
        form = authcode.token_request(account, callback.code or "", fields, request.pkce)
        return self.endpoint.post(token_url, form)

    def start_device(self, account: AccountConfig, client_secret: str | None) -> DeviceAuthorization:
        """POST client_id and scope to ``permission_url`` (the device authorization endpoint)."""
        body = self.endpoint.post(account.permission_url or "", device.device_request(account))
        return device.parse_device_response(body)

    def poll_device(
        self,
        account: AccountConfig,
        authorization: DeviceAuthorization,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        token_url = account.token_url or ""
        fields = credentials.client_fields(account, client_secret, token_url, now)
        return self.endpoint.post(token_url, {**fields, **device.poll_form(authorization)})
