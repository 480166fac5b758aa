"""The evaluation harness people point at vLLM, ``lm-eval``, run against a real server on the tiny model.

Three small tasks with local data (written to tmp_path, defined as lm-eval task configs): ``generate_until``
(exact_match), ``multiple_choice`` (acc, acc_norm) and ``loglikelihood_rolling`` (word/byte perplexity, bits per
byte). lm-eval drives ``local-completions`` (token-id prompts, four per request: batched prompts, ``echo`` +
``logprobs`` + ``max_tokens: 1`` for the loglikelihoods) and ``local-chat-completions`` (generate_until); one task runs
through an adapter. Every score, and every per-document answer behind it, must equal the one computed here with
transformers (PEFT for the adapter) directly on the same model.

Tolerances: summed log-likelihoods of one document or choice within 1e-3 (float32, ~30 tokens, different kernels and
batch shapes), perplexities relative 1e-4; greedy texts, accuracies and exact_match exactly. The data is made so that
no score is trivially 0 or 1: golds and targets are the reference's answers for the first documents and wrong ones
for the rest. A second test feeds lm-eval's own response parser a score whose generated token is EOS.
"""

import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from loadtests.common.peft_reference import PeftReference
from tests.helpers.http_client import upload

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install 'lm-eval[api]')"
)

MAX_LEN = 256  # the server's --max-seq-len (tests/e2e/conftest.py); lm-eval must not send longer prompts
GEN_TOKENS = 8
UNTIL = ["e"]  # a stop string the tiny model's greedy text does contain, so stop handling is exercised
RIGHT = 3  # the first RIGHT documents of each task get the reference's answer as gold / target, the others a wrong one
LL_ATOL, PPL_RTOL = 1e-3, 1e-4
QUESTIONS = ["the customer asked about a refund", "the pirate ship", "hello world", "json answer please",
             "the captain of the sea"]  # fmt: skip
CHOICES = [["yes", "no", "maybe"], ["sail", "treasure", "order", "sea"], ["thank you", "why"],
           ["legal contract", "support ticket", "invoice"], ["yes", "no"]]  # fmt: skip
TEXTS = ["the captain of the pirate ship asked where the treasure was", "hello world", "please send the invoice "
         "and the delivery order to the customer support team, thank you", "héllo wörld ÿes 漢字"]  # fmt: skip

Logits = Callable[[list[int]], torch.Tensor]  # token ids [L] -> logits [L, V]


# ---- the reference: transformers / PEFT, run here ------------------------------------------------------------------


def logits_of(model: torch.nn.Module) -> Logits:
    @torch.inference_mode()
    def run(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids])).logits[0].float()

    return run


def scored(logits: Logits, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    """Sum of log p(ids[i] | ids[:i]) for i >= ctxlen, and whether each of those tokens is the argmax."""
    logprobs = torch.log_softmax(logits(ids[:-1]), dim=-1)[ctxlen - 1 :]  # [n_cont, V]
    target = torch.tensor(ids[ctxlen:])
    picked = logprobs.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())


