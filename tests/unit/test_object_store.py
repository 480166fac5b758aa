"""``--adapter-store``: S3Store against a real S3-compatible server (moto's standalone server, a subprocess), and the
registry with a store: two "nodes" (registries with data directories of their own) on one bucket and one shared
``--registry-db``. Torch-free; skipped when moto (the dev extra) is missing.
"""

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.adapters import registry_remote
from server.adapters.object_store import S3Store, open_store, parse_store_url
from server.adapters.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    RegistryError,
    StorageFull,
    StoreUnavailable,
)
from tests.helpers.moto_server import FAKE_CREDENTIALS, bucket_keys, have_moto, moto_server, new_bucket, s3_client
from tests.helpers.registry_fakes import WEIGHTS, FakeValidator, add, config_bytes, fail_commits, staging_empty

pytestmark = pytest.mark.skipif(not have_moto(), reason="moto and boto3 are needed: pip install -e '.[dev,s3]'")
PREFIX = "team/lora"
Node = Callable[..., AdapterRegistry]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(endpoint: str) -> str:
    return new_bucket(endpoint)


@pytest.fixture
def node(tmp_path: Path, endpoint: str, bucket: str) -> Node:
    """name -> a registry on its own data directory, the shared bucket and the shared registry database."""
    (tmp_path / "shared").mkdir()

    def make(name: str, validator: FakeValidator | None = None) -> AdapterRegistry:
        store = open_store(f"s3://{bucket}/{PREFIX}", endpoint)
        return AdapterRegistry(tmp_path / name, validator or FakeValidator(), store=store,
                               registry_db=tmp_path / "shared" / "registry.db")  # fmt: skip

    return make


def keys(endpoint: str, bucket: str) -> list[str]:
    return bucket_keys(endpoint, bucket)


