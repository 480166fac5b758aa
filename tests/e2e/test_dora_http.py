"""A DoRA adapter (``use_dora: true``, a magnitude vector per module) uploaded over HTTP generates PEFT's greedy text,
streamed and not, and answers in the same batch as a plain LoRA adapter."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loadtests.common.dora import save_dora_adapter, without_dora
from loadtests.common.factories import save_peft_adapter
from loadtests.common.peft_reference import PeftReference
from server.model.lora_model import DEFAULT_TARGETS
from tests.helpers.http_client import sse_events, upload

PROMPT = "the customer asked about a refund"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    root = tmp_path_factory.mktemp("dora-http")
    dora = save_dora_adapter(base, root / "dora", seed=41, r=8, lora_alpha=16, use_rslora=True,
                             target_modules=list(DEFAULT_TARGETS))  # fmt: skip
    plain = save_peft_adapter(base, root / "plain", seed=42, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    return {"dora": dora, "plain": plain, "dora-as-plain": without_dora(dora, root / "dora-as-plain")}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters) -> dict[str, str]:
    """PEFT's greedy text of PROMPT (EOS ignored) per adapter."""
    names = list(adapters)
    reference = PeftReference(tiny_model_dir("llama"), [adapters[n] for n in names])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    texts = {}
    for name, peft_name in zip(names, reference.names, strict=True):
        reference.model.set_adapter(peft_name)
        with torch.inference_mode():
            out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=2)  # fmt: skip
        texts[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert texts["dora"] != texts["dora-as-plain"]  # the magnitudes change the text: the test can fail
    return texts


def _generate(url: str, adapter: str, **extra) -> httpx.Response:
    body = {"adapter": adapter, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120)


def test_a_dora_upload_generates_peft_text(server, adapters, expected) -> None:
    for name in ("dora", "plain"):
        r = upload(server.url, f"h-{name}", adapters[name])
        assert r.status_code == 201, r.text
    assert upload(server.url, "h-dora", adapters["dora"]).json()["error"]["type"] == "conflict"

    r = _generate(server.url, "h-dora")
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expected["dora"]
    body = {"adapter": "h-dora", "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=120) as resp:
        events = sse_events(resp)
    assert "".join(e["token"]["text"] for e in events[:-1] if isinstance(e, dict) and "token" in e) == expected["dora"]

    # Requests on DoRA and plain LoRA at once, so they share the engine's steps.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: _generate(server.url, a), ["h-dora", "h-plain", "h-dora", "h-plain"]))
    assert [a.json()["text"] for a in answers] == [expected["dora"], expected["plain"]] * 2
