"""Settings of ``lora-server serve-ray``: every flag of ``lora-server serve`` (each engine replica runs that server)
plus how many replicas, on what resources, and which Ray cluster. Ray-free, so it is validated before Ray starts."""

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from server.config import Settings


class RaySettings(Settings):
    model_config = SettingsConfigDict(**{**Settings.model_config, "cli_prog_name": "lora-server serve-ray"})

    replicas: int = Field(2, ge=1, le=1024, description="engine replicas (the initial count when autoscaling)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound; set with max_replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound; unset: a fixed count")
    target_ongoing_requests: float = Field(
        64.0, gt=0, description="autoscaling: requests in flight per replica that Ray Serve aims for"
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each engine replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each engine replica (1: one each)")
    replica_max_ongoing: int | None = Field(
        None,
        ge=1,
        description="requests one replica takes before Ray Serve routes elsewhere; default max_batch_size + max_queue "
        "(its batch and its queue: past that, requests wait in Serve's router)",
    )
    ingress_replicas: int = Field(1, ge=1, le=64, description="replicas of the HTTP ingress")
    routing: Literal["adapter", "round-robin"] = Field(
        "adapter",
        description="adapter: each request goes to a replica that has its adapter loaded (Ray Serve model "
        "multiplexing); round-robin: Ray Serve's plain load balancing (for comparison)",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto': the local node's); unset: start a local Ray instance"
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray instance; default: all")
    replica_health_period: float = Field(2.0, gt=0, description="seconds between Ray Serve's replica health checks")

    @model_validator(mode="after")
    def _check_scaling(self) -> "RaySettings":
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas are set together (autoscaling) or not at all")
        if self.max_replicas is not None and self.min_replicas is not None:
            if not self.min_replicas <= self.replicas <= self.max_replicas:
                raise ValueError("replicas (the initial count) must lie between min_replicas and max_replicas")
        if self.replica_gpus == 0 and self.device == "cuda":
            raise ValueError("device=cuda needs replica_gpus > 0: Ray gives a replica only the GPUs it reserves")
        return self

    @property
    def max_ongoing(self) -> int:
        return self.replica_max_ongoing or self.max_batch_size + self.max_queue

    def replica_settings(self) -> Settings:
        """What each engine replica runs: the single-server settings, with the Ray fields left out."""
        values = {name: getattr(self, name) for name in Settings.model_fields}
        if self.cpu_threads is None:  # as many threads as Ray reserved CPUs: others run beside the replica
            values["cpu_threads"] = max(1, int(self.replica_cpus))
        return Settings.model_construct(**values)  # validated already, as part of this object


def settings_from_args(args: dict[str, Any]) -> RaySettings:
    """The settings of a ``serve run`` config's ``args`` (field names, as in the CLI with '_' for '-'); a name that
    is not a setting is refused rather than ignored."""
    unknown = sorted(set(args) - set(RaySettings.model_fields))
    if unknown:
        raise ValueError(f"unknown setting(s) in the application args: {', '.join(unknown)}")
    return RaySettings(**args)
