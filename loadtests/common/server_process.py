"""Runs ``lora-server serve`` as a real process on 127.0.0.1, for the HTTP tests, the soak and the benchmarks."""

import contextlib
import os
import signal
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
                 cwd: Path | None = None, command: str = "serve") -> None:  # fmt: skip
        """``cwd``: run the ``server`` package of that checkout (``python -m`` puts it first on the path).
        ``command``: ``serve``, or ``serve-ray`` (a local Ray instance; the process gets its own session, so that
        ``stop`` can remove every Ray process it started, even after a crash)."""
        self.command = command
        self.port = free_port()
        self.cwd = cwd
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "server.cli", command,
            "--base-model", str(base_model), "--data-dir", str(data_dir), "--port", str(self.port),
            "--host", "127.0.0.1", "--log-level", "warning", *flags,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0, ready_headers: dict[str, str] | None = None) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=self.command == "serve-ray")  # fmt: skip
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

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL after ``timeout``; the exit code (None when it was not running)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            if self.command == "serve-ray":  # Ray's own processes (raylet, workers) left by a failed shutdown
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
