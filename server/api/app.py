"""The FastAPI application: routes, error handlers, the key and body size guards, health and metrics endpoints."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import routes_adapters, routes_generate, routes_openai, routes_vllm
from server.api.auth import KeyPolicy, require_health_key, require_metrics_key
from server.api.body_limit import BodySizeGuard
from server.api.errors import error_response, install_error_handlers
from server.api.key_guard import AccessTable, KeyGuard, document_keys
from server.service import Service

# Multipart framing around the two files of an upload; bodies beyond 2 * max_upload_bytes + this are refused.
_MULTIPART_OVERHEAD = 1 << 20


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
    app.include_router(routes_generate.router)
    app.include_router(routes_adapters.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_vllm.router)

    @app.get("/health", dependencies=[Depends(require_health_key)])
    async def health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        dependencies=[Depends(require_health_key)],
        responses={503: {"description": "model not loaded, engine not running, or draining"}},
    )
    async def ready(request: Request) -> JSONResponse:
        """The model is loaded and the engine loop is running."""
        if request.app.state.service.ready:
            return JSONResponse({"status": "ready"})
        return error_response(503, "unavailable", "the engine is not running")

    @app.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics_key)])
    async def metrics(request: Request) -> Response:
        """Prometheus metrics, text exposition format."""
        body = generate_latest(request.app.state.service.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    max_upload_body = 2 * settings.max_upload_bytes + _MULTIPART_OVERHEAD
    app.add_middleware(BodySizeGuard, max_upload_bytes=max_upload_body, max_request_bytes=settings.max_request_bytes)
    # Added last, so it runs first: keys are decided from the head, before BodySizeGuard or a parser reads the body.
    # The table is built here, once every route exists; a route that declares no key requirement stops startup.
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.state.access_table = AccessTable.from_routes(app.routes, open_paths=docs)
    largest_body = max(max_upload_body, settings.max_request_bytes)
    app.add_middleware(KeyGuard, policy=app.state.key_policy, table=app.state.access_table, max_body_bytes=largest_body)

    generate_openapi = app.openapi  # FastAPI's, which caches its schema in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_keys(generate_openapi(), app.state.access_table, app.state.key_policy)
        return generate_openapi()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app
