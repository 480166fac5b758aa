"""The soak test (python -m loadtests.soak) keeps working: a short run on the tiny model passes all of its checks."""

import subprocess
import sys

from tests.helpers.paths import REPO_ROOT


def test_short_soak_passes() -> None:
    duration = 15
    run = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--duration", str(duration), "--seed", "1"],
        capture_output=True, text=True, timeout=duration + 120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
    assert "**FAIL**" not in run.stdout
    for kind in ("generate-stream", "completions-stream", "upload", "delete", "hang-up-stream", "overload"):
        assert f"| {kind} |" in run.stdout, f"no {kind} request in a {duration} s soak:\n{run.stdout}"
