"""vLLM's own endpoints on a real server process (issue 14, item 7): POST /v1/load_lora_adapter and
/v1/unload_lora_adapter as control planes built for vLLM drive them, only under --lora-load-dir and only with the
admin key; POST /tokenize and /detokenize against the tokenizer's own output."""

import shutil
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import upload

API, ADMIN = "vllm-test-api-key", "vllm-test-admin-key"
AS_API = {"Authorization": f"Bearer {API}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "the customer asked about a refund"
MAX_SEQ_LEN = 256
CHAT = [{"role": "user", "content": "x"}]
ADAPTER = 2  # tiny_adapters index: all-linear, rank 16, a visible effect on greedy text


class Setup:
    def __init__(self, proc: ServerProcess, allowed: Path, outside: Path) -> None:
        self.proc, self.allowed, self.outside = proc, allowed, outside

    @property
    def url(self) -> str:
        return self.proc.url

    def load(self, name: str, path: str | Path, headers: dict[str, str] = AS_ADMIN) -> httpx.Response:
        body = {"lora_name": name, "lora_path": str(path)}
        return httpx.post(f"{self.url}/v1/load_lora_adapter", json=body, headers=headers, timeout=60)

    def unload(self, name: str, headers: dict[str, str] = AS_ADMIN) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers, timeout=60)

    def names(self) -> list[str]:
        adapters = httpx.get(f"{self.url}/v1/adapters", headers=AS_API, timeout=10).json()["adapters"]
        return [a["name"] for a in adapters]

    def stored(self) -> tuple[list[str], list[str]]:
        """What the data directory holds: adapter folders and staging leftovers."""
        data = self.proc.data_dir
        adapters, staging = (sorted(p.name for p in (data / d).iterdir()) for d in ("adapters", "staging"))
        return adapters, staging

    def complete(self, model: str) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=AS_API, timeout=60)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    allowed, outside = root / "allowed", root / "outside"
    shutil.copytree(tiny_adapters("llama")[ADAPTER], allowed / "team" / "pirate")
    shutil.copytree(tiny_adapters("llama")[ADAPTER], outside / "pirate")
    proc = ServerProcess(tiny_model_dir("llama"), root / "store", "--gpu-slots", "2", "--max-seq-len", str(MAX_SEQ_LEN),
                         "--max-batch-size", "4", "--startup-adapters", str(root / "none"), "--api-key", API,
                         "--admin-key", ADMIN, "--lora-load-dir", str(allowed))  # fmt: skip
    with proc:
        yield Setup(proc, allowed, outside)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def test_loaded_adapter_answers_as_the_same_adapter_uploaded(setup, tiny_adapters) -> None:
    r = setup.load("loaded", setup.allowed / "team" / "pirate")
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'loaded' added successfully."  # vLLM's plain-text answer
    assert r.headers["content-type"].startswith("text/plain")
    assert upload(setup.url, "uploaded", tiny_adapters("llama")[ADAPTER], headers=AS_ADMIN).status_code == 201

    records = {n: httpx.get(f"{setup.url}/v1/adapters/{n}", headers=AS_API).json() for n in ("loaded", "uploaded")}
    assert records["loaded"]["sha256"] == records["uploaded"]["sha256"]
    assert records["loaded"]["rank"] == records["uploaded"]["rank"] == 16
    loaded, uploaded = setup.complete("loaded"), setup.complete("uploaded")
    assert loaded.status_code == uploaded.status_code == 200, loaded.text
    base_id = httpx.get(f"{setup.url}/v1/models", headers=AS_API).json()["data"][0]["id"]
    text = loaded.json()["choices"][0]["text"]
    assert text == uploaded.json()["choices"][0]["text"]
    assert text != setup.complete(base_id).json()["choices"][0]["text"]  # the adapter is applied
    assert "loaded" in [m["id"] for m in httpx.get(f"{setup.url}/v1/models", headers=AS_API).json()["data"]]


def test_a_loaded_adapter_survives_a_restart_without_its_source_folder(setup, tmp_path) -> None:
    source = setup.allowed / "team" / "restart"
    shutil.copytree(setup.allowed / "team" / "pirate", source)
    assert setup.load("restart", source).status_code == 200
    before = setup.complete("restart").json()["choices"][0]["text"]
    shutil.rmtree(source)  # the server keeps its own copy, as it does of an upload
    setup.proc.stop()
    setup.proc.start(ready_headers=AS_API)
    assert "restart" in setup.names()
    assert setup.complete("restart").json()["choices"][0]["text"] == before


