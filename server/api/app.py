"""The FastAPI application: routes, error handlers, the upload size guard, health and metrics endpoints."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import routes_adapters, routes_generate, routes_openai
from server.api.errors import error_response, install_error_handlers
from server.service import Service

# Multipart framing around the two files of an upload; bodies beyond max_upload_bytes + this are refused.
_MULTIPART_OVERHEAD = 1 << 20


class UploadSizeGuard:
    """Answers 413 from the Content-Length header, before a large body is read, on adapter uploads."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/adapters":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = error_response(413, "too_large", f"upload bodies are limited to {self.max_bytes} bytes")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    app.add_middleware(UploadSizeGuard, max_bytes=2 * service.settings.max_upload_bytes + _MULTIPART_OVERHEAD)
    app.include_router(routes_generate.router)
    app.include_router(routes_adapters.router)
    app.include_router(routes_openai.router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "model not loaded or engine not running"}})
    async def ready(request: Request) -> JSONResponse:
        """The model is loaded and the engine loop is running."""
        if request.app.state.service.ready:
            return JSONResponse({"status": "ready"})
        return error_response(503, "unavailable", "the engine is not running")

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics, text exposition format."""
        body = generate_latest(request.app.state.service.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
