"""loadtests.bench_merged: a quick run on the tiny model, the three contenders side by side."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import REPO_ROOT


def test_bench_merged_quick(tiny_model_dir, tmp_path: Path) -> None:
    """It merges and unmerges once, every contender makes every token, and merged = unmerged greedy tokens."""
    out = tmp_path / "merged.json"
    cmd = [sys.executable, "-m", "loadtests.bench_merged", "--base-model", str(tiny_model_dir("llama")),
           "--requests", "12", "--others", "2", "--rank", "4", "--batch", "6", "--patience", "2", "--threads", "1",
           "--replay-iterations", "2", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    [stats] = figures["merge_stats"]
    assert stats["merges"] >= 1 and stats["merged_steps"] > 0
    assert figures["same_tokens"] == 12
    assert set(figures["tokens_per_second"]) == {"base-only", "unmerged", "merged"}
    assert all(v > 0 for v in figures["tokens_per_second"].values())
    assert {name: len(t) for name, t in figures["replay_decode_seconds"].items()} == dict.fromkeys(
        ("base-only", "unmerged", "merged"), 2
    )
