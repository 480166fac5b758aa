"""``--adapter-store``: two real ``lora-server serve`` processes on one S3-compatible bucket (moto's server) and one
``--registry-db``, each with a data directory (its adapter cache) of its own: an upload to A is served by B with the
same greedy tokens, a delete on A is a 404 on B, a damaged object is a 503 on B. (A store that cannot be used refuses
the start: tests/unit/test_object_store.py::test_the_cli_refuses_to_start_on_a_missing_bucket.)"""

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import upload
from tests.helpers.moto_server import (
    FAKE_CREDENTIALS,
    bucket_keys,
    have_moto,
    moto_server,
    new_bucket,
    s3_client,
)

pytestmark = pytest.mark.skipif(not have_moto(), reason="moto and boto3 are needed: pip install -e '.[dev,s3]'")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


def test_two_servers_share_one_bucket(tmp_path: Path, tiny_model_dir, tiny_adapters, endpoint: str) -> None:
    bucket = new_bucket(endpoint)
    for d in ("shared", "a", "b"):
        (tmp_path / d).mkdir()
    flags = ("--adapter-store", f"s3://{bucket}/lora", "--s3-endpoint-url", endpoint,
             "--registry-db", str(tmp_path / "shared" / "registry.db"), "--gpu-slots", "2", "--max-seq-len", "128",
             "--max-batch-size", "2", "--startup-adapters", str(tmp_path / "none"))  # fmt: skip
    model = tiny_model_dir("llama")
    body = {"adapter": "shared-1", "prompt": PROMPT, "max_new_tokens": 8, "ignore_eos": True, "logprobs": 0}
    a = ServerProcess(model, tmp_path / "a" / "data", *flags, env=FAKE_CREDENTIALS)
    b = ServerProcess(model, tmp_path / "b" / "data", *flags, env=FAKE_CREDENTIALS)
    starting = threading.Thread(target=b.start)  # the two start side by side
    starting.start()
    try:
        with a:
            starting.join()
            assert b.proc is not None and b.proc.poll() is None, "server B did not start"
            r = upload(a.url, "shared-1", tiny_adapters("llama")[0])
            assert r.status_code == 201, r.text
            assert len(bucket_keys(endpoint, bucket)) == 2
            assert httpx.get(f"{b.url}/v1/adapters/shared-1", timeout=10).json()["sha256"] == r.json()["sha256"]
            answers = [httpx.post(f"{s.url}/v1/generate", json=body, timeout=60) for s in (a, b)]
            assert [x.status_code for x in answers] == [200, 200], answers[1].text
            tokens = [[t["id"] for t in x.json()["logprobs"]] for x in answers]
            assert tokens[0] == tokens[1] and len(tokens[0]) == 8
            base = httpx.post(f"{b.url}/v1/generate", json={**body, "adapter": None}, timeout=60).json()
            assert [t["id"] for t in base["logprobs"]] != tokens[1]  # B served the adapter, not the base model

            # Replaced on A (deleted, uploaded again with other weights) while B holds the old copy resident: B drops
            # it before answering (server/stale_copies.py), so both answer with the new weights.
            assert httpx.delete(f"{a.url}/v1/adapters/shared-1", timeout=30).status_code == 204
            assert upload(a.url, "shared-1", tiny_adapters("llama")[1]).status_code == 201
            answers = [httpx.post(f"{s.url}/v1/generate", json=body, timeout=60) for s in (a, b)]
            new_tokens = [[t["id"] for t in x.json()["logprobs"]] for x in answers]
            assert new_tokens[0] == new_tokens[1] != tokens[0]

            assert httpx.delete(f"{a.url}/v1/adapters/shared-1", timeout=30).status_code == 204
            assert bucket_keys(endpoint, bucket) == []
            gone = httpx.post(f"{b.url}/v1/generate", json=body, timeout=60)
            assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
            assert httpx.get(f"{b.url}/v1/adapters/shared-1", timeout=10).status_code == 404

            r = upload(a.url, "shared-2", tiny_adapters("llama")[0])  # then damaged in the bucket: B must not serve it
            key = next(k for k in bucket_keys(endpoint, bucket) if k.endswith("adapter_model.safetensors"))
            weights = s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
            s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=weights[:-1] + bytes([weights[-1] ^ 1]))
            bad = httpx.post(f"{b.url}/v1/generate", json={**body, "adapter": "shared-2"}, timeout=60)
            assert bad.status_code == 503 and "do not match its record" in bad.json()["error"]["message"], bad.text

    finally:
        starting.join()
        b.stop()
