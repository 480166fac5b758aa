"""The Ray Serve benchmark runs end to end on the tiny model: both parts, every request answered, the ratios and
the greedy-text comparison reported (printed and in its JSON)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO_ROOT

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (.[ray])"),
]


def test_bench_ray_quick(tmp_path: Path) -> None:
    out = tmp_path / "ray.json"
    cmd = [sys.executable, "-m", "loadtests.bench_ray", "--tiny", "--requests", "8", "--adapters", "5",
           "--gpu-slots", "2", "--cpu-slots", "1", "--rate", "4", "--check", "3", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    a, b = figures["a"], figures["b"]
    for run in (a["adapter"], a["round-robin"], b["direct"], b["ray"]):
        assert run["ok"] == 8 and not run["errors"], run
        assert run["output_tps"] > 0 and run["ttft_p50_s"] > 0 and run["loads"] >= 0
    assert math.isfinite(a["loads_ratio"]) and a["loads_ratio"] >= 0
    assert b["tps_ratio"] > 0
    assert b["texts_checked"] == 3 and b["texts_equal"] == 3  # greedy: the Ray path says what a single server says
    text = done.stdout
    assert f"loads round-robin / adapter = {a['loads_ratio']:.2f}" in text
    assert f"tokens/s ray / direct = {b['tps_ratio']:.3f}" in text
    assert "greedy texts equal (ray vs direct, one at a time): 3/3" in text
