"""``lora-server``: the command line. ``lora-server serve [flags]`` runs the HTTP server."""

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lora-server", description="Multi-LoRA inference server")
    parser.add_argument("command", choices=["serve", "serve-ray", "prepare-model"], help="serve: run the HTTP "
                        "server; serve-ray: run it as replicas on Ray Serve (pip install -e '.[ray]'); "
                        "prepare-model: convert the embedded default model once and print its folder")  # fmt: skip
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "prepare-model":
        from server.model.embedded import ensure_embedded_model

        print(ensure_embedded_model())
        return 0
    if args.command == "serve-ray":
        return serve_ray(argv[1:])
    return serve(argv[1:])


S = TypeVar("S", bound="Settings")


def _parse(cls: type[S], command: str, flags: list[str]) -> S | None:
    """The settings from flags and environment, logging configured; None (after saying why) when refused."""
    from server.settings_errors import describe

    try:
        settings = cls(_cli_parse_args=flags)
    except (ValidationError, SettingsError) as exc:
        print(f"lora-server {command}: invalid settings\n{describe(exc, flags, os.environ)}", file=sys.stderr)
        return None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


def serve_ray(flags: list[str]) -> int:
    """``lora-server serve-ray``: the same flags as ``serve``, plus the replica flags of RaySettings."""
    from server.deploy.ray_settings import RaySettings

    settings = _parse(RaySettings, "serve-ray", flags)
    if settings is None:
        return 2
    if settings.adapter_store is not None:  # checked before Ray starts: a replica failing it would crash-loop under Ray
        from server.adapters.object_store import open_store
        from server.adapters.registry import RegistryError

        try:
            open_store(settings.adapter_store, settings.s3_endpoint_url)
        except RegistryError as exc:
            print(f"lora-server serve-ray: {exc}", file=sys.stderr)
            return 2
    try:
        from server.deploy import ray_app
    except ImportError as exc:
        print(f"lora-server serve-ray: Ray Serve is not installed ({exc}); pip install -e '.[ray]'", file=sys.stderr)
        return 2
    return ray_app.run(settings)


def serve(flags: list[str]) -> int:
    from server.config import Settings

    settings = _parse(Settings, "serve", flags)
    if settings is None:
        return 2
    if settings.api_key is None and settings.admin_key is None:
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no API keys are configured and the server listens on %s: anyone who can reach it can "
                        "upload adapters and generate", settings.host)  # fmt: skip
        else:
            log.info("no API keys are configured: listening on %s only", settings.host)
    if settings.lora_load_dir is not None:
        log.info("POST /v1/load_lora_adapter may register adapters from folders under %s", settings.lora_load_dir)

    import uvicorn

    from server.adapters.registry import RegistryError
    from server.api.app import create_app
    from server.service import Service

    try:
        service = Service(settings)
    except RegistryError as exc:  # e.g. a data directory that is not the server's: say why, no traceback
        print(f"lora-server serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.drain_timeout)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
