"""The FastAPI application: routes, error handlers, the body size guard, health and metrics endpoints."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import routes_adapters, routes_generate, routes_openai
from server.api.auth import require_health_key, require_metrics_key
from server.api.body_limit import BodySizeGuard
from server.api.errors import error_response, install_error_handlers
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
    install_error_handlers(app)
    settings = service.settings
    app.add_middleware(
        BodySizeGuard,
        max_upload_bytes=2 * settings.max_upload_bytes + _MULTIPART_OVERHEAD,
        max_request_bytes=settings.max_request_bytes,
    )
    app.include_router(routes_generate.router)
    app.include_router(routes_adapters.router)
    app.include_router(routes_openai.router)

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

    return app
