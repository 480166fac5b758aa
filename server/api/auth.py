"""Optional API keys: an inference key for generation, an admin key for adapter uploads and deletes.

Keys arrive as ``Authorization: Bearer <key>`` and are compared in constant time; they are never logged. The admin
key also works for inference. With no key configured, every endpoint is open (and the server binds to 127.0.0.1 by
default). ``/health``, ``/ready`` and ``/metrics`` are open unless the settings say they need a key.

Which key an endpoint needs is declared once, by the dependency on its route (``require_inference``,
``require_admin``, ``require_health_key``, ``require_metrics_key``). ``server.api.key_guard`` reads those
declarations from the route table, answers from the request head before anything reads the body, and marks the
endpoints that need a key under this server's settings in the OpenAPI schema. The dependency checks again, so a
route reached some other way is still guarded.

Answers: 401 ``unauthorized`` when the request carries no key the server knows (none, not ``Bearer``, or wrong);
403 ``forbidden`` when it carries a valid key without the right: the API key on an admin endpoint while an admin
key is configured.
"""

import hmac
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request
from pydantic import SecretStr

from server.api.errors import ApiError
from server.config import Settings


class Access(StrEnum):
    """What an endpoint needs; the strictest of them is ``ADMIN``."""

    OPEN = "open"  # FastAPI's /docs, /redoc and /openapi.json: never need a key
    HEALTH = "health"  # /health, /ready: open unless health_requires_key, then like INFERENCE
    METRICS = "metrics"  # /metrics: open unless metrics_requires_key, then like INFERENCE
    INFERENCE = "inference"  # the API key or the admin key
    ADMIN = "admin"  # the admin key; without an admin key configured, the API key


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value; None for a missing or other scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _header_bytes(token: str | None) -> bytes | None:
    """The token's bytes as sent: ASGI decodes headers as latin-1, and a client sends its key's UTF-8 bytes."""
    try:
        return token.encode("latin-1") if token is not None else None
    except UnicodeEncodeError:  # not from an HTTP header; matches no key
        return None


def _same(presented: bytes, key: SecretStr | None) -> bool:
    return key is not None and hmac.compare_digest(presented, key.get_secret_value().encode())


@dataclass(frozen=True)
class KeyPolicy:
    """The configured keys and the two settings that close health and metrics; decides every request."""

    api_key: SecretStr | None  # SecretStr: the policy's repr never shows a key
    admin_key: SecretStr | None
    health_requires_key: bool = False
    metrics_requires_key: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyPolicy":
        return cls(settings.api_key, settings.admin_key, settings.health_requires_key, settings.metrics_requires_key)

    def refusals(self, access: Access) -> tuple[int, ...]:
        """The statuses an endpoint needing ``access`` can refuse with under this policy; () when it is open."""
        if self.refusal(access, None) is None:
            return ()
        both = self.api_key is not None and self.admin_key is not None
        return (401, 403) if access is Access.ADMIN and both else (401,)

    def refusal(self, access: Access, authorization: str | None) -> ApiError | None:
        """None when a request with this ``Authorization`` header value may call an endpoint needing ``access``,
        else the 401/403 to answer. ``authorization`` is the header as ASGI decodes it (latin-1)."""
        if access is Access.HEALTH:
            access = Access.INFERENCE if self.health_requires_key else Access.OPEN
        elif access is Access.METRICS:
            access = Access.INFERENCE if self.metrics_requires_key else Access.OPEN
        if access is Access.OPEN or (self.api_key is None and self.admin_key is None):
            return None
        presented = _header_bytes(bearer_token(authorization))
        needs_admin = access is Access.ADMIN and self.admin_key is not None
        if presented is None:
            return _unauthorized(needs_admin)
        # Both keys are always compared, so the time taken does not tell which key the token is.
        is_api, is_admin = _same(presented, self.api_key), _same(presented, self.admin_key)
        if not (is_api or is_admin):
            return _unauthorized(needs_admin)
        if needs_admin and not is_admin:
            return ApiError(403, "forbidden", "this endpoint needs the admin key; the API key is not enough")
        return None


def _unauthorized(needs_admin: bool) -> ApiError:
    which = "the admin key" if needs_admin else "a valid key"
    return ApiError(
        401,
        "unauthorized",
        f"{which} is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},  # RFC 9110: a 401 names the scheme it wants
    )


class KeyRequirement:
    """A route dependency naming the ``access`` its route needs; ``key_guard.AccessTable`` reads it from there."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def __call__(self, request: Request) -> None:
        policy: KeyPolicy = request.app.state.key_policy
        refusal = policy.refusal(self.access, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal


require_inference = KeyRequirement(Access.INFERENCE)
require_admin = KeyRequirement(Access.ADMIN)
require_health_key = KeyRequirement(Access.HEALTH)
require_metrics_key = KeyRequirement(Access.METRICS)
