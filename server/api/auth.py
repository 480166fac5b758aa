"""Optional API keys: an inference key for generation, an admin key for adapter uploads and deletes.

Keys arrive as ``Authorization: Bearer <key>`` and are compared in constant time; they are never logged. The admin
key also works for inference. With no key configured, the endpoint is open (and the server binds to 127.0.0.1 by
default). ``/health``, ``/ready`` and ``/metrics`` are open unless the settings say they need a key.
"""

import hmac

from fastapi import Request

from server.api.errors import ApiError
from server.service import Service


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(presented: str | None, *keys: str | None) -> bool:
    if presented is None:
        return False
    ok = False
    for key in keys:  # compare against every configured key so timing does not tell which one exists
        if key is not None and hmac.compare_digest(presented.encode(), key.encode()):
            ok = True
    return ok


def _keys(request: Request) -> tuple[str | None, str | None]:
    service: Service = request.app.state.service
    settings = service.settings
    api = settings.api_key.get_secret_value() if settings.api_key else None
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    return api, admin


def require_inference(request: Request) -> None:
    api, admin = _keys(request)
    if api is None and admin is None:
        return
    if not _matches(_presented(request), api, admin):
        raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)")


def require_admin(request: Request) -> None:
    api, admin = _keys(request)
    key = admin if admin is not None else api  # without an admin key, the API key guards adapters too
    if key is None:
        return
    if not _matches(_presented(request), key):
        raise ApiError(403 if _presented(request) else 401, "forbidden", "the admin key is required for this endpoint")


def require_health_key(request: Request) -> None:
    """``/health`` and ``/ready`` are open unless ``health_requires_key`` is set (then any valid key works)."""
    if request.app.state.service.settings.health_requires_key:
        require_inference(request)


def require_metrics_key(request: Request) -> None:
    """``/metrics`` is open unless ``metrics_requires_key`` is set (Prometheus then sends the key as a bearer token)."""
    if request.app.state.service.settings.metrics_requires_key:
        require_inference(request)
