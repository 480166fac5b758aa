"""A real S3-compatible server for the ``--adapter-store`` tests: moto's standalone server as a subprocess on a free
port (``python -m moto.server``), with throwaway credentials in the environment. Tests skip when moto is missing."""

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from loadtests.common.server_process import free_port

# boto3's standard chain reads these: never real keys, and never a flag.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def have_moto() -> bool:
    return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("boto3") is not None


@contextmanager
def moto_server(log: Path, timeout: float = 30.0, check_credentials: bool = False) -> Iterator[str]:
    """Run moto's S3 server until the block ends; yields its endpoint URL. ``check_credentials``: moto checks every
    request against its (empty) IAM, so any key is refused with 403, as a real server refuses a wrong one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **FAKE_CREDENTIALS}
    if check_credentials:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not up after {timeout}s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())


def new_bucket(endpoint: str) -> str:
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
    }