def test_paths_not_allowed_are_refused_and_leave_nothing(setup) -> None:
    allowed, outside = setup.allowed, setup.outside
    (allowed / "linked-dir").symlink_to(outside / "pirate")
    (allowed / "linked-inside").symlink_to(allowed / "team")  # a link is refused even when it stays inside
    files = allowed / "linked-files"
    shutil.copytree(outside / "pirate", files)
    (files / "adapter_model.safetensors").unlink()
    (files / "adapter_model.safetensors").symlink_to(outside / "pirate" / "adapter_model.safetensors")
    cases = {
        str(outside / "pirate"): 403,
        f"{allowed}/../outside/pirate": 403,
        f"{allowed}/team/../team/pirate": 403,
        f"{allowed}-evil/pirate": 403,
        "/etc": 403,
        str(allowed / "linked-dir"): 403,
        str(allowed / "linked-inside" / "pirate"): 403,
        str(files): 403,
        "team/pirate": 400,  # relative
        str(allowed / "team" / "pirate" / "adapter_config.json"): 400,  # not a directory
        str(allowed / "team" / "missing"): 404,
        str(allowed / "team"): 422,  # a folder without the PEFT files
    }
    names, stored = setup.names(), setup.stored()
    for i, (path, status) in enumerate(cases.items()):
        r = setup.load(f"refused-{i}", path)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["message"], path
    assert setup.names() == names and setup.stored() == stored
    assert stored[1] == []  # no staging leftovers


