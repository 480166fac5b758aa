"""The CLI refuses a data directory it did not create (``--data-dir .`` in a user's project) and deletes nothing:
the reported case of unit/test_data_dir.py, through a real ``lora-server serve`` process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import REPO_ROOT
from tests.helpers.registry_fakes import snapshot, user_project


def test_cli_refuses_a_users_folder_and_exits_non_zero(tmp_path: Path, tiny_model_dir) -> None:
    """``lora-server serve --data-dir .`` in the user's project (default --startup-adapters adapters): the process
    says why and exits 2, and every file is still there. (The port is held by this test, so that a server that did
    not refuse stops at its bind instead of serving.)"""
    root = user_project(tmp_path / "project")
    before = snapshot(root)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LORA_SERVER_CACHE_DIR": str(tmp_path / "cache")}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--data-dir", ".", "--port", port,
             "--base-model", str(tiny_model_dir("llama")), "--max-seq-len", "64", "--gpu-slots", "1"],
            cwd=root, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert snapshot(root) == before
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not created by lora-server" in proc.stderr and "Traceback" not in proc.stderr
