"""Hostile requests from the second hardening round (issue 13), for the soak test: each would have frozen the process,
made it read an unauthenticated body, or answered 500 before the fixes. Same shape as ``soak_payloads.HOSTILE``:
(kind, statuses it may get, request builder)."""

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from functools import cache

from loadtests.soak_payloads import Payloads, archive_upload, post, upload, zip_of

# A backtracking regex engine takes minutes per module name on this (exponential in the name's length); RE2 decides
# it in linear time and the adapter is refused because it targets nothing.
REDOS_PATTERN = "(.|.)*X"


def _config(p: Payloads, **changes: object) -> bytes:
    config = json.loads((p.a_source / "adapter_config.json").read_text())
    return json.dumps({**config, **changes}).encode()


def _config_upload(p: Payloads, name: str, config: bytes) -> dict:
    return upload(p, data={"name": name}, files=p.files(p.a_source, config=config))


def _raw_config(p: Payloads, field: str, literal: str) -> bytes:
    """The adapter's config with ``field`` set to a JSON literal written by hand (one json.dumps would refuse)."""
    text = _config(p, **{field: 0}).decode()
    return text.replace(f'"{field}": 0', f'"{field}": {literal}').encode()


@cache
def _many_members(count: int) -> bytes:
    """A small zip (about 100 bytes per entry) whose central directory lists ``count`` empty members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(count):
            zf.writestr(f"{i:x}", b"")
    return buffer.getvalue()


@cache
def _pax_bomb() -> bytes:
    """A tar.gz whose first record is a 1 MiB pax header (a few KB compressed): refused before tarfile parses it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("save/adapter_config.json")
        info.pax_headers = {"comment": "0 " * 2**19}
        tf.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


def _unauthenticated_upload(p: Payloads) -> dict:
    """An upload head that declares a body within the size limit but sends none: the key check must answer 401 from
    the head alone (a server that reads the body first waits for it, and the soak's 10 s read times out)."""
    declared = p.max_upload_bytes
    return {"raw": b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: multipart/form-data; boundary=b\r\n"
                   b"Content-Length: " + str(declared).encode() + b"\r\n\r\n"}  # fmt: skip


HARDENING: list[tuple[str, set[int], Callable[[Payloads], dict]]] = [
    # item 1: regexes from uploads run in linear time; what RE2 cannot compile is refused
    ("regex-redos-targets", {422}, lambda p: _config_upload(p, "redos", _config(p, target_modules=REDOS_PATTERN))),
    # every linear layer is a target minus the (matching-nothing) exclusions, and the weights cover only a few: 422
    ("regex-redos-exclude", {422}, lambda p: _config_upload(
        p, "redos-exclude", _config(p, target_modules="all-linear", exclude_modules=REDOS_PATTERN))),  # fmt: skip
    ("regex-backreference", {422}, lambda p: _config_upload(p, "backref", _config(p, target_modules=r"(q)\1_proj"))),
    # item 3: keys are checked before the body is read
    ("auth-upload-before-body", {401}, _unauthenticated_upload),
    # item 5: hostile configs and archive names answer 4xx, never 500
    ("config-deep-json", {400, 422}, lambda p: _config_upload(p, "deep", b"[" * 100_000 + b"]" * 100_000)),
    ("config-huge-int", {422}, lambda p: _config_upload(p, "huge-int", _raw_config(p, "r", "9" * 5000))),
    ("config-huge-alpha", {422}, lambda p: _config_upload(p, "huge-alpha", _raw_config(p, "lora_alpha", "9" * 400))),
    ("config-huge-alpha-pattern", {422}, lambda p: _config_upload(
        p, "huge-alpha-pattern", _raw_config(p, "alpha_pattern", '{"q_proj": ' + "9" * 400 + "}"))),  # fmt: skip
    ("archive-long-member-name", {400}, lambda p: upload(p, **archive_upload("longname", zip_of({
        **{f.name: f.read_bytes() for f in p.a_source.iterdir()}, "a" * 300 + "/adapter_config.json": b"{}"})))),
    # item 2: a pax header record above the cap never reaches tarfile
    ("tar-pax-bomb", {400}, lambda p: upload(p, **archive_upload("pax", _pax_bomb()))),
    # item 6: the member count is read from the end of the zip before its central directory
    ("zip-many-members", {400}, lambda p: upload(p, **archive_upload("many", _many_members(10_000)))),
    # item 8: stop strings are capped in count and length
    ("stop-too-long", {422}, lambda p: post("/v1/generate", json={"prompt": "hi", "stop": ["x" * 5000]})),
    ("stop-too-many", {422}, lambda p: post("/v1/completions", json={"model": p.base_id, "prompt": "hi",
                                                                       "stop": [f"s{i}" for i in range(100)]})),
]