def choice_scores(tok: PreTrainedTokenizerBase, logits: Logits, question: str, choices: list[str]) -> list[float]:
    """Log-likelihood of " <choice>" after the question, split into context and continuation tokens as lm-eval
    documents it (encode the whole string; the context's tokens are a prefix of it)."""
    ctx = tok(question, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        whole = tok(question + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx
        out.append(scored(logits, whole, len(ctx))[0])
    return out


def greedy_text(model: torch.nn.Module, tok: PreTrainedTokenizerBase, ids: list[int], stops: list[str]) -> str:
    """transformers' greedy continuation (EOS ends it), decoded without special tokens, cut before the first stop."""
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_TOKENS,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def chat_ids(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ---- the tasks: local data and lm-eval task configs -------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = path.parent / "hf-datasets-cache"
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(cache)},
            "test_split": "test"}  # fmt: skip


def gen_task(folder: Path, name: str, answers: list[str]) -> dict[str, Any]:
    targets = [a if i < RIGHT else a + " (wrong)" for i, a in enumerate(answers)]
    rows = [{"question": q, "answer": t} for q, t in zip(QUESTIONS, targets, strict=True)]
    return {"task": name, **write_jsonl(folder / f"{name}.jsonl", rows), "output_type": "generate_until",
            "doc_to_text": "question", "doc_to_target": "answer",
            "generation_kwargs": {"until": UNTIL, "max_gen_toks": GEN_TOKENS, "temperature": 0.0, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}  # fmt: skip


def mc_task(folder: Path, name: str, scores: list[list[float]]) -> dict[str, Any]:
    golds = [argmax(s) if i < RIGHT else (argmax(s) + 1) % len(s) for i, s in enumerate(scores)]
    rows = [{"question": q, "choices": c, "label": g} for q, c, g in zip(QUESTIONS, CHOICES, golds, strict=True)]
    return {"task": name, **write_jsonl(folder / f"{name}.jsonl", rows), "output_type": "multiple_choice",
            "doc_to_text": "question", "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}  # fmt: skip


def rolling_task(folder: Path, name: str) -> dict[str, Any]:
    return {"task": name, **write_jsonl(folder / f"{name}.jsonl", [{"text": t} for t in TEXTS]),
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                    "bits_per_byte")]}  # fmt: skip


def mc_expected(scores: list[list[float]], golds: list[int]) -> dict[str, float]:
    acc = [argmax(s) == g for s, g in zip(scores, golds, strict=True)]
    norm = [argmax([x / len(c) for x, c in zip(s, cs, strict=True)]) == g
            for s, cs, g in zip(scores, CHOICES, golds, strict=True)]  # fmt: skip
    return {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}


def rolling_expected(lls: list[float]) -> dict[str, float]:
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    return {"word_perplexity": math.exp(-sum(lls) / words), "byte_perplexity": math.exp(-sum(lls) / nbytes),
            "bits_per_byte": -sum(lls) / nbytes / math.log(2)}  # fmt: skip


# ---- running lm-eval -----------------------------------------------------------------------------------------------


def evaluate(model: str, model_args: dict[str, Any], tasks: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """lm-eval's Python API with only our tasks indexed (no built-in task scan); bootstrap off (no stderr needed)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, bootstrap_iters=0,
                                      log_samples=True, task_manager=TaskManager(include_defaults=False),
                                      **kwargs)  # fmt: skip
    assert results is not None
    return results


def metric(results: dict[str, Any], task: str, name: str) -> float:
    return float(results["results"][task][f"{name},none"])


def per_doc(results: dict[str, Any], task: str) -> list[Any]:
    """Each document's raw model answers (lm-eval's ``resps``: one list per request, of one answer), in document
    order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("OPENAI_API_KEY", "unused")
        yield tmp_path_factory.mktemp("lm-eval")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_adapters) -> dict[str, Any]:
    folder = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft = PeftReference(folder, tiny_adapters("llama")[:1])
    peft.model.set_adapter(peft.names[0])
    return {"tok": tok, "base": base, "adapter": peft.model, "dir": folder}


def test_lm_eval_scores_equal_transformers(server, offline: Path, reference: dict[str, Any], tiny_adapters) -> None:
    tok, base, adapter = reference["tok"], reference["base"], reference["adapter"]
    base_logits, adapter_logits = logits_of(base), logits_of(adapter)
    stops = [*UNTIL, tok.eos_token]  # lm-eval appends the tokenizer's EOS string to `until`
    gen = [greedy_text(base, tok, tok(q, add_special_tokens=False)["input_ids"], stops) for q in QUESTIONS]
    chat = [greedy_text(base, tok, chat_ids(tok, q), UNTIL) for q in QUESTIONS]
    mc = [choice_scores(tok, base_logits, q, c) for q, c in zip(QUESTIONS, CHOICES, strict=True)]
    mc_adapter = [choice_scores(tok, adapter_logits, q, c) for q, c in zip(QUESTIONS, CHOICES, strict=True)]
    rolling = [scored(base_logits, [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]], 1)[0]
               for t in TEXTS]  # fmt: skip
    uncut = [greedy_text(base, tok, tok(q, add_special_tokens=False)["input_ids"], []) for q in QUESTIONS]
    assert gen != uncut and any(gen), (gen, uncut)  # the stop string cuts some answers, not all to nothing
    assert max(abs(a - b) for s, t in zip(mc, mc_adapter, strict=True) for a, b in zip(s, t, strict=True)) > 0.05

    assert upload(server.url, "lm-eval-adapter", tiny_adapters("llama")[0]).status_code == 201
    model_id = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    common = {"tokenizer": str(reference["dir"]), "num_concurrent": 1, "max_retries": 1, "max_length": MAX_LEN,
              "timeout": 60}  # fmt: skip
    completions = {**common, "base_url": f"{server.url}/v1/completions", "model": model_id,
                   "tokenizer_backend": "huggingface", "tokenized_requests": True}  # fmt: skip

    # local-completions: the three kinds of request, four prompts per HTTP request
    tasks = [gen_task(offline, "tiny_gen", gen), mc_task(offline, "tiny_mc", mc), rolling_task(offline, "tiny_roll")]
    out = evaluate("local-completions", completions, tasks, batch_size=4)
    assert [r[0][0] for r in per_doc(out, "tiny_gen")] == gen, per_doc(out, "tiny_gen")
    assert metric(out, "tiny_gen", "exact_match") == pytest.approx(RIGHT / len(QUESTIONS))
    check_mc(out, "tiny_mc", mc, base_logits, tok)
    got_rolling = [r[0][0] for r in per_doc(out, "tiny_roll")]
    assert got_rolling == pytest.approx(rolling, abs=LL_ATOL)
    for name, value in rolling_expected(rolling).items():
        assert metric(out, "tiny_roll", name) == pytest.approx(value, rel=PPL_RTOL), name

    # local-chat-completions: generate_until only (lm-eval refuses loglikelihoods over chat)
    chat_args = {**common, "base_url": f"{server.url}/v1/chat/completions", "model": model_id}
    chat_task = gen_task(offline, "tiny_chat", chat)
    out = evaluate("local-chat-completions", chat_args, [chat_task], apply_chat_template=True)
    assert [r[0][0] for r in per_doc(out, "tiny_chat")] == chat, per_doc(out, "tiny_chat")
    assert metric(out, "tiny_chat", "exact_match") == pytest.approx(RIGHT / len(QUESTIONS))

    # an adapter, against PEFT
    adapter_args = {**completions, "model": "lm-eval-adapter"}
    out = evaluate("local-completions", adapter_args, [mc_task(offline, "tiny_mc_adapter", mc_adapter)], batch_size=4)
    check_mc(out, "tiny_mc_adapter", mc_adapter, adapter_logits, tok)


