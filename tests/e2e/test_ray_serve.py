"""``lora-server serve-ray`` end to end: a local Ray instance, the ingress and 2 engine replicas on the tiny model.

One application serves the whole module; the tests run in file order and the last one stops it with SIGTERM. What
is proven, each over real HTTP through the ingress:
* an adapter's requests go to the replica that has it loaded (``x-lora-replica``, and what that replica reports);
* uploads land once in the shared store and are served by both replicas with PEFT's greedy tokens, and a hot
  adapter spreads to the second replica when the first is busy (``--replica-max-ongoing 1``);
* a delete is seen by both, and a re-upload under the same name is served with its new weights by both;
* ``/metrics`` merges both replicas (promtool-valid), keys are checked at the ingress;
* a replica killed mid-stream fails only that stream (a last ``error`` event), Ray replaces it, serving goes on;
* SIGTERM drains: a stream in flight completes, the process exits 0.

Marked ``ray`` (``-m "not ray"`` skips it where a Ray instance cannot start); skipped when Ray is not installed.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from loadtests.common.peft_reference import PeftReference
from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import sse_events, upload

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (.[ray])"),
]

PROMPT = "the customer asked about a refund"
API, ADMIN = "test-api-key", "test-admin-key"
AUTH = {"Authorization": f"Bearer {API}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
REPLICA = "x-lora-replica"


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("ray")
    proc = ServerProcess(
        tiny_model_dir("llama"), data / "store", "--replicas", "2", "--ray-num-cpus", "4", "--replica-cpus", "1",
        "--replica-max-ongoing", "1", "--gpu-slots", "2", "--cpu-slots", "4", "--max-seq-len", "512",
        "--max-batch-size", "4", "--startup-adapters", str(data / "none"), "--api-key", API, "--admin-key", ADMIN,
        "--log-level", "info", command="serve-ray",
    )  # fmt: skip
    proc.start(timeout=300)
    try:
        _wait(lambda: httpx.get(f"{proc.url}/ready", timeout=5).json().get("replicas_up") == 2, 120, "2 replicas up")
        yield proc
    finally:
        proc.stop(timeout=60)


@pytest.fixture(scope="module")
def expected(tiny_model_dir, tiny_adapters):
    """PEFT's greedy continuation of PROMPT (12 tokens, EOS ignored) for each of the first three tiny adapters."""
    folders = tiny_adapters("llama")[:3]
    reference = PeftReference(tiny_model_dir("llama"), folders)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    texts = []
    for name in reference.names:
        reference.model.set_adapter(name)
        with torch.inference_mode():
            out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                           do_sample=False, eos_token_id=None, pad_token_id=2)  # fmt: skip
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert len(set(texts)) == 3, "the tiny adapters must differ for these tests to mean anything"
    return texts


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"not {what} after {timeout}s")


