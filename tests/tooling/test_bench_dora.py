"""The DoRA engine benchmark runs end to end on the tiny model and serves the share of DoRA it was asked for."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import REPO_ROOT


def test_bench_dora_quick(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "dora.json"
    cmd = [sys.executable, "-m", "loadtests.bench_dora", "--base-model", str(tiny_model_dir("llama")),
           "--requests", "8", "--adapters", "3", "--rank", "4", "--batch", "4", "--slots", "2", "--rounds", "1",
           "--dora-fraction", "0.5", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    assert figures["dora_adapters"] and 0 < figures["dora_share_requests"] < 1
    assert all(v > 0 for v in figures["tokens_per_second"].values()) and figures["with_dora_over_all_plain"] > 0
