"""The device authorization grant (RFC 8628): request form, response parsing and the polling loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from emailproxy.config import AccountConfig
from emailproxy.oauth import device
from emailproxy.oauth.device import DeviceAuthorization, DeviceFlowError
from emailproxy.oauth.endpoint import TokenEndpointError, TokenNetworkError

TOKEN = {"access_token": "at-1", "expires_in": 3600, "refresh_token": "rt-1"}


class Clock:
    """A fake monotonic clock that the fake sleep advances."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Endpoint:
    """Answers polls in order: a dict is a token response, an exception is raised."""

    def __init__(self, clock: Clock, *answers: dict[str, Any] | Exception) -> None:
        self.clock = clock
        self.answers = list(answers)
        self.polls: list[tuple[float, dict[str, str]]] = []

    async def post(self, form: dict[str, str]) -> dict[str, Any]:
        self.polls.append((self.clock.now, form))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def pending() -> TokenEndpointError:
    return TokenEndpointError(400, "authorization_pending", "AADSTS70016: not yet")


def authorization(**kwargs: Any) -> DeviceAuthorization:
    values: dict[str, Any] = {
        "device_code": "dc-secret",
        "user_code": "ABCD-EFGH",
        "verification_uri": "https://idp.example/device",
        "expires_in": 900.0,
        "interval": 5.0,
    }
    values.update(kwargs)
    return DeviceAuthorization(**values)


def run_poll(endpoint: Endpoint, clock: Clock, auth: DeviceAuthorization) -> dict[str, Any]:
    async def poll_once() -> dict[str, Any]:
        return await endpoint.post(device.poll_form(auth))

    return asyncio.run(device.poll(poll_once, auth, started=clock.now, clock=clock, sleep=clock.sleep))


# ---------------------------------------------------------------------------------------- forms, parsing


def test_device_request_is_client_id_and_scope() -> None:
    account = AccountConfig(
        username="u@example.com",
        section="u@example.com",
        matched_section="u@example.com",
        client_id="client-1",
        client_secret="secret-1",
        oauth2_scope=" IMAP.AccessAsUser.All offline_access ",
        permission_url="https://idp.example/devicecode",
        oauth2_flow="device",
    )
    assert device.device_request(account) == {
        "client_id": "client-1",
        "scope": "IMAP.AccessAsUser.All offline_access",
    }


def test_poll_form() -> None:
    assert device.poll_form(authorization()) == {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": "dc-secret",
    }


def test_parse_device_response() -> None:
    auth = device.parse_device_response(
        {
            "device_code": "dc",
            "user_code": "XYZ",
            "verification_uri": "https://idp.example/device",
            "verification_uri_complete": "https://idp.example/device?code=XYZ",
            "expires_in": "600",
            "interval": 2,
        }
    )
    assert auth == DeviceAuthorization(
        "dc", "XYZ", "https://idp.example/device", "https://idp.example/device?code=XYZ", 600.0, 2.0
    )
    assert auth.link == "https://idp.example/device?code=XYZ"
    assert "dc" not in repr(auth).replace("device", "")


def test_parse_device_response_defaults_and_google_alias() -> None:
    auth = device.parse_device_response(
        {
            "device_code": "dc",
            "user_code": "XYZ",
            "verification_url": "https://www.google.com/device",
            "interval": "nonsense",
        }
    )
    assert auth.verification_uri == "https://www.google.com/device" and auth.link == auth.verification_uri
    assert auth.interval == device.DEFAULT_INTERVAL and auth.expires_in == device.DEFAULT_EXPIRES_IN


@pytest.mark.parametrize("missing", ["device_code", "user_code", "verification_uri"])
def test_parse_device_response_requires_fields(missing: str) -> None:
    body = {"device_code": "dc", "user_code": "XYZ", "verification_uri": "https://idp.example/device"}
    del body[missing]
    with pytest.raises(DeviceFlowError, match=missing):
        device.parse_device_response(body)


# ---------------------------------------------------------------------------------------- polling


def test_poll_waits_the_interval_before_every_poll() -> None:
    clock = Clock()
    endpoint = Endpoint(clock, pending(), pending(), TOKEN)
    assert run_poll(endpoint, clock, authorization()) == TOKEN
    assert clock.sleeps == [5.0, 5.0, 5.0]
    assert [form for _, form in endpoint.polls] == [device.poll_form(authorization())] * 3


def test_slow_down_adds_five_seconds_for_every_later_poll() -> None:
    clock = Clock()
    slow = TokenEndpointError(400, "slow_down", None)
    endpoint = Endpoint(clock, pending(), slow, pending(), slow, pending(), TOKEN)
    assert run_poll(endpoint, clock, authorization(interval=1.0)) == TOKEN
    assert clock.sleeps == [1.0, 1.0, 6.0, 6.0, 11.0, 11.0]


def test_polling_stops_when_the_code_expires() -> None:
    clock = Clock()
    endpoint = Endpoint(clock, pending())
    with pytest.raises(DeviceFlowError) as info:
        run_poll(endpoint, clock, authorization(expires_in=12.0))
    assert info.value.error == "expired_token"
    assert clock.sleeps == [5.0, 5.0, 2.0]
    assert all(at <= 1000.0 + 12.0 for at, _ in endpoint.polls)
    assert len(endpoint.polls) == 3


@pytest.mark.parametrize(
    "error", ["access_denied", "authorization_declined", "expired_token", "invalid_grant"]
)
def test_a_final_oauth_error_ends_the_flow(error: str) -> None:
    clock = Clock()
    endpoint = Endpoint(clock, pending(), TokenEndpointError(400, error, "said no"), TOKEN)
    with pytest.raises(DeviceFlowError) as info:
        run_poll(endpoint, clock, authorization())
    assert info.value.error == error and info.value.description == "said no"
    assert len(endpoint.polls) == 2


def test_network_errors_and_5xx_are_retried() -> None:
    clock = Clock()
    endpoint = Endpoint(
        clock, TokenNetworkError("could not connect to idp"), TokenEndpointError(503, "http_503", None), TOKEN
    )
    assert run_poll(endpoint, clock, authorization()) == TOKEN
    assert len(endpoint.polls) == 3