def test_an_invalid_adapter_or_name_is_refused_as_an_upload_is(setup) -> None:
    broken = setup.allowed / "broken"
    shutil.copytree(setup.allowed / "team" / "pirate", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    stored = setup.stored()
    r = setup.load("broken", broken)
    assert (r.status_code, r.json()["error"]["type"]) == (422, "invalid_adapter")
    source = setup.allowed / "team" / "pirate"
    assert setup.load("bad/name", source).status_code == 400
    assert setup.load("..", source).status_code == 400
    assert setup.stored() == stored and "broken" not in setup.names()
    assert setup.load("dup", source).status_code == 200
    r = setup.load("dup", source)
    assert (r.status_code, r.json()["error"]["type"]) == (409, "conflict")  # as a duplicate upload answers


def test_unknown_fields_are_refused(setup) -> None:
    body = {"lora_name": "x", "lora_path": str(setup.allowed), "load_inplace": True}
    r = httpx.post(f"{setup.url}/v1/load_lora_adapter", json=body, headers=AS_ADMIN, timeout=10)
    assert (r.status_code, r.json()["error"]["type"]) == (400, "unsupported_field")
    assert "load_inplace" in r.json()["error"]["message"]


def test_load_and_unload_need_the_admin_key(setup) -> None:
    source = setup.allowed / "team" / "pirate"
    for headers, status in (({}, 401), (AS_API, 403)):
        assert setup.load("keyed", source, headers=headers).status_code == status
        assert setup.unload("uploaded", headers=headers).status_code == status
    assert "keyed" not in setup.names() and "uploaded" in setup.names()


def test_unload_then_completions_is_404(setup) -> None:
    assert setup.load("gone-soon", setup.allowed / "team" / "pirate").status_code == 200
    assert setup.complete("gone-soon").status_code == 200
    r = setup.unload("gone-soon")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'gone-soon' removed successfully.")
    assert setup.complete("gone-soon").status_code == 404
    assert "gone-soon" not in setup.names() and "gone-soon" not in setup.stored()[0]
    r = setup.unload("gone-soon")
    assert (r.status_code, r.json()["error"]["type"]) == (404, "not_found")
    # An uploaded adapter unloads the same way (it is DELETE /v1/adapters/{name}).
    assert setup.unload("uploaded").status_code == 200 and setup.complete("uploaded").status_code == 404


def post(setup: Setup, path: str, body: dict, headers: dict[str, str] = AS_API) -> httpx.Response:
    return httpx.post(f"{setup.url}{path}", json=body, headers=headers, timeout=30)


def test_tokenize_detokenize_round_trip_equals_the_tokenizer(setup, tokenizer) -> None:
    text = "héllo wörld 😀, the customer asked about a refund"
    r = post(setup, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tokenizer(text)["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": MAX_SEQ_LEN, "tokens": ids,
                        "token_strs": tokenizer.convert_ids_to_tokens(ids)}  # fmt: skip
    plain = post(setup, "/tokenize", {"prompt": text, "model": "loaded", "add_special_tokens": True}).json()
    assert plain["tokens"] == ids and plain["token_strs"] is None
    r = post(setup, "/detokenize", {"tokens": ids})
    assert r.json() == {"prompt": tokenizer.decode(ids)} and r.json()["prompt"] == text
    special = [1, *ids, 2]  # <s> ... </s>: decoded as vLLM does, special tokens included
    assert post(setup, "/detokenize", {"tokens": special}).json()["prompt"] == tokenizer.decode(special)
    assert post(setup, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_tokenize_counts_what_completions_count(setup) -> None:
    count = post(setup, "/tokenize", {"prompt": PROMPT}).json()["count"]
    usage = setup.complete("dup").json()["usage"]
    assert usage["prompt_tokens"] == count


def test_tokenize_messages_as_chat_completions_render_them(setup, tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = post(setup, "/tokenize", {"messages": messages, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    body = {"model": "dup", "messages": messages, "max_tokens": 1, "temperature": 0}
    usage = post(setup, "/v1/chat/completions", body).json()["usage"]
    assert usage["prompt_tokens"] == len(ids)


def test_tokenize_options_render_as_the_tokenizer_does(setup, tokenizer) -> None:
    text = "hello world"
    r = post(setup, "/tokenize", {"prompt": text, "add_special_tokens": False})  # what lm-eval's probe sends
    assert r.json()["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi the"}]
    for options in ({"add_generation_prompt": False}, {"add_generation_prompt": False, "continue_final_message": True},
                    {"add_generation_prompt": False, "add_special_tokens": True}):  # fmt: skip
        r = post(setup, "/tokenize", {"messages": messages, **options})
        assert r.status_code == 200, r.text
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, continue_final_message=options.get("continue_final_message", False),
            tokenize=False,
        )
        want = tokenizer(rendered, add_special_tokens=options.get("add_special_tokens", False))["input_ids"]
        assert r.json()["tokens"] == want, options


@pytest.mark.parametrize(
    "path, body, status, error",
    [
        ("/tokenize", {"prompt": "x", "nope": 1}, 400, "unsupported_field"),
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 422, "invalid_request"),
        ("/tokenize", {}, 422, "invalid_request"),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 422, "invalid_request"),
        ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "not_found"),
        ("/tokenize", {"prompt": "a " * 20_000}, 400, "invalid_request"),  # too many characters to fit
        ("/tokenize", {"prompt": "漢字 " * 100}, 400, "invalid_request"),  # few characters, too many tokens
        ("/detokenize", {"tokens": [5, 384]}, 400, "invalid_request"),  # the tiny vocabulary has 384 entries
        ("/detokenize", {"tokens": [-1]}, 400, "invalid_request"),
        ("/detokenize", {"tokens": [1.0]}, 422, "invalid_request"),
        ("/detokenize", {"tokens": [1] * (MAX_SEQ_LEN + 1)}, 400, "invalid_request"),
        ("/detokenize", {"tokens": [1], "model": "no-such-model"}, 404, "not_found"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, 400, "unsupported_field"),
    ],
)
def test_tokenize_refusals(setup, path, body, status, error) -> None:
    r = post(setup, path, body)
    assert (r.status_code, r.json()["error"]["type"]) == (status, error), r.text


def test_tokenize_needs_an_inference_key(setup) -> None:
    assert post(setup, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401
    assert post(setup, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401
    assert post(setup, "/tokenize", {"prompt": "x"}, headers=AS_ADMIN).status_code == 200


def test_no_request_above_made_the_server_fail(setup) -> None:
    assert httpx.get(f"{setup.url}/ready", timeout=10).status_code == 200
    assert "Traceback" not in setup.proc.log.read_text()


def test_loading_is_refused_when_not_enabled(tiny_model_dir, tiny_adapters, tmp_path) -> None:
    folder = tmp_path / "pirate"
    shutil.copytree(tiny_adapters("llama")[ADAPTER], folder)
    with ServerProcess(tiny_model_dir("llama"), tmp_path / "store", "--max-seq-len", "64",
                       "--startup-adapters", str(tmp_path / "none")) as proc:  # fmt: skip
        r = httpx.post(f"{proc.url}/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": str(folder)})
        assert (r.status_code, r.json()["error"]["type"]) == (403, "forbidden")
        assert "--lora-load-dir" in r.json()["error"]["message"]
        assert httpx.get(f"{proc.url}/v1/adapters").json()["adapters"] == []
        assert list((tmp_path / "store" / "adapters").iterdir()) == []
