"""The Ray Serve application: the ingress, the engine replicas and the replica directory, and ``serve-ray``.

``build(settings)`` returns the application; ``app_builder(args)`` is the same for a ``serve run`` / KubeRay config
(``import_path: server.deploy.ray_app:app_builder``, ``args:`` the settings by name); ``run(settings)`` is
``lora-server serve-ray``: it starts (or joins) Ray, runs the application, and on SIGTERM or SIGINT deletes it,
which lets each replica finish its in-flight requests (``drain_timeout``) before it stops.
"""

import logging
import os
import signal
import threading
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from server.api.app import access_rules, request_body_limit
from server.deploy.directory import ReplicaDirectory
from server.deploy.engine_replica import EngineReplica
from server.deploy.ingress import Ingress
from server.deploy.ray_settings import RaySettings, settings_from_args

log = logging.getLogger(__name__)

APP_NAME = "lora-server"


def build(settings: RaySettings) -> Application:
    # Its calls are internal (two per replica per second): no access-log line each.
    directory = (
        _deployment(ReplicaDirectory)
        .options(num_replicas=1, max_ongoing_requests=1000, logging_config={"enable_access_log": False})
        .bind()
    )
    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.max_replicas is not None:
        scaling = {"autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }}  # fmt: skip
    engine = _deployment(EngineReplica).options(
        **scaling,
        max_ongoing_requests=settings.max_ongoing,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        health_check_period_s=settings.replica_health_period,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.drain_timeout,
        graceful_shutdown_wait_loop_s=1,
        logging_config={"enable_access_log": False},  # the ingress logs each request; this hop would log it again
    )
    ingress = _deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=settings.ingress_replicas, max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
    )  # fmt: skip
    engines = engine.bind(settings.replica_settings(), directory)
    return ingress.bind(settings, engines, directory, access_rules(), request_body_limit(settings))


def _deployment(cls: type) -> Deployment:
    return cast(Deployment, serve.deployment(cls))  # serve.deployment's overloads confuse mypy for a class


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run`` / a RayService ``serveConfigV2``: ``args`` are the settings by field name."""
    return build(settings_from_args(args))


def run(settings: RaySettings) -> int:
    """``lora-server serve-ray``: run until SIGTERM/SIGINT, then drain and stop."""
    # A server must not phone home (and here nothing outside the package registries is reachable); RAY_USAGE_STATS_
    # ENABLED=1 in the environment turns Ray's usage statistics back on.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15, below its own daemons; a local instance's workers are the engine replicas,
    # the work itself (measured: 58 -> 65 tokens/s on the 2-core dev machine with the threads fix below).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if settings.ray_address is not None:
        ray.init(address=settings.ray_address)
    else:
        ray.init(num_cpus=settings.ray_num_cpus, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("lora-server on Ray Serve: http://%s:%d (%d engine replica(s), routing %s)", settings.host,
             settings.port, settings.replicas, settings.routing)  # fmt: skip
    stop.wait()
    log.info("stopping: draining in-flight requests (up to %d s)", settings.drain_timeout)
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
