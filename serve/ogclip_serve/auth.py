"""Bearer-token authentication of the API (``/v1/*``); probes and the OpenAPI document stay open."""

from __future__ import annotations

import hmac
import ipaddress

from ogclip.settings import Settings
from ogclip_serve.errors import Unauthorized


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthPolicy:
    """Who may call the API: holders of the token, or anyone on a local-mode loopback service (``token=None``)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    @classmethod
    def from_settings(cls, settings: Settings, host: str) -> AuthPolicy:
        """The token from ``OGCLIP_API_TOKEN``; without one, only local mode on a loopback address may serve, and
        anything else refuses to start rather than expose an open classifier."""
        if settings.api_token is not None and settings.api_token.get_secret_value():
            return cls(settings.api_token.get_secret_value())
        if settings.local_mode:
            if not is_loopback(host):
                raise RuntimeError(f"local mode serves without a token on a loopback address only, not {host!r}; "
                                   "set OGCLIP_API_TOKEN")
            return cls(None)
        raise RuntimeError("OGCLIP_API_TOKEN is not set: the service requires a bearer token outside local mode "
                           "(OGCLIP_LOCAL_MODE=1 serves without one, on a loopback address only)")

    @property
    def required(self) -> bool:
        return self.token is not None

    def check(self, authorization: str | None) -> None:
        """Raise Unauthorized unless ``authorization`` is ``Bearer <token>`` (compared in constant time)."""
        if self.token is None:
            return
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("missing bearer token: send the header 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise Unauthorized("invalid bearer token")
