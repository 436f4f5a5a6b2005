"""The blocking HTTP POST to an OAuth 2.0 token endpoint (RFC 6749 section 3.2), with ``requests``.

Callers run :meth:`TokenEndpoint.post` in a worker thread. Errors are mapped here, at one boundary:
an OAuth error response becomes :class:`TokenEndpointError`, anything about the connection becomes
:class:`TokenNetworkError`. Form values (secrets, passwords, codes) are never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from emailproxy import __version__

logger = logging.getLogger("emailproxy.tokens")

DEFAULT_TIMEOUT = 30.0
USER_AGENT = f"emailproxy/{__version__}"
#: Longest error description kept from a response (some providers add long trace ids).
MAX_DESCRIPTION = 500


class TokenEndpointError(Exception):
    """The token endpoint answered with an error.

    ``error`` is the OAuth ``error`` code, or ``http_<status>`` when the body was not an OAuth error
    (a proxy's HTML page, a 5xx from a load balancer, ...).
    """

    def __init__(self, status: int, error: str, description: str | None = None) -> None:
        self.status = status
        self.error = error
        self.description = description
        text = f"HTTP {status}: {error}"
        if description:
            text += f"; {description}"
        super().__init__(text)

    @property
    def is_oauth_error(self) -> bool:
        """True when the body was a JSON OAuth error (not a bare HTTP failure)."""
        return not self.error.startswith("http_")

    @property
    def is_permanent(self) -> bool:
        """True when retrying the same grant cannot work (RFC 6749 5.2 errors, answered with HTTP 400).

        ``invalid_grant`` counts with any 4xx status, as some providers answer it with 401, and an
        error object sent with HTTP 200 (a few providers do that) counts as a 400.
        """
        if not self.is_oauth_error:
            return False
        return self.status in (200, 400) or (self.error == "invalid_grant" and 400 <= self.status < 500)


class TokenNetworkError(Exception):
    """The token endpoint could not be reached or did not answer in time. ``str()`` is a short detail."""


class TokenEndpointProtocol(Protocol):
    """What the token manager needs: one blocking form POST returning the JSON response."""

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]: ...


def short_host(url: str) -> str:
    """The host (and port) of a URL, for log lines and error texts."""
    try:
        return urlsplit(url).netloc or url
    except ValueError:
        return url


def request_verify() -> bool | str:
    """``verify=`` for one request: ``SSL_CERT_FILE`` when set (a per-request value is not overridden by
    ``REQUESTS_CA_BUNDLE``), else True (requests' default bundle, or ``REQUESTS_CA_BUNDLE``)."""
    ca_file = os.environ.get("SSL_CERT_FILE")
    return ca_file if ca_file else True


def network_error(exc: requests.exceptions.RequestException, url: str, timeout: float) -> TokenNetworkError:
    """The TokenNetworkError for a failed request to ``url`` (its text names the host, never the request)."""
    host = short_host(url)
    if isinstance(exc, requests.exceptions.Timeout):
        return TokenNetworkError(f"{host} did not answer within {timeout:g} s")
    if isinstance(exc, requests.exceptions.SSLError):
        return TokenNetworkError(f"TLS error talking to {host}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return TokenNetworkError(f"could not connect to {host}")
    return TokenNetworkError(f"request to {host} failed ({type(exc).__name__})")


def oauth_error(status: int, body: Mapping[str, Any]) -> TokenEndpointError | None:
    """The TokenEndpointError for a JSON OAuth error object (RFC 6749 5.2), or None when it is not one."""
    error = body.get("error")
    if not isinstance(error, str) or not error:
        return None
    description = body.get("error_description")
    return TokenEndpointError(
        status, error, str(description)[:MAX_DESCRIPTION] if description is not None else None
    )


def _error_from_response(response: requests.Response) -> TokenEndpointError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = oauth_error(status, body) if isinstance(body, dict) else None
    return error or TokenEndpointError(status, f"http_{status}", response.reason or None)


class TokenEndpoint:
    """Posts form-encoded token requests over a pooled ``requests.Session``.

    When the ``SSL_CERT_FILE`` environment variable is set it is passed as ``verify=`` on every request,
    so one CA setting covers both mail and token TLS (a per-request value is not overridden by
    ``REQUESTS_CA_BUNDLE``). Proxy environment variables are honoured as ``requests`` does.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, session: requests.Session | None = None) -> None:
        self.timeout = timeout
        self._session = session if session is not None else requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"TokenEndpoint(timeout={self.timeout})"

    def close(self) -> None:
        self._session.close()

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        host = short_host(url)
        grant = form.get("grant_type", "?")
        logger.debug("Token request to %s (grant_type=%s)", host, grant)
        try:
            response = self._session.post(
                url, data=dict(form), timeout=self.timeout, verify=request_verify(), allow_redirects=False
            )
        except requests.exceptions.RequestException as exc:
            raise network_error(exc, url, self.timeout) from exc
        with response:
            if not 200 <= response.status_code < 300:
                error = _error_from_response(response)
                logger.debug("Token endpoint %s answered %s", host, error)
                raise error
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise TokenEndpointError(
                    response.status_code, f"http_{response.status_code}", "the response is not a JSON object"
                )
            refusal = oauth_error(response.status_code, body)  # a few providers answer errors with 200
            if refusal is not None:
                raise refusal
            return body