def _generate(url: str, adapter: str, **extra) -> httpx.Response:
    body = {"adapter": adapter, "prompt": PROMPT, "max_new_tokens": 12, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/generate", json=body, headers=AUTH, timeout=120)


def _replicas(url: str) -> dict[str, dict]:
    rows = httpx.get(f"{url}/v1/replicas", headers=AUTH, timeout=10).json()["replicas"]
    return {r["replica_id"]: r for r in rows}


def test_keys_are_checked_at_the_ingress(ray_server, tiny_adapters) -> None:
    url = ray_server.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert upload(url, "nokey", tiny_adapters("llama")[0]).status_code == 401
    assert upload(url, "apikey", tiny_adapters("llama")[0], headers=AUTH).status_code == 403
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{url}/v1/replicas").status_code == 401
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.headers[REPLICA]


def test_an_adapters_requests_go_where_it_is_loaded(ray_server, tiny_adapters, expected) -> None:
    url = ray_server.url
    for name, folder in (("a0", tiny_adapters("llama")[0]), ("a1", tiny_adapters("llama")[1])):
        r = upload(url, name, folder, headers=ADMIN_AUTH)
        assert r.status_code == 201, r.text
    served: dict[str, set[str]] = {"a0": set(), "a1": set()}
    for _ in range(4):  # one at a time: nothing is busy, so routing follows what each replica has loaded
        for i, name in enumerate(("a0", "a1")):
            r = _generate(url, name)
            assert r.status_code == 200, r.text
            assert r.json()["text"] == expected[i]
            served[name].add(r.headers[REPLICA])
            time.sleep(0.3)  # the replica's multiplexed ids reach the router every 0.1 s
    assert len(served["a0"]) == 1 and len(served["a1"]) == 1, served
    replicas = _replicas(url)
    for name, [home] in ((n, sorted(s)) for n, s in served.items()):
        assert name in replicas[home]["multiplexed"] and name in replicas[home]["resident"], replicas[home]
        others = [r for rid, r in replicas.items() if rid != home]
        assert all(name not in r["multiplexed"] for r in others), replicas


def test_a_busy_hot_adapter_spreads_and_both_replicas_match_peft(ray_server, tiny_adapters, expected) -> None:
    url = ray_server.url
    assert upload(url, "hot", tiny_adapters("llama")[2], headers=ADMIN_AUTH).status_code == 201
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _generate(url, "hot"), range(12)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert {r.json()["text"] for r in answers} == {expected[2]}
    assert len({r.headers[REPLICA] for r in answers}) == 2, "with one request per replica, the second must help"


def test_a_delete_and_a_reupload_are_seen_by_both_replicas(ray_server, tiny_adapters, expected) -> None:
    url = ray_server.url
    with ThreadPoolExecutor(4) as pool:  # make sure both replicas hold a copy of "hot" before it is replaced
        list(pool.map(lambda _: _generate(url, "hot"), range(8)))
    assert all("hot" in r["resident"] + r["host_copies"] for r in _replicas(url).values())
    assert httpx.delete(f"{url}/v1/adapters/hot", headers=ADMIN_AUTH, timeout=30).status_code == 204
    lists = [httpx.get(f"{url}/v1/adapters", headers=AUTH, timeout=30) for _ in range(12)]
    assert len({r.headers[REPLICA] for r in lists}) == 2, "listings go to any replica"
    assert all("hot" not in [a["name"] for a in r.json()["adapters"]] for r in lists)
    assert _generate(url, "hot").status_code == 404
    # The same name with other weights: no replica may answer with the copy it held of the deleted adapter.
    assert upload(url, "hot", tiny_adapters("llama")[0], headers=ADMIN_AUTH).status_code == 201
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _generate(url, "hot"), range(12)))
    assert len({r.headers[REPLICA] for r in answers}) == 2
    assert {r.json()["text"] for r in answers} == {expected[0]}


def test_metrics_merge_both_replicas(ray_server) -> None:
    text = httpx.get(f"{ray_server.url}/metrics", timeout=30).text
    assert 'lora_ray_replicas{state="up"} 2.0' in text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("lora_requests_total{")}  # fmt: skip
    assert len(replicas) == 2, text[:2000]
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_killed_replica_fails_only_its_stream_and_is_replaced(ray_server) -> None:
    url = ray_server.url
    before = _replicas(url)
    events: list = []
    started = threading.Event()
    home: list[str] = []

    def stream() -> None:
        body = {"adapter": "a1", "prompt": PROMPT, "max_new_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, headers=AUTH, timeout=120) as r:
            home.append(r.headers[REPLICA])
            started.set()
            events.extend(sse_events(r))

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    time.sleep(0.5)
    os.kill(before[home[0]]["pid"], signal.SIGKILL)
    thread.join(60)
    assert events and events[-1] != "[DONE]", events[-3:]
    assert events[-1]["error"]["type"] == "replica_failed"
    assert any("token" in e for e in events[:-1])
    # The other replica keeps serving at once (a0 lives there, or anywhere once the dead one is gone).
    _wait(lambda: _generate(url, "a0").status_code == 200, 30, "serving after the kill")
    _wait(lambda: len(_replicas(url)) == 2 and home[0] not in _replicas(url), 120, "the killed replica replaced")
    assert httpx.get(f"{url}/ready", timeout=10).json()["replicas_up"] == 2
    r = _generate(url, "a1")
    assert r.status_code == 200, r.text


def test_sigterm_drains_a_stream_in_flight(ray_server) -> None:
    url = ray_server.url
    events: list = []
    started = threading.Event()

    def stream() -> None:
        body = {"adapter": "a0", "prompt": PROMPT, "max_new_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, headers=AUTH, timeout=120) as r:
            started.set()
            events.extend(sse_events(r))

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    time.sleep(0.3)
    assert ray_server.stop(timeout=90) == 0
    thread.join(30)
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["usage"]["completion_tokens"] == 300