# ---- S3Store ------------------------------------------------------------------------------------------------------
def test_s3_store_put_get_list_delete(tmp_path: Path, endpoint: str, bucket: str) -> None:
    store = S3Store(bucket, PREFIX, endpoint)
    store.check()
    src = tmp_path / "src.bin"
    src.write_bytes(WEIGHTS)
    store.put_file("a/x.bin", src)
    store.put_file("a/y.bin", src)
    store.put_file("b/z.bin", src)
    assert keys(endpoint, bucket) == [f"{PREFIX}/a/x.bin", f"{PREFIX}/a/y.bin", f"{PREFIX}/b/z.bin"]
    listed = store.list_objects("a/")
    assert [(o.key, o.size) for o in listed] == [("a/x.bin", len(WEIGHTS)), ("a/y.bin", len(WEIGHTS))]
    assert all(o.modified > 0 for o in listed)
    store.get_file("b/z.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == WEIGHTS
    store.delete(["a/x.bin", "b/z.bin"])
    assert keys(endpoint, bucket) == [f"{PREFIX}/a/y.bin"]
    with pytest.raises(StoreUnavailable, match="download of 'b/z.bin'"):
        store.get_file("b/z.bin", tmp_path / "gone.bin")


def test_store_url_and_startup_checks(endpoint: str) -> None:
    assert parse_store_url("s3://bkt") == ("bkt", "")
    assert parse_store_url("s3://bkt/a/b/") == ("bkt", "a/b")
    for bad in ("bkt/a", "s3://", "s3://bkt/a//b", "s3://bkt/../x"):
        with pytest.raises(ValueError):
            parse_store_url(bad)
    with pytest.raises(StoreUnavailable, match="does not exist; create it first"):
        open_store("s3://no-such-bucket-here", endpoint)
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        open_store("s3://bkt", "http://127.0.0.1:9")  # the discard port: nothing listens


def test_refused_credentials_are_told_at_startup(tmp_path: Path) -> None:
    with moto_server(tmp_path / "moto-auth.log", check_credentials=True) as strict:
        with pytest.raises(StoreUnavailable, match=r"was denied \(403\): check the credentials"):
            open_store("s3://bkt", strict)


@pytest.mark.parametrize("command", ["serve", "serve-ray"])
def test_the_cli_refuses_to_start_on_a_missing_bucket(tmp_path: Path, endpoint: str, capsys, command: str) -> None:
    """``lora-server serve`` (and ``serve-ray``, before Ray starts) in-process (the process exits with what ``main``
    returns): the store is checked before the model is loaded (there is none at --base-model), and the answer is one
    line and exit code 2, no traceback."""
    from server import cli

    code = cli.main([command, "--data-dir", str(tmp_path / "d"), "--adapter-store", "s3://missing-bucket/lora",
                     "--s3-endpoint-url", endpoint, "--base-model", str(tmp_path / "no-model"), "--log-level",
                     "warning"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "does not exist; create it first" in err and "Traceback" not in err, err


# ---- the registry with a store ------------------------------------------------------------------------------------
def test_add_uploads_and_another_node_downloads_identical_files(node: Node, endpoint: str, bucket: str) -> None:
    a, b = node("a"), node("b")
    rec = add(a, "alpha")
    base = f"{PREFIX}/adapters/alpha/{rec.uid}/"
    assert keys(endpoint, bucket) == [base + "adapter_config.json", base + "adapter_model.safetensors"]
    assert not (a.data_dir / "adapters").exists()  # no local registry folders with a store
    assert (a.data_dir / "cache" / rec.uid).is_dir()  # the uploader keeps its staged files: no download
    assert staging_empty(a) and "alpha" in b and b.get("alpha") == rec
    assert not (b.data_dir / "cache" / rec.uid).exists()
    folder = b.path("alpha")  # downloaded now
    assert folder == b.data_dir / "cache" / rec.uid
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "adapter_config.json").read_bytes() == config_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in a.path("alpha").iterdir())
    assert staging_empty(b)


def test_delete_on_one_node_is_seen_by_the_other(node: Node, endpoint: str, bucket: str) -> None:
    a, b = node("a"), node("b")
    rec = add(a, "alpha")
    keep = add(a, "beta")
    b.path("alpha")
    a.delete("alpha")
    assert keys(endpoint, bucket) == sorted(f"{PREFIX}/adapters/beta/{keep.uid}/{f}"
                                            for f in ("adapter_config.json", "adapter_model.safetensors"))  # fmt: skip
    assert not (a.data_dir / "cache" / rec.uid).exists()
    assert "alpha" not in b
    with pytest.raises(AdapterNotFound):
        b.path("alpha")
    b.path("beta")  # a download prunes the copies of uids that are no longer registered
    assert sorted(p.name for p in (b.data_dir / "cache").iterdir() if not p.name.startswith(".")) == [keep.uid]
    again = add(b, "alpha")  # a re-upload under the same name: a new uid, its own objects
    assert again.uid != rec.uid and a.path("alpha").name == again.uid


def test_a_failed_commit_leaves_no_objects(node: Node, endpoint: str, bucket: str, monkeypatch) -> None:
    a = node("a")
    fail_commits(monkeypatch)
    with pytest.raises(StorageFull):
        add(a, "alpha")
    assert keys(endpoint, bucket) == [] and "alpha" not in a and staging_empty(a)
    assert [p for p in (a.data_dir / "cache").iterdir()] == []


def test_a_name_taken_by_another_node_meanwhile_leaves_no_objects(node: Node, endpoint: str, bucket: str) -> None:
    validators = [FakeValidator(), FakeValidator()]
    barrier = threading.Barrier(2)
    for v in validators:
        v.barrier = barrier  # both past the early name check before either commits
    a, b = node("a", validators[0]), node("b", validators[1])
    results: list[object] = []

    def upload(reg: AdapterRegistry) -> None:
        try:
            results.append(add(reg, "alpha"))
        except AdapterExists as e:
            results.append(e)

    threads = [threading.Thread(target=upload, args=(reg,)) for reg in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1 and len(results) == 2
    uid = winners[0].uid  # type: ignore[attr-defined]
    assert {k.split("/")[4] for k in keys(endpoint, bucket)} == {uid}  # team/lora/adapters/alpha/<uid>/<file>


def test_a_failed_upload_answers_store_unavailable_and_leaves_nothing(
    node: Node, endpoint: str, bucket: str, monkeypatch
) -> None:
    a = node("a")
    real_put = S3Store.put_file

    def put_file(self: S3Store, key: str, path: Path) -> None:
        if key.endswith("adapter_model.safetensors"):  # the config is uploaded first and must be taken back
            raise StoreUnavailable(f"the adapter store failed: upload of {key!r}: SlowDown")
        real_put(self, key, path)

    monkeypatch.setattr(S3Store, "put_file", put_file)
    with pytest.raises(StoreUnavailable, match="SlowDown"):
        add(a, "alpha")
    assert keys(endpoint, bucket) == [] and "alpha" not in a and staging_empty(a)


def test_a_corrupted_object_is_refused_not_served(node: Node, endpoint: str, bucket: str) -> None:
    a, b = node("a"), node("b")
    rec = add(a, "alpha")
    key = f"{PREFIX}/adapters/alpha/{rec.uid}/adapter_model.safetensors"
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=WEIGHTS[:-1] + b"\x00")  # same size, one byte off
    with pytest.raises(StoreUnavailable, match="do not match its record"):
        b.path("alpha")
    assert not (b.data_dir / "cache" / rec.uid).exists() and staging_empty(b)


def test_restart_with_the_cache_wiped_still_serves(node: Node) -> None:
    a = node("a")
    rec = add(a, "alpha")
    shutil.rmtree(a.data_dir / "cache")
    again = node("a")  # a new process on the same data directory: the missing copy is not damage
    assert again.get("alpha") == rec
    assert (again.path("alpha") / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_concurrent_reads_on_one_node_download_once(node: Node, monkeypatch) -> None:
    a = node("a")
    add(a, "alpha")
    readers = [node("b") for _ in range(4)]  # four registries (as four processes would) on one data directory
    calls: list[str] = []
    real_get = S3Store.get_file

    def get_file(self: S3Store, key: str, path: Path) -> None:
        calls.append(key)
        real_get(self, key, path)

    monkeypatch.setattr(S3Store, "get_file", get_file)
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda r=r: folders.append(r.path("alpha"))) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(folders) == 4 and len(set(folders)) == 1
    assert len(calls) == 2  # the two files, once


def test_startup_sweeps_old_orphans_and_keeps_young_ones(node: Node, endpoint: str, bucket: str, monkeypatch) -> None:
    a = node("a")
    rec = add(a, "alpha")
    orphan = f"{PREFIX}/adapters/ghost/{'0' * 32}/adapter_model.safetensors"  # a crash between upload and commit
    foreign = f"{PREFIX}/adapters/README.txt"  # not laid out by the registry: never touched
    for key in (orphan, foreign):
        s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=b"x")
    node("b")  # the grace period protects an upload in flight on another node
    assert orphan in keys(endpoint, bucket)
    monkeypatch.setattr(registry_remote, "ORPHAN_GRACE_S", -60.0)
    node("b")
    left = keys(endpoint, bucket)
    assert (
        orphan not in left
        and foreign in left
        and f"{PREFIX}/adapters/alpha/{rec.uid}/adapter_model.safetensors" in left
    )


