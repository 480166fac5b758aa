"""Runs ``lora-server serve`` as a real process on 127.0.0.1, for the HTTP tests, the soak and the benchmarks."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, base_model: Path, data_dir: Path, *flags: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:  # fmt: skip
        """``cwd``: run the ``server`` package of that checkout (``python -m`` puts it first on the path)."""
        self.port = free_port()
        self.cwd = cwd
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "server.cli", "serve",
            "--base-model", str(base_model), "--data-dir", str(data_dir), "--port", str(self.port),
            "--host", "127.0.0.1", "--log-level", "warning", *flags,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0, ready_headers: dict[str, str] | None = None) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", headers=ready_headers, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
