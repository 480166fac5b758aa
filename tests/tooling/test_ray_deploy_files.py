"""Static checks of the Ray deployment files: deploy/ray/serve_config.yaml (``serve run``/``serve deploy``) and
deploy/ray/rayservice.yaml (KubeRay). The application must build from its config without a cluster, the two files
must describe the same application, and the cluster's pods must provide what the application asks for."""

import importlib.util
import re

import pytest
import yaml

from server.deploy.ray_settings import settings_from_args
from tests.helpers.paths import REPO_ROOT

SERVE_CONFIG = REPO_ROOT / "deploy/ray/serve_config.yaml"
RAY_SERVICE = REPO_ROOT / "deploy/ray/rayservice.yaml"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (.[ray])")


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_the_application_args_are_valid_settings() -> None:
    [app] = _serve_config()["applications"]
    assert app["import_path"] == "server.deploy.ray_app:app_builder" and app["route_prefix"] == "/"
    settings = settings_from_args(app["args"])  # refuses a name that is not a setting
    assert settings.device == "cuda" and settings.replica_gpus == 1
    assert settings.min_replicas is not None and settings.max_replicas is not None


@needs_ray
def test_ray_accepts_the_config_and_the_application_builds_without_a_cluster() -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from server.deploy.ray_app import app_builder

    config = _serve_config()
    ServeDeploySchema.parse_obj(config)
    assert isinstance(app_builder(config["applications"][0]["args"]), Application)


def test_the_rayservice_runs_the_same_application_on_pods_that_fit_it() -> None:
    service = yaml.safe_load(RAY_SERVICE.read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _serve_config()
    args = _serve_config()["applications"][0]["args"]
    cluster = service["spec"]["rayClusterConfig"]
    [workers] = cluster["workerGroupSpecs"]
    [container] = workers["template"]["spec"]["containers"]
    assert float(container["resources"]["limits"]["nvidia.com/gpu"]) >= args["replica_gpus"]
    assert float(container["resources"]["limits"]["cpu"]) >= args["replica_cpus"]
    assert workers["maxReplicas"] * float(container["resources"]["limits"]["nvidia.com/gpu"]) >= args["max_replicas"]
    for spec in (cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]):
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert args["data_dir"] in mounts, "every node sees the shared adapter store at data_dir"
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    pin = re.search(r'"ray\[serve\]>=(\d+)\.(\d+),<(\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert (int(pin[1]), int(pin[2])) <= (major, minor) and major < int(pin[3])


def test_the_image_can_be_built_with_the_ray_extra() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS=" in dockerfile and 'pip install ".${EXTRAS:+[${EXTRAS}]}"' in dockerfile
