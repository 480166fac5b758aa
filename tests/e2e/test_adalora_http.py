"""An AdaLoRA adapter (pruned ranks, one module at rank 0) uploaded over HTTP generates PEFT's greedy text, beside
a plain LoRA adapter; a kind the server does not serve is refused at upload with its peft_type named."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loadtests.common.peft_reference import PeftReference
from tests.helpers.adalora_adapters import save_adalora_adapter
from tests.helpers.http_client import upload

PROMPT = "the customer asked about a refund"


def _peft_text(model_dir, folder) -> str:
    reference = PeftReference(model_dir, [folder])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, eos_token_id=None, pad_token_id=2)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_adalora_upload_generates_peft_text_next_to_lora(server, tiny_model_dir, tiny_adapters, tmp_path) -> None:
    model_dir = tiny_model_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ada = save_adalora_adapter(base, tmp_path / "ada", seed=11)
    config = json.loads((ada / "adapter_config.json").read_text())
    kept = max(sum(mask) for mask in config["rank_pattern"].values())

    r = upload(server.url, "ada-pruned", ada)
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == kept  # the largest rank kept after pruning
    assert upload(server.url, "plain", tiny_adapters("llama")[0]).status_code == 201

    def generate(adapter: str) -> str:
        body = {"adapter": adapter, "prompt": PROMPT, "max_new_tokens": 12, "ignore_eos": True}
        answer = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["text"]

    with ThreadPoolExecutor(4) as pool:  # the two kinds batched together
        texts = list(pool.map(generate, ["ada-pruned", "plain", "ada-pruned", "plain"]))
    expected = _peft_text(model_dir, ada)
    assert texts[0] == texts[2] == expected
    assert texts[1] == texts[3] == _peft_text(model_dir, tiny_adapters("llama")[0])
    body = {"prompt": PROMPT, "max_new_tokens": 12, "ignore_eos": True}
    base_text = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120).json()["text"]
    assert base_text != expected  # the adapter changes the answer


def test_a_kind_not_served_is_refused_by_peft_type(server, tiny_adapters, tmp_path) -> None:
    folder = tmp_path / "loha"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8, "target_modules": ["q_proj"]}))
    weights = tiny_adapters("llama")[0] / "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    r = upload(server.url, "loha", folder)
    assert r.status_code == 422 and "peft_type='LOHA' is not served" in r.json()["error"]["message"]