def test_a_database_is_refused_with_the_wrong_store(tmp_path: Path, node: Node, endpoint: str) -> None:
    a = node("a")
    add(a, "alpha")
    db = tmp_path / "shared" / "registry.db"
    with pytest.raises(RegistryError, match="are stored in s3://"):
        AdapterRegistry(tmp_path / "local", FakeValidator(), registry_db=db)  # no store: rows would look damaged
    other = open_store(f"s3://{new_bucket(endpoint)}", endpoint)
    with pytest.raises(RegistryError, match="start with --adapter-store s3://"):
        AdapterRegistry(tmp_path / "c", FakeValidator(), store=other, registry_db=db)
    local = AdapterRegistry(tmp_path / "plain", FakeValidator())
    add(local, "beta")
    with pytest.raises(RegistryError, match="holds the adapters of a registry on local disk"):
        AdapterRegistry(tmp_path / "plain", FakeValidator(), store=other)
    with pytest.raises(RegistryError, match="registers adapters stored on local disk"):
        AdapterRegistry(tmp_path / "d", FakeValidator(), store=other, registry_db=tmp_path / "plain" / "registry.db")


def test_a_new_database_on_a_store_with_adapters_is_refused(tmp_path: Path, node: Node, endpoint: str, bucket: str):
    """A --registry-db that points at a fresh file (a shared volume not mounted, a typo) must not adopt a store full of
    another database's adapters: its sweep would delete them all."""
    add(node("a"), "alpha")
    before = keys(endpoint, bucket)
    store = open_store(f"s3://{bucket}/{PREFIX}", endpoint)
    with pytest.raises(RegistryError, match="holds adapters already"):
        AdapterRegistry(tmp_path / "c", FakeValidator(), store=store, registry_db=tmp_path / "typo.db")
    assert keys(endpoint, bucket) == before


