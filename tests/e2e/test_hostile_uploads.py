"""Hostile adapter uploads (issue 13, items 1, 2, 5 and 6): regexes that backtrack for minutes, the tar pax-header
ReDoS (CVE-2024-6232), configs that broke the JSON reader, archive names no file system holds, and zip central
directories too large to parse. Each is refused with a 4xx, fast and in bounded memory.

A stuck regex holds the GIL, so nothing in the stuck process can time it out: the cases that froze the process run
in a fresh interpreter (``run_isolated``) with a deadline, and fail cleanly instead of hanging the suite.
"""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.adapters.errors import AdapterFormatError, UnsupportedAdapterError
from server.adapters.peft_config import parse_lora_config
from server.adapters.registry import AdapterRegistry, AdapterSummary, BadArchive
from tests.helpers.paths import REPO_ROOT
from tests.helpers.registry_fakes import make_zip

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj") + (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_8b_module_names() -> list[str]:
    """named_modules() of a Llama-3-8B: 32 layers x 7 projections, plus their containers, norms and the head."""
    names = ["", "model", "model.embed_tokens", "model.layers"]
    for i in range(32):
        layer = f"model.layers.{i}"
        names += [layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn"]
        names += [f"{layer}.{p}" for p in _PROJ]
        names += [f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


def run_isolated(code: str, stdin: str = "", timeout: float = 15.0) -> dict:
    """Run ``code`` in a fresh interpreter fed ``stdin``; it prints one JSON object, returned here. Fails (instead of
    hanging) when it is still running after ``timeout`` seconds."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(
            command, input=stdin, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        done = None
    if done is None:
        pytest.fail(f"still running after {timeout:g} s: this upload would freeze the server process", pytrace=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- item 1: uploaded regexes are matched in linear time ---------------------------------------------------------
_MATCH_ALL = """
    import json, sys, time
    from server.adapters.errors import AdapterError
    from server.adapters.peft_config import parse_lora_config

    config, names = json.loads(sys.stdin.read())
    start = time.perf_counter()
    try:
        spec = parse_lora_config(config)
        targets = spec.targets(names)
        scales = [spec.scale_for(n) for n in names if n]
        outcome = {"targets": len(targets), "scales": len(scales)}
    except AdapterError as exc:
        outcome = {"refused": type(exc).__name__, "message": str(exc)}
    print(json.dumps({"seconds": time.perf_counter() - start, **outcome}))
"""
_CATASTROPHIC = "(.|.)*X"  # 2**len(name) paths for a backtracking engine on every name it does not match
_LIST = ["q_proj", "v_proj"]
REGEX_FIELDS = {
    "target_modules": {"target_modules": _CATASTROPHIC},
    "exclude_modules": {"target_modules": _LIST, "exclude_modules": _CATASTROPHIC},
    "rank_pattern": {"target_modules": _LIST, "rank_pattern": {_CATASTROPHIC: 4}},
    "alpha_pattern": {"target_modules": _LIST, "alpha_pattern": {_CATASTROPHIC: 4}},
    "layers_pattern": {"target_modules": _LIST, "layers_to_transform": [1], "layers_pattern": _CATASTROPHIC},
}


@pytest.mark.parametrize("fields", REGEX_FIELDS.values(), ids=REGEX_FIELDS.keys())
def test_catastrophic_regex_is_decided_fast_on_an_8b_module_list(fields: dict) -> None:
    names = llama_8b_module_names()
    result = run_isolated(_MATCH_ALL, json.dumps([{"peft_type": "LORA", **fields}, names]))
    assert "refused" not in result, result
    assert result["seconds"] < 1.0, result
    assert result["scales"] == len(names) - 1


def test_largest_accepted_pattern_sets_are_decided_fast() -> None:
    """EVA-style configs (one key per module, in both dicts) and the most RE2 work the caps allow."""
    names = llama_8b_module_names()
    targets = [n for n in names if n.endswith("_proj")]
    ranks, alphas = dict.fromkeys(targets, 8), dict.fromkeys(targets, 16)
    eva = {"target_modules": list(_PROJ), "rank_pattern": ranks, "alpha_pattern": alphas}
    plain = {f"model.layers.{i}.mlp.no_proj{i}": 4 for i in range(1024)}  # 1,024 keys matching nothing
    heavy = {f"{i}(" + "|".join(f"(.|.)*{c}\\w*" for c in "abcdefghijklmn") + ")*X": 4 for i in range(32)}
    for config in (eva, {"target_modules": _LIST, "rank_pattern": plain, "alpha_pattern": dict(plain)},
                   {"target_modules": _LIST, "rank_pattern": heavy, "alpha_pattern": dict(heavy)}):  # fmt: skip
        result = run_isolated(_MATCH_ALL, json.dumps([{"peft_type": "LORA", **config}, names]))
        assert "refused" not in result, result
        # 0.05-0.3 s measured on an idle 2-core machine; the bound leaves room for a loaded one (a backtracking
        # engine on the "heavy" keys never finishes, so any finite bound still tells the two apart)
        assert result["seconds"] < 3.0, result


@pytest.mark.parametrize(
    "pattern",
    ["(.|.)*X", "(a|aa)+$", r"(\w+\.)*q_proj", r"model\.layers\.(\d+)*\.mlp"],
    ids=["any-any", "a-aa", "words", "digits"],
)
def test_re2_answers_like_peft_re_where_re_finishes(pattern: str) -> None:
    """On names short enough for backtracking to end, every field answers as peft's own ``re`` calls do."""
    names = ["a", "aaaa", "aX", "a.bX", "h.q_proj", "x.q_proj", "model.layers.1.mlp", "X", "aa.X", "q_proj"]
    spec = parse_lora_config({"peft_type": "LORA", "target_modules": pattern})
    assert spec.targets(names) == [n for n in names if re.fullmatch(pattern, n)]
    spec = parse_lora_config({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {pattern: 3}})
    assert [spec.rank_for(n) for n in names] == [3 if re.match(rf"(.*\.)?({pattern})$", n) else 8 for n in names]


CANNOT_BE_LINEAR = [
    ("target_modules", r"(q)_proj\1"),  # backreference
    ("target_modules", r".*(?<!k)_proj"),  # lookbehind
    ("exclude_modules", r".*(?=v_proj)v_proj"),  # lookahead
    ("rank_pattern", r"(?>q_proj)"),  # atomic group
    ("alpha_pattern", r"q_proj\Z"),
    ("layers_pattern", r"(?P<n>l)(?P=n)ayers"),
]


def _config_with(field: str, pattern: str) -> dict:
    config: dict = {"peft_type": "LORA", "target_modules": ["q_proj"]}
    if field in ("rank_pattern", "alpha_pattern"):
        config[field] = {pattern: 4}
    elif field == "layers_pattern":
        config |= {"layers_to_transform": [0], "layers_pattern": pattern}
    else:
        config[field] = pattern
    return config


@pytest.mark.parametrize(("field", "pattern"), CANNOT_BE_LINEAR, ids=[f for f, _ in CANNOT_BE_LINEAR])
def test_patterns_re2_cannot_compile_are_refused(field: str, pattern: str) -> None:
    re.compile(pattern)  # valid for peft: refused only because it cannot be matched in linear time
    with pytest.raises(UnsupportedAdapterError, match=rf"^{field}: .*linear time"):  # the API answers 422
        parse_lora_config(_config_with(field, pattern))


@pytest.mark.parametrize(
    ("pattern", "named"),
    [("q" * 1001, "at most 1000"), ("q_proj{,2}", r"\{0,n\}"), ("[[:alpha:]_]+", "POSIX")],
    ids=["too-long", "empty-lower-bound", "posix-class"],
)
def test_patterns_are_bounded_and_spellings_re2_reads_differently_are_refused(pattern: str, named: str) -> None:
    with pytest.raises(AdapterFormatError, match=named):
        parse_lora_config(_config_with("target_modules", pattern))
    parse_lora_config(_config_with("target_modules", "q" * 1000))


def test_pattern_counts_are_bounded() -> None:
    keys = {f"layers.{i}.q_proj": 2 for i in range(1025)}
    with pytest.raises(AdapterFormatError, match="rank_pattern has 1025 keys"):
        parse_lora_config({"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": keys})
    regexes = {f"layers.{i}.(q|k)_proj": 2 for i in range(65)}
    with pytest.raises(AdapterFormatError, match="more than 64 regular expressions"):
        parse_lora_config({"peft_type": "LORA", "target_modules": ["q_proj"], "alpha_pattern": regexes})


# ---- item 5: hostile JSON gives 422, never 500 --------------------------------------------------------------------
def _config_text(**raw_values: str) -> bytes:
    """A LoRA config whose listed values are spliced in verbatim (number literals no JSON library would write)."""
    body = ", ".join(f'"{k}": {v}' for k, v in raw_values.items())
    return ('{"peft_type": "LORA", "target_modules": ["q_proj"], ' + body + "}").encode()


HOSTILE_CONFIGS = {
    "nested-100k": ('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
    "nested-17": ('{"peft_type": "LORA", "target_modules": ["q"], "x": ' + "[" * 16 + "]" * 16 + "}").encode(),
    "int-5000-digits": _config_text(r="1" + "0" * 5000),
    "alpha-400-digits": _config_text(lora_alpha="9" * 400),
    "alpha-pattern-400-digits": _config_text(alpha_pattern='{"q_proj": ' + "9" * 400 + "}"),
    "rank-400-digits": _config_text(r="9" * 400),
    "rank-pattern-5000-digits": _config_text(rank_pattern='{"q_proj": ' + "9" * 5000 + "}"),
    "float-5000-digits": _config_text(lora_alpha="0." + "1" * 5000),
    "over-1-mib": _config_text(x='"' + "y" * (1 << 20) + '"'),
}


@pytest.mark.parametrize("raw", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_hostile_config_json_is_refused_with_a_format_error(raw: bytes) -> None:
    with pytest.raises(AdapterFormatError) as info:
        parse_lora_config(raw)
    assert len(str(info.value)) < 400  # names the bound, never echoes the value back


def test_depth_and_numbers_within_bounds_are_accepted() -> None:
    nested = "[" * 15 + "]" * 15  # 16 levels with the enclosing object
    spec = parse_lora_config(_config_text(x=nested, r="9" * 30, lora_alpha="1." + "5" * 90))
    assert spec.r == int("9" * 30) and spec.lora_alpha == 1.5555555555555556
    with pytest.raises(AdapterFormatError, match="lora_alpha"):  # a float cannot hold it: not a usable scale
        parse_lora_config({"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": 10**400})


# ---- archives: a registry with a validator that only parses the config -------------------------------------------
CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode()
PEFT_FILES = {"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\x08" + bytes(1000)}


def _summary(folder: Path) -> AdapterSummary:
    spec = parse_lora_config((folder / "adapter_config.json").read_bytes())
    return AdapterSummary(rank=spec.r, alpha=spec.lora_alpha, target_modules=list(spec.target_modules))


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "data", _summary)


def make_tgz(members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT, pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(data), 1700000000.25, dict(pax or {})
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pax_record(type_: bytes, data: bytes) -> bytes:
    """One raw tar extended header (pax 'x'/'g' or GNU 'L') with ``data`` as its contents, padded to blocks."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = type_, len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def ustar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def raw_tgz(*extended: bytes) -> bytes:
    """``extended`` (raw header bytes), then a PEFT folder as plain ustar members, gzip'd."""
    return gzip.compress(b"".join(extended) + gzip.decompress(make_tgz(PEFT_FILES, tarfile.USTAR_FORMAT)), 9)


def records(**values: str) -> bytes:
    """pax records "<length> <key>=<value>\\n" with the length right."""
    out = b""
    for key, value in values.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + len(str(len(body)))
        length += len(str(length)) - len(str(len(body)))
        out += str(length).encode() + body
    return out


# ---- item 2: tar pax-header ReDoS ---------------------------------------------------------------------------------
_EXTRACT = """
    import io, json, sys, tempfile, time
    from pathlib import Path
    from server.adapters.archive import UnsafeArchive, UploadLimits, extract_adapter_archive

    data = Path(sys.stdin.read()).read_bytes()
    work = Path(tempfile.mkdtemp())
    (work / "dest").mkdir()
    start = time.perf_counter()
    try:
        extract_adapter_archive(io.BytesIO(data), work / "scratch", work / "dest", UploadLimits())
        outcome = "accepted"
    except UnsafeArchive as exc:
        outcome = f"refused: {exc}"
    print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome}))
"""


def test_tar_pax_header_redos_is_refused_fast(tmp_path: Path) -> None:
    """CVE-2024-6232: one 1 MiB pax header of digits, 1.2 KiB gzip'd; tarfile < 3.11.10 parses it in hours."""
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(raw_tgz(pax_record(tarfile.XHDTYPE, b"1" * 2**20)))
    assert len(archive.read_bytes()) < 2048
    result = run_isolated(_EXTRACT, str(archive))
    assert result["outcome"].startswith("refused: a tar extended header") and "at most 4096" in result["outcome"]
    assert result["seconds"] < 1.0, result


EXTENDED_CASES = {
    "pax-over-4k": [pax_record(tarfile.XHDTYPE, records(comment="1" * 4100))],
    "global-over-4k": [pax_record(tarfile.XGLTYPE, records(comment="1" * 4100))],
    "gnu-long-name-over-4k": [pax_record(tarfile.GNUTYPE_LONGNAME, b"a/" * 2100 + b"\0")],
    "total-over-16k": [
        pax_record(tarfile.XHDTYPE, records(comment="1" * 3900)) + ustar_member(f"pad{i}.txt", b"p") for i in range(5)
    ],
    "chain-of-5": [pax_record(tarfile.XHDTYPE, records(comment="x"))] * 5,
    "malformed-record": [pax_record(tarfile.XHDTYPE, b"99 comment=1\n")],
    "gnu-sparse": [pax_record(tarfile.XHDTYPE, records(**{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))],
}


@pytest.mark.parametrize("headers", EXTENDED_CASES.values(), ids=EXTENDED_CASES.keys())
def test_tar_extended_headers_are_bounded(registry: AdapterRegistry, headers: list[bytes]) -> None:
    with pytest.raises(BadArchive, match="tar extended header|pax|sparse"):
        registry.add_archive("ext", io.BytesIO(raw_tgz(*headers)))
    assert "ext" not in registry


LEGIT_TARS = {
    "pax": make_tgz({f"a/{k}": v for k, v in PEFT_FILES.items()}),
    "pax-200-char-folder": make_tgz({"d" * 200 + f"/{k}": v for k, v in PEFT_FILES.items()}),
    "pax-unicode-and-xattr": make_tgz(
        {f"ädapter/{k}": v for k, v in PEFT_FILES.items()}, pax={"SCHILY.xattr.user.note": "n" * 1500}
    ),
    "gnu-long-names": make_tgz({"g" * 200 + f"/{k}": v for k, v in PEFT_FILES.items()}, tarfile.GNU_FORMAT),
    "ustar": make_tgz(PEFT_FILES, tarfile.USTAR_FORMAT),
    "one-global-header": raw_tgz(pax_record(tarfile.XGLTYPE, records(comment="git archive"))),
}


@pytest.mark.parametrize("data", LEGIT_TARS.values(), ids=LEGIT_TARS.keys())
def test_tar_archives_real_tools_write_still_extract(registry: AdapterRegistry, data: bytes) -> None:
    record = registry.add_archive("ok", io.BytesIO(data))
    assert record.rank == 8 and sorted(p.name for p in registry.path("ok").iterdir()) == sorted(PEFT_FILES)


# ---- item 5: archive member names no file system holds --------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zip", "tgz"])
@pytest.mark.parametrize(("prefix", "ok"), [("p" * 255 + "/", True), ("p" * 256 + "/", False), ("q/" * 520, False)])
def test_member_names_longer_than_a_file_system_allows_are_refused(
    registry: AdapterRegistry, fmt: str, prefix: str, ok: bool
) -> None:
    members = {prefix + k: v for k, v in PEFT_FILES.items()}
    data = make_zip(members).getvalue() if fmt == "zip" else make_tgz(members)
    if ok:
        assert registry.add_archive("named", io.BytesIO(data)).rank == 8
        return
    with pytest.raises(BadArchive, match="at most 1024 and 255 bytes"):
        registry.add_archive("named", io.BytesIO(data))


# ---- item 6: the zip entry count is read before the central directory ----------------------------------------------
def many_entry_zip(entries: int) -> bytes:
    """``entries`` empty members and an adapter: zip64 end records from 65,536 entries on, as zipfile writes them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in PEFT_FILES.items():
            zf.writestr(name, data)
        for i in range(entries):
            zf.writestr(zipfile.ZipInfo(f"{i}"), b"")
    return buf.getvalue()


@pytest.fixture(scope="module")
def zip_100k() -> bytes:
    return many_entry_zip(100_000)


def _lying_counts(data: bytes) -> bytes:
    """The same zip with every end record claiming one entry (zipfile sizes the directory by bytes, not count)."""
    out = bytearray(data)
    zip64 = out.rfind(b"PK\x06\x06")
    out[zip64 + 24 : zip64 + 40] = (1).to_bytes(8, "little") * 2
    eocd = out.rfind(b"PK\x05\x06")
    out[eocd + 8 : eocd + 12] = (1).to_bytes(2, "little") * 2
    return bytes(out)


@pytest.mark.parametrize("lie", [False, True], ids=["true-count", "count-says-1"])
def test_zip_with_100k_entries_is_refused_before_its_directory_is_parsed(
    registry: AdapterRegistry, zip_100k: bytes, lie: bool
) -> None:
    upload = io.BytesIO(_lying_counts(zip_100k) if lie else zip_100k)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BadArchive, match="more than 64 members|central directory has"):
            registry.add_archive("many", upload)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Parsing the directory costs ~50 MiB and ~1 s; the upload itself is copied in 1 MiB chunks.
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert seconds < 1.0


def test_zip_near_the_member_cap_still_extracts(registry: AdapterRegistry) -> None:
    assert registry.add_archive("fits", io.BytesIO(many_entry_zip(62))).rank == 8  # 64 members in all


# ---- over HTTP: every one of these is a 4xx with a JSON message, and the server stays responsive ------------------
def _files(config: bytes) -> dict:
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", b"x")}


_LONG_NAMES_ZIP = make_zip({f"{'p' * 300}/{k}": v for k, v in PEFT_FILES.items()}).getvalue()
HTTP_CASES = {
    "catastrophic-target-regex": (_files(json.dumps(_config_with("target_modules", "(.|.)*X")).encode()), 422),
    "backreference": (_files(json.dumps(_config_with("target_modules", r"(q)_proj\1")).encode()), 422),
    "nested-100k": (_files(HOSTILE_CONFIGS["nested-100k"]), 422),
    "int-5000-digits": (_files(HOSTILE_CONFIGS["int-5000-digits"]), 422),
    "alpha-400-digits": (_files(HOSTILE_CONFIGS["alpha-400-digits"]), 422),
    "alpha-pattern-400-digits": (_files(HOSTILE_CONFIGS["alpha-pattern-400-digits"]), 422),
    "rank-400-digits": (_files(HOSTILE_CONFIGS["rank-400-digits"]), 422),
    "pax-redos": ({"archive": ("a.tar.gz", raw_tgz(pax_record(tarfile.XHDTYPE, b"1" * 2**20)))}, 400),
    "gnu-sparse-pax": ({"archive": ("a.tar.gz", raw_tgz(*EXTENDED_CASES["gnu-sparse"]))}, 400),
    "long-member-name": ({"archive": ("a.zip", _LONG_NAMES_ZIP)}, 400),
}


@pytest.mark.parametrize(("files", "status"), HTTP_CASES.values(), ids=HTTP_CASES.keys())
def test_hostile_uploads_answer_4xx_over_http(server, files: dict, status: int) -> None:
    """Each upload is answered 4xx in seconds, and ``/health`` on other connections keeps answering within 1 s
    while it is processed (before the fixes a regex or pax header froze the whole process, GIL held)."""
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(httpx.post, f"{server.url}/v1/adapters", data={"name": "hostile"}, files=files,
                             timeout=20)  # fmt: skip
        polls = 0
        while not upload.done() or polls == 0:
            polled = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=1).status_code == 200  # a timeout fails the test
            assert time.monotonic() - polled < 1
            polls += 1
            time.sleep(0.05)
        r = upload.result()
    assert r.status_code == status, r.text[:500]
    assert r.json()["error"]["message"]
    assert time.monotonic() - start < 5


def test_100k_entry_zip_answers_400_over_http(server, zip_100k: bytes) -> None:
    files = {"archive": ("a.zip", zip_100k)}
    r = httpx.post(f"{server.url}/v1/adapters", data={"name": "many"}, files=files, timeout=20)
    assert r.status_code == 400 and "more than 64 members" in r.json()["error"]["message"]


def test_catastrophic_rank_key_on_a_real_adapter_is_decided_fast_over_http(server, tiny_adapters) -> None:
    """A valid adapter whose rank/alpha keys match nothing: every target is tried against them, then it is stored."""
    folder = tiny_adapters("llama")[0]
    config = json.loads((folder / "adapter_config.json").read_text())
    config |= {"rank_pattern": {_CATASTROPHIC: 32}, "alpha_pattern": {_CATASTROPHIC: 99}}
    files = {
        "adapter_config": ("adapter_config.json", json.dumps(config).encode()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/adapters", data={"name": "slow-keys"}, files=files, timeout=20)
    assert r.status_code == 201, r.text[:500]
    assert time.monotonic() - start < 5
    assert httpx.delete(f"{server.url}/v1/adapters/slow-keys", timeout=10).status_code == 204
