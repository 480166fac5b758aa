"""The HTTP ingress: the server's API on one endpoint in front of every engine replica.

It answers ``/health``, ``/ready``, ``/metrics`` and ``/v1/replicas`` itself, from what the replicas report to the
directory, and forwards every other request whole to an engine replica. Generation requests carry their adapter as
Ray Serve's multiplexed model id (``routing.routing_id``), so Serve's router sends them to a replica that has the
adapter loaded; the rest (uploads, deletes, listings) go to any replica, since all replicas share one adapter store.

Keys and body sizes are checked here, from the head, exactly as a single server checks them (the same ``KeyGuard``
table, built from the same routes), so a refused upload is never read, let alone shipped to a replica; the replica
checks them again. A replica that dies while it holds a request fails that request only: 503 before the answer
started, or, mid-stream, a last Server-Sent Event ``{"error": ...}`` and the end of the stream.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray.exceptions import RayError, TaskCancelledError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message, Receive, Scope, Send

from server.api.auth import Access, KeyPolicy, require_health_key, require_inference, require_metrics_key
from server.api.body_limit import BodySizeGuard
from server.api.errors import error_response, install_error_handlers
from server.api.key_guard import AccessTable, KeyGuard, Rule
from server.deploy.directory import METRICS_WAIT_S, ReplicaReport
from server.deploy.forwarding import ForwardedRequest, ResponseStart
from server.deploy.ray_settings import RaySettings
from server.deploy.replica_metrics import registry_for
from server.deploy.routing import routing_id
from server.model.embedded import EMBEDDED_MODEL_ID

log = logging.getLogger(__name__)

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_RETRY = {"Retry-After": "1"}


class Ingress:
    def __init__(
        self,
        settings: RaySettings,
        engine: DeploymentHandle,
        directory: DeploymentHandle,
        access_rules: list[Rule],
        body_limits: tuple[int, int],
    ) -> None:
        """``access_rules``: the server's key table (``server.api.app.access_rules``); ``body_limits``: its largest
        upload body and largest body of any request. Both come from the application's builder, so this process never
        imports the server's routes (they import the engine, hence torch)."""
        self.settings = settings
        self._rules, self._body_limits = access_rules, body_limits
        self.engine = engine
        self.directory = directory
        self.base_model_id = settings.base_model.name if settings.base_model else EMBEDDED_MODEL_ID
        self._asgi = self._build_app()  # not `app`: Serve's ingress wrapper owns that attribute

    def __serve_build_asgi_app__(self) -> "CancelledReceive":
        return CancelledReceive(self._asgi)

    # ---- the app ---------------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="lora-server (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)
        app.state.key_policy = KeyPolicy.from_settings(self.settings)
        install_error_handlers(app)
        app.add_api_route("/health", self.health, methods=["GET"], dependencies=[Depends(require_health_key)])
        app.add_api_route("/ready", self.ready, methods=["GET"], dependencies=[Depends(require_health_key)])
        app.add_api_route("/metrics", self.metrics, methods=["GET"], dependencies=[Depends(require_metrics_key)])
        app.add_api_route("/v1/replicas", self.replicas, methods=["GET"], dependencies=[Depends(require_inference)])
        app.add_api_route("/{path:path}", self.forward, methods=_METHODS, include_in_schema=False)
        # The key table of a single server plus /v1/replicas; the catch-all is not in it, so a path neither knows
        # needs a key (when keys are set) and then gets the replica's 404.
        table = AccessTable.from_rules([*self._rules, ("/v1/replicas", ("GET",), (Access.INFERENCE.value,))])
        max_upload_body, largest_body = self._body_limits
        app.add_middleware(BodySizeGuard, max_upload_bytes=max_upload_body,
                           max_request_bytes=self.settings.max_request_bytes)  # fmt: skip
        app.add_middleware(KeyGuard, policy=app.state.key_policy, table=table, max_body_bytes=largest_body)
        return app

    async def health(self) -> dict[str, str]:
        """The ingress is alive."""
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        """Ready while at least one engine replica is (each reports every second)."""
        up, target = self._counts(await self._reports())
        if up:
            return JSONResponse({"status": "ready", "replicas_up": up, "replicas_target": target})
        return error_response(503, "unavailable", f"no engine replica is ready (0 of {target} up)")

    async def metrics(self) -> Response:
        """Every replica's metrics, labelled ``replica``, and ``lora_ray_replicas{state="up"|"target"}``."""
        reports, texts = await self._fresh_metrics()
        up, target = self._counts(reports)
        body = generate_latest(registry_for(lambda: (texts, up, target)))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def replicas(self) -> JSONResponse:
        """The engine replicas heard from lately: readiness, load, and which adapters each holds."""
        reports = await self._reports()
        fields = ("replica_id", "pid", "node", "ready", "running", "queued", "resident", "host_copies", "multiplexed")
        rows = [{f: getattr(r, f) for f in fields} for r in reports]
        return JSONResponse({"replicas": rows, "target": self._target(reports), "routing": self.settings.routing})

    async def forward(self, request: Request) -> Response:
        body = await request.body()  # within BodySizeGuard's limits
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     tuple(request.headers.items()), body, client)  # fmt: skip
        model_id = routing_id(request.method, request.url.path, body, self.base_model_id)
        handle = self.engine.options(stream=True)
        if model_id is not None and self.settings.routing == "adapter":
            handle = self.engine.options(stream=True, multiplexed_model_id=model_id)
        stream = cast(DeploymentResponseGenerator, handle.http.remote(forwarded))
        try:
            start = await stream.__anext__()
        except BackPressureError as exc:
            return error_response(429, "queue_full", f"every engine replica is at capacity: {exc}", _RETRY)
        except (RayError, StopAsyncIteration) as exc:
            log.warning("engine replica failed before answering %s %s: %s", request.method, request.url.path, exc)
            return error_response(503, "replica_failed", "the engine replica handling this request stopped before "
                                  "answering; other replicas keep serving: retry", _RETRY)  # fmt: skip
        assert isinstance(start, ResponseStart)
        streaming = (start.header("content-type") or "").startswith("text/event-stream")
        return StreamingResponse(_rest(stream, streaming), status_code=start.status, headers=dict(start.headers))

    # ---- the directory -------------------------------------------------------------------------------------------
    async def _reports(self) -> list[ReplicaReport]:
        try:
            reports: list[ReplicaReport] = await self.directory.snapshot.remote()
        except RayError:
            log.warning("the replica directory did not answer", exc_info=True)
            return []
        return reports

    async def _fresh_metrics(self) -> tuple[list[ReplicaReport], dict[str, str]]:
        """The live replicas and their metrics, sent after this call began (or the last ones sent, for a replica that
        did not answer within METRICS_WAIT_S)."""
        try:
            since: float = await self.directory.want_metrics.remote()
            deadline = time.monotonic() + METRICS_WAIT_S
            while True:
                reports, texts, fresh = await self.directory.metrics.remote(since)
                if fresh or time.monotonic() > deadline:
                    return reports, texts
                await asyncio.sleep(0.05)
        except RayError:
            log.warning("the replica directory did not answer", exc_info=True)
            return [], {}

    def _counts(self, reports: list[ReplicaReport]) -> tuple[int, int]:
        """(replicas up, replicas the deployment asks for)."""
        return sum(r.ready for r in reports), self._target(reports)

    def _target(self, reports: list[ReplicaReport]) -> int:
        return self.settings.replicas if self.settings.max_replicas is None else len(reports)


class CancelledReceive:
    """Ray Serve's ``receive`` raises ``TaskCancelledError`` where an ASGI server's is cancelled (Starlette's
    disconnect listener, stopped when a streamed response ends); raised as cancellation again, so the listener stops
    quietly instead of logging an "unhandled error" per stream."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def cancellable_receive() -> Message:
            try:
                return await receive()
            except TaskCancelledError:
                raise asyncio.CancelledError from None

        await self.app(scope, cancellable_receive, send)


async def _rest(stream: DeploymentResponseGenerator, sse: bool) -> AsyncIterator[bytes]:
    """The body after its start; a replica lost mid-stream ends an SSE stream with an error event, and cuts any
    other body short (the connection is closed, so the client cannot take a truncated body for a whole one)."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except RayError as exc:
        log.warning("engine replica failed mid-response: %s", exc)
        if not sse:
            raise
        error = {"type": "replica_failed", "message": "the engine replica generating this stream stopped; the "
                 "tokens above are all it made; retry the request"}  # fmt: skip
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
        finished = True
    finally:
        if not finished:
            stream.cancel()  # the client went away: the replica's app sees the disconnect and frees the row