def test_the_disk_cache_bound_evicts_the_least_recently_used_copy(
    tmp_path: Path, node: Node, endpoint: str, bucket: str, monkeypatch
) -> None:
    a = node("a")
    one, two, three = (add(a, name) for name in ("one", "two", "three"))
    store = open_store(f"s3://{bucket}/{PREFIX}", endpoint)
    b = AdapterRegistry(tmp_path / "b", FakeValidator(), store=store, registry_db=tmp_path / "shared" / "registry.db",
                        disk_cache_bytes=one.size_bytes)  # fmt: skip  # room for one copy

    def copies() -> list[str]:
        return sorted(p.name for p in (b.data_dir / "cache").iterdir() if not p.name.startswith("."))

    b.path("one"), b.path("two")
    os.utime(b.data_dir / "cache" / one.uid, (1e9, 1e9))  # "one" last used long ago
    b.path("three")  # "one" goes; "two" was used a moment ago (a reader may be opening it): kept, over the bound
    assert copies() == sorted([two.uid, three.uid])
    monkeypatch.setattr(registry_remote, "RECENT_USE_S", 0.0)
    assert (b.path("one") / "adapter_model.safetensors").read_bytes() == WEIGHTS  # downloaded again
    assert copies() == [one.uid] and staging_empty(b)


def test_settings_refuse_store_flags_without_a_store(monkeypatch) -> None:
    from pydantic import ValidationError

    from server.config import Settings

    monkeypatch.setenv("LORA_SERVER_ADAPTER_STORE", "s3://bkt/lora")
    assert Settings(registry_db=Path("/shared/registry.db")).adapter_store == "s3://bkt/lora"  # env var, like any
    monkeypatch.delenv("LORA_SERVER_ADAPTER_STORE")
    for field, value in (("s3_endpoint_url", "http://minio:9000"), ("registry_db", Path("x.db")),
                         ("adapter_disk_cache_bytes", 10)):  # fmt: skip
        with pytest.raises(ValidationError, match=f"{field} is set but adapter_store is not"):
            Settings(**{field: value})
    with pytest.raises(ValidationError, match="not an s3:// URL"):
        Settings(adapter_store="gs://bkt")
    with pytest.raises(ValidationError, match="not an http:// or https:// URL"):
        Settings(adapter_store="s3://bkt", s3_endpoint_url="minio:9000")


def test_a_delete_during_a_download_answers_not_found(node: Node, monkeypatch) -> None:
    a, b = node("a"), node("b")
    add(a, "alpha")
    real_get = S3Store.get_file

    def get_file(self: S3Store, key: str, path: Path) -> None:
        if "alpha" in a:
            a.delete("alpha")  # on node A, between B's listing and B's first GET
        real_get(self, key, path)

    monkeypatch.setattr(S3Store, "get_file", get_file)
    with pytest.raises(AdapterNotFound):  # a 404, as for any deleted adapter, not a 503
        b.path("alpha")
    assert staging_empty(b)