def check_mc(out: dict[str, Any], task: str, scores: list[list[float]], logits: Logits,
             tok: PreTrainedTokenizerBase) -> None:  # fmt: skip
    """Per choice: lm-eval's (loglikelihood, is_greedy) against the reference; then acc and acc_norm."""
    golds = [json.loads(line)["label"] for line in (Path(out["configs"][task]["dataset_kwargs"]["data_files"]["test"])
                                                   .read_text().splitlines())]  # fmt: skip
    for doc, (resps, expected, question) in enumerate(zip(per_doc(out, task), scores, QUESTIONS, strict=True)):
        got = [r[0][0] for r in resps]
        assert got == pytest.approx(expected, abs=LL_ATOL), (task, doc)
        ctx = tok(question, add_special_tokens=False)["input_ids"]
        greedy = [scored(logits, tok(question + " " + c, add_special_tokens=False)["input_ids"], len(ctx))[1]
                  for c in CHOICES[doc]]  # fmt: skip
        assert [r[0][1] for r in resps] == greedy, (task, doc)
    expected_metrics = mc_expected(scores, golds)
    assert expected_metrics["acc"] == RIGHT / len(QUESTIONS)
    for name, value in expected_metrics.items():
        assert metric(out, task, name) == pytest.approx(value), (task, name)


def test_lm_eval_parses_a_score_whose_next_token_is_eos(server, reference: dict[str, Any]) -> None:
    """lm-eval drops the last log-prob entry blindly (the token generated after the echoed prompt): when that token
    is EOS its entry must still be there, or every score loses its last continuation token. The tiny model never
    picks EOS by itself, so logit_bias forces it (prompt log-probs are of the raw distribution, unaffected)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok, logits = reference["tok"], logits_of(reference["base"])
    model_id = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    pairs = zip(QUESTIONS, CHOICES, strict=True)
    prompts = [tok(q + " " + choices[0], add_special_tokens=False)["input_ids"] for q, choices in pairs]
    ctxlens = [len(tok(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    body = {"model": model_id, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True, "logit_bias": {str(tok.eos_token_id): 100}}  # lm-eval's payload, plus the bias  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] == "stop" for c in r.json()["choices"])  # EOS was the generated token
    parsed = LocalCompletionsAPI.parse_logprobs(outputs=r.json(), ctxlens=ctxlens)
    expected = [scored(logits, ids, n) for ids, n in zip(prompts, ctxlens, strict=True)]
    assert [p[0] for p in parsed] == pytest.approx([e[0] for e in expected], abs=LL_ATOL)
    assert [p[1] for p in parsed] == [e[1] for e in expected]
