"""DELETE /v1/adapters/{name} and the metrics it touches, over HTTP against an in-process app on the tiny model:
a full disk answers 507 with nothing changed, and a deleted adapter's series leave /metrics."""

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.registry_fakes import db_rows, fail_commits, pending_marks


@pytest.fixture(scope="module")
def app_and_service(tiny_model_dir, tiny_adapters, tmp_path_factory):
    from server.api.app import create_app
    from server.config import Settings
    from server.service import Service

    work = tmp_path_factory.mktemp("delete-http")
    startup = work / "startup"
    startup.mkdir()
    for name, folder in zip(("keep-me", "doomed"), tiny_adapters("llama")[:2], strict=True):
        shutil.copytree(folder, startup / name)
    settings = Settings(base_model=tiny_model_dir("llama"), data_dir=work / "data", startup_adapters=startup,
                        max_seq_len=64, gpu_slots=1, metrics_adapter_labels=1)  # fmt: skip
    service = Service(settings)
    return create_app(service), service  # the engine is not started: nothing here generates


def adapter_labels(client: TestClient) -> set[str]:
    text = client.get("/metrics").text
    families = text_string_to_metric_families(text)
    return {s.labels["adapter"] for f in families for s in f.samples if "adapter" in s.labels}


def test_disk_full_during_delete_answers_507_and_changes_nothing(app_and_service, monkeypatch) -> None:
    app, service = app_and_service
    client = TestClient(app)
    data: Path = service.settings.data_dir
    rows_before = db_rows(data)
    files_before = {p.name: p.read_bytes() for p in (data / "adapters" / "doomed").iterdir()}
    fail_commits(monkeypatch)  # registry.db's COMMIT: "database or disk is full"
    r = client.delete("/v1/adapters/doomed")
    monkeypatch.undo()

    assert r.status_code == 507, r.text
    assert r.json()["error"]["type"] == "insufficient_storage" and "nothing was deleted" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/doomed").status_code == 200
    assert db_rows(data) == rows_before and pending_marks(data) == []
    assert {p.name: p.read_bytes() for p in (data / "adapters" / "doomed").iterdir()} == files_before
    assert not any((data / "staging").iterdir())


def test_delete_frees_the_adapter_label(app_and_service) -> None:
    """With one adapter label: "doomed" holds it; once deleted its series are gone from /metrics and the next
    adapter gets its own label instead of __other__. Unknown adapters are counted apart from the base model."""
    app, service = app_and_service
    client = TestClient(app)
    service.metrics.observe_rejected("doomed")
    service.metrics.observe_rejected("keep-me")  # past the limit of 1
    assert {"doomed", "__other__"} <= adapter_labels(client)
    assert client.post("/v1/generate", json={"adapter": "no-such", "prompt": "hi"}).status_code == 404

    assert client.delete("/v1/adapters/doomed").status_code == 204
    assert "doomed" not in adapter_labels(client)
    service.metrics.observe_rejected("keep-me")
    labels = adapter_labels(client)
    assert "keep-me" in labels and "__unknown__" in labels and "__base__" not in labels
