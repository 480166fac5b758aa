"""Client-side helpers of the tests against a running server: uploads, SSE events, metric samples, waiting."""

import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def upload(url: str, name: str, folder: Path, **kwargs) -> httpx.Response:
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes(), "application/json"),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=60, **kwargs)


def sse_events(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(condition, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return time.monotonic() - start
