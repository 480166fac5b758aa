"""Errors as JSON ``{"error": {"type", "message"}}`` with the right status; nothing a client sends becomes a 500."""

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapters.registry_records import StoreUnavailable

log = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; nothing is left to answer."""


class ApiError(Exception):
    """An error answered to the client as it is."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


_HTTP_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
    504: "timeout",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and all(err.get("type") == "extra_forbidden" for err in errors):
            # Fields the server does not know: refused, never ignored (the answer would look right and be wrong).
            fields = ", ".join(_field(err) for err in errors)
            return error_response(400, "unsupported_field", f"unknown field(s), not supported by this server: {fields}")
        problems = [f"{_field(err)}: {err.get('msg')}" if _field(err) else str(err.get("msg")) for err in errors]
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "error"), str(exc.detail), headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the access log does

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, exc: StoreUnavailable) -> JSONResponse:
        # An adapter's files could not be fetched from the object store (any route that reads one): retryable.
        log.warning("%s", exc)
        return error_response(503, "unavailable", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")


def _field(err: Mapping[str, Any]) -> str:
    """The dotted path of the field a validation error is about, without FastAPI's leading "body"."""
    return ".".join(str(part) for part in err.get("loc", ()) if part != "body")
