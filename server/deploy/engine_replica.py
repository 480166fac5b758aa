"""One engine replica: the single-node server (model, registry on the shared store, engine, HTTP app) as a Ray Serve
deployment replica, on the CPUs or GPU Ray reserves for it.

The ingress forwards each HTTP request whole (``ForwardedRequest``); the replica answers it with the single-node app
itself (``forwarding.call_asgi``), so every route, check and error body is the same as ``lora-server serve``'s.
Every response carries ``x-lora-replica: <replica id>``.

Adapter affinity is Ray Serve's model multiplexing: the ingress names the request's adapter as the multiplexed model
id, Serve routes it to a replica that has that id loaded, and loading an id into Serve's multiplex cache is our slot
cache's read-ahead (``Engine.preload``: the adapter read from the store into the CPU tier). Serve's cache holds as
many ids as our tiers keep copies (``multiplex_capacity``), and Serve evicting an id drops our CPU-tier copy, so the
two caches agree on what this replica is preferred for.

Staleness: another replica may delete an adapter, or delete it and upload a new one under the same name. Before a
request is answered, each adapter it names is looked up in the shared registry; one that is gone or has a new
``uid`` is dropped from this engine first (``Engine.forget_adapter``). The report loop does the same for everything
this replica has seen, every second, so deleted adapters do not hold memory here.
"""

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable

from prometheus_client import generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.api.app import create_app
from server.config import Settings
from server.deploy.directory import REPORT_PERIOD_S, ReplicaReport
from server.deploy.forwarding import ForwardedRequest, ResponseStart, call_asgi
from server.deploy.routing import adapter_names, routing_id
from server.service import DEFAULT_POOL_MAX_RANK_ADAPTERS, Service

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-lora-replica"


def multiplex_capacity(settings: Settings) -> int:
    """How many model ids Serve's multiplex cache keeps per replica: the adapters this engine keeps a copy of (its CPU
    tier, which holds every adapter read, so also those in slots; without one, the slots of a default-sized pool),
    plus the base model's id."""
    return max(settings.cpu_slots, min(settings.gpu_slots, DEFAULT_POOL_MAX_RANK_ADAPTERS)) + 1


class LoadedAdapter:
    """What Ray Serve's multiplex cache holds for one model id; ``evicted(model_id)`` runs when Serve drops it."""

    def __init__(self, model_id: str, evicted: Callable[[str], None]) -> None:
        self.model_id, self._evicted, self._done = model_id, evicted, False

    def __del__(self) -> None:  # Serve calls it on eviction, and the garbage collector may call it again
        if not self._done:
            self._done = True
            self._evicted(self.model_id)


class EngineReplica:
    def __init__(self, settings: Settings, directory: DeploymentHandle) -> None:
        self.service = Service(settings)
        self.service.start()
        self.app = create_app(self.service)  # its lifespan is not run: the replica starts and stops the service
        self.base_model_id = self.service.base_model_id
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._directory = directory
        self._models: set[str] = set()  # the ids Serve's multiplex cache holds here
        self._header = ((REPLICA_HEADER, self.replica_id),)
        capacity = multiplex_capacity(settings)

        async def load(model_id: str) -> LoadedAdapter:
            await asyncio.to_thread(self._preload, model_id)
            self._models.add(model_id)
            return LoadedAdapter(model_id, self._unloaded)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="replica-report", daemon=True)
        self._reporter.start()
        log.info("engine replica %s ready (pid %d)", self.replica_id, os.getpid())

    async def http(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Answer one forwarded HTTP request: a ResponseStart, then the body's chunks (streamed for SSE)."""
        key = routing_id(request.method, request.path, request.body, self.base_model_id)
        names = adapter_names(key, self.base_model_id)
        if names:
            await asyncio.to_thread(self.service.stale_copies.check, names)
        model_id = serve.get_multiplexed_model_id()
        if model_id and (model_id == self.base_model_id or all(n in self.service.registry for n in names)):
            await self.load_adapter(model_id)
        async for item in call_asgi(self.app, request, self._header):
            yield item

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop stopped is replaced."""
        if not self.service.ready:
            raise RuntimeError(f"the engine is not running: {self.service.engine.stopped_reason}")

    def __del__(self) -> None:
        """Ray Serve's graceful shutdown, after in-flight requests finished (or its timeout passed)."""
        self._stop.set()
        try:
            self._directory.leave.remote(self.replica_id)
        except Exception:  # the directory may be gone first when the whole application shuts down
            pass
        self.service.stop()

    # ---- internals ------------------------------------------------------------------------------------------------
    def _preload(self, model_id: str) -> None:
        if model_id == self.base_model_id:
            return
        try:
            self.service.engine.preload(model_id)
        except Exception as exc:  # the request itself answers what is wrong (404, 400...) through the app
            log.info("read-ahead of %r failed: %s", model_id, exc)

    def _unloaded(self, model_id: str) -> None:
        self._models.discard(model_id)
        if model_id != self.base_model_id:
            self.service.engine.drop_preloaded(model_id)

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                self.service.stale_copies.check_all()
                wanted = self._directory.report.remote(self._report()).result(timeout_s=10)
                if wanted:  # a scrape is waiting (see directory.py: metrics are sent on demand)
                    metrics = generate_latest(self.service.metrics.registry).decode()
                    self._directory.put_metrics.remote(self.replica_id, metrics).result(timeout_s=10)
            except Exception:
                log.warning("could not report to the replica directory", exc_info=True)

    def _report(self) -> ReplicaReport:
        engine = self.service.engine
        return ReplicaReport(
            replica_id=self.replica_id,
            pid=os.getpid(),
            node=socket.gethostname(),
            ready=self.service.ready,
            running=engine.num_running,
            queued=engine.queue_length(),
            resident=sorted(engine.slot_cache.resident()),
            host_copies=engine.slot_cache.host_names(),
            multiplexed=sorted(self._models),
        )
