"""The FastAPI application: routes, error handlers, the key and body size guards, health and metrics endpoints."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.api import routes_adapters, routes_generate, routes_openai, routes_ops, routes_vllm
from server.api.auth import KeyPolicy
from server.api.body_limit import BodySizeGuard
from server.api.errors import install_error_handlers
from server.api.key_guard import AccessTable, KeyGuard, Rule, document_keys
from server.config import Settings
from server.service import Service

# Multipart framing around the two files of an upload; bodies beyond 2 * max_upload_bytes + this are refused.
_MULTIPART_OVERHEAD = 1 << 20


def include_routes(app: FastAPI) -> None:
    """Every route of the server's API (the Ray ingress builds its key table from the same list)."""
    for router in (routes_generate.router, routes_adapters.router, routes_openai.router, routes_vllm.router,
                   routes_ops.router):  # fmt: skip
        app.include_router(router)


def documentation_paths(app: FastAPI) -> tuple[str | None, ...]:
    """FastAPI's own documentation routes, which never need a key."""
    return (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)


def access_rules() -> list[Rule]:
    """The key table of the server's routes as plain data (the Ray ingress checks keys with it, without importing
    the routes, which import the engine and torch)."""
    app = FastAPI()
    include_routes(app)
    return AccessTable.from_routes(app.routes, open_paths=documentation_paths(app)).rules()


def request_body_limit(settings: Settings) -> tuple[int, int]:
    """(largest upload body, largest body of any request): what ``BodySizeGuard`` and ``KeyGuard`` enforce."""
    max_upload_body = 2 * settings.max_upload_bytes + _MULTIPART_OVERHEAD
    return max_upload_body, max(max_upload_body, settings.max_request_bytes)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="lora-server",
        summary="One frozen base model, many LoRA adapters, served request by request.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    settings = service.settings
    app.state.key_policy = KeyPolicy.from_settings(settings)
    install_error_handlers(app)
    include_routes(app)

    max_upload_body, largest_body = request_body_limit(settings)
    app.add_middleware(BodySizeGuard, max_upload_bytes=max_upload_body, max_request_bytes=settings.max_request_bytes)
    # Added last, so it runs first: keys are decided from the head, before BodySizeGuard or a parser reads the body.
    # The table is built here, once every route exists; a route that declares no key requirement stops startup.
    app.state.access_table = AccessTable.from_routes(app.routes, open_paths=documentation_paths(app))
    app.add_middleware(KeyGuard, policy=app.state.key_policy, table=app.state.access_table, max_body_bytes=largest_body)

    generate_openapi = app.openapi  # FastAPI's, which caches its schema in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_keys(generate_openapi(), app.state.access_table, app.state.key_policy)
        return generate_openapi()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app
