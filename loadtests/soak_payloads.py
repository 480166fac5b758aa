"""What the soak test (loadtests/soak.py) sends besides valid traffic: the model and adapters it serves and uploads,
and the hostile requests, each with the statuses it may get."""

import asyncio
import gzip
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Answers that are server bugs already reported: counted and shown in the summary, not failed. Remove an entry once
# its bug is fixed.
KNOWN_ISSUES: dict[tuple[str, int], str] = {}


@dataclass
class Payloads:
    """The model, the adapters (registered at start, and sources for uploads) and prebuilt hostile bodies."""

    base_dir: Path
    stable_root: Path  # one folder per adapter registered at startup
    stable: dict[str, Path]
    churn_sources: dict[str, Path]
    max_upload_bytes: int
    escape_marker: Path  # what an unpickled file would create; zip-slip members aim next to it (escaped-*)
    zip_bomb: bytes
    pickle_bytes: bytes
    base_id: str = ""

    @classmethod
    def build(cls, work: Path, model: str) -> "Payloads":
        from transformers import AutoModelForCausalLM

        from loadtests.common.factories import ADAPTER_CONFIGS, save_peft_adapter, save_tiny_model

        if model == "tiny":
            base_dir = save_tiny_model(work / "model")
        else:
            from server.model.embedded import ensure_embedded_model

            base_dir = ensure_embedded_model()
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        stable = {f"stable-{c}": work / "stable" / f"stable-{c}" for c in "abc"}
        churn = {f"source-{c}": work / "churn" / f"source-{c}" for c in "de"}
        for i, folder in enumerate([*stable.values(), *churn.values()]):
            config = ADAPTER_CONFIGS[i if i < 3 else i + 1]  # 0, 1, 2 stay; 4, 5 come and go
            save_peft_adapter(base, folder, seed=500 + i, **config)
        del base
        # Startup adapters are held to the upload limit too.
        biggest = max((f / "adapter_model.safetensors").stat().st_size for f in [*stable.values(), *churn.values()])
        marker = work / "escaped"

        class Escape:  # unpickling this creates the marker folder: it must never happen
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("adapter_config.json", (next(iter(churn.values())) / "adapter_config.json").read_text())
            zf.writestr("adapter_model.safetensors", bytes(32 * 2**20))  # 32 MiB of zeros in ~32 KiB
        return cls(base_dir, work / "stable", stable, churn, max(2**20, 2 * biggest), marker, bomb.getvalue(),
                   pickle.dumps(Escape()))  # fmt: skip

    def files(self, folder: Path, config: bytes | None = None, weights: bytes | None = None) -> dict:
        config = config if config is not None else (folder / "adapter_config.json").read_bytes()
        weights = weights if weights is not None else (folder / "adapter_model.safetensors").read_bytes()
        return {"adapter_config": ("adapter_config.json", config),
                "adapter_model": ("adapter_model.safetensors", weights)}  # fmt: skip

    def upload_files(self, name: str, source: str) -> dict:
        return {"data": {"name": name}, "files": self.files(self.churn_sources[source])}

    def upload_archive(self, name: str, source: str) -> dict:
        return archive_upload(name, zip_of({f"save/{f.name}": f.read_bytes()
                                            for f in self.churn_sources[source].iterdir()}))  # fmt: skip

    @property
    def a_source(self) -> Path:
        return next(iter(self.churn_sources.values()))


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_with_symlink(target: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        link = tarfile.TarInfo("save/adapter_model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tf.addfile(link)
    return buffer.getvalue()


def archive_upload(name: str, archive: bytes) -> dict:
    return {"data": {"name": name}, "files": {"archive": ("adapter.zip", archive)}}


def adapter_zip(p: Payloads, extra: dict[str, bytes]) -> bytes:
    return zip_of({**{f.name: f.read_bytes() for f in p.a_source.iterdir()}, **extra})


def post(path: str, **kw) -> dict:
    return {"method": "POST", "path": path, **kw}


def upload(p: Payloads, key: str = "admin", **kw) -> dict:
    return post("/v1/adapters", key=key, **kw)


async def chunked_archive(total: int):
    """A multipart upload sent with Transfer-Encoding: chunked (no Content-Length) whose archive part never ends
    before ``total`` bytes."""
    yield (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n--b\r\n'
           b'Content-Disposition: form-data; name="archive"; filename="a.zip"\r\n\r\n')  # fmt: skip
    piece = b"\0" * 2**16
    for _ in range(total // len(piece) + 1):
        yield piece
    yield b"\r\n--b--\r\n"


# (kind, statuses it may get, request). A request is the keyword arguments of Soak.call, or {"raw": bytes} for a
# request head sent on a plain socket (a Content-Length httpx would not send).
HOSTILE: list[tuple[str, set[int], Callable[[Payloads], dict]]] = [
    ("bad-json", {400, 422}, lambda p: post("/v1/generate", content=b'{"prompt": "hi", ', headers=_JSON)),
    ("not-utf8-json", {400, 422}, lambda p: post("/v1/generate", content=b"\xff\xfe{", headers=_JSON)),
    ("wrong-types", {422}, lambda p: post("/v1/generate", json={"prompt": 5, "max_new_tokens": "many"})),
    ("huge-max-new-tokens", {400, 422}, lambda p: post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 10**6})),
    ("over-schema-max", {422}, lambda p: post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 10**12})),
    ("too-many-prompt-tokens", {400}, lambda p: post("/v1/generate", json={"prompt": "refund " * 400})),
    ("oversize-body", {413}, lambda p: post("/v1/generate", json={"prompt": "x" * 100_000})),
    ("unknown-adapter", {404}, lambda p: post("/v1/generate", json={"adapter": "no-such", "prompt": "hi"})),
    ("unknown-model", {404}, lambda p: post("/v1/completions", json={"model": "no-such", "prompt": "hi"})),
    ("traversal-adapter", {404}, lambda p: post("/v1/generate", json={"adapter": "../../etc/passwd", "prompt": "x"})),
    ("traversal-url", {404}, lambda p: {"method": "GET", "path": "/v1/adapters/..%2F..%2Fetc%2Fpasswd"}),
    ("traversal-delete", {404, 405}, lambda p: {"method": "DELETE", "path": "/v1/adapters/..%2Fstable-a",
                                                 "key": "admin"}),
    ("traversal-name", {400}, lambda p: upload(p, data={"name": "../escaped"}, files=p.files(p.a_source))),
    ("dotdot-name", {400}, lambda p: upload(p, data={"name": ".."}, files=p.files(p.a_source))),
    ("oversize-upload", {413}, lambda p: upload(p, data={"name": "big"},
                                                 files=p.files(p.a_source, weights=bytes(p.max_upload_bytes + 1)))),
    ("oversize-chunked-upload", {413}, lambda p: upload(p, content=chunked_archive(2 * p.max_upload_bytes + 2**21),
                                                        headers={"content-type": "multipart/form-data; boundary=b"})),
    # 401 when the soak runs with keys: the key is checked from the head before the size is
    ("declared-huge-upload", {401, 413}, lambda p: {"raw": b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Length: 1000000000000\r\n\r\n"}),
    ("malformed-multipart", {400, 422}, lambda p: upload(p, content=b"--x\r\ngarbage\r\n",
                                                         headers={"content-type": "multipart/form-data; boundary=x"})),
    ("missing-files", {400}, lambda p: upload(p, data={"name": "nofiles"}, files={"unrelated": ("a", b"b")})),
    ("zip-slip", {400}, lambda p: upload(p, **archive_upload("slip", adapter_zip(p, {
        "../../escaped-slip": b"x", "save/../../../escaped-slip": b"x"})))),  # fmt: skip
    ("absolute-member", {400}, lambda p: upload(p, **archive_upload("abs", adapter_zip(
        p, {f"{p.escape_marker}-absolute": b"x"})))),  # fmt: skip
    ("tar-symlink", {400}, lambda p: upload(p, **archive_upload("link", tar_gz_with_symlink("/etc/passwd")))),
    ("zip-bomb", {400, 413}, lambda p: upload(p, **archive_upload("bomb", p.zip_bomb))),
    ("not-an-archive", {400}, lambda p: upload(p, **archive_upload("junk", os.urandom(4096)))),
    ("gzip-not-tar", {400}, lambda p: upload(p, **archive_upload("gz", gzip.compress(os.urandom(4096))))),
    ("corrupt-safetensors", {422}, lambda p: upload(p, data={"name": "corrupt"},
                                                     files=p.files(p.a_source, weights=os.urandom(5000)))),
    ("bad-config-json", {400, 422}, lambda p: upload(p, data={"name": "badcfg"},
                                                      files=p.files(p.a_source, config=b"{not json"))),
    ("pickle-weights", {422}, lambda p: upload(p, data={"name": "pickled"},
                                                files=p.files(p.a_source, weights=p.pickle_bytes))),
    ("pickle-in-archive", {422}, lambda p: upload(p, **archive_upload("pkl", adapter_zip(
        p, {"adapter_model.bin": p.pickle_bytes})))),  # fmt: skip
    ("wrong-method", {405}, lambda p: {"method": "PUT", "path": "/v1/generate"}),
    ("unknown-path", {404}, lambda p: {"method": "GET", "path": "/v1/nothing-here"}),
    ("auth-missing", {401}, lambda p: post("/v1/generate", key="none", json={"prompt": "hi"})),
    ("auth-wrong", {401}, lambda p: post("/v1/completions", key="bad", json={"model": "x", "prompt": "hi"})),
    ("auth-not-admin", {403}, lambda p: upload(p, key="api", data={"name": "x"}, files=p.files(p.a_source))),
    ("auth-delete-not-admin", {403}, lambda p: {"method": "DELETE", "path": "/v1/adapters/stable-a", "key": "api"}),
]
_JSON = {"content-type": "application/json"}


async def raw_status(url: str, head: bytes) -> int:
    """Send a request head on a plain socket and read the status code of the answer."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        writer.write(head)
        await writer.drain()
        return int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    finally:
        writer.close()
