"""Issue 13, items 9-12 through real server processes: keys are never printed, prompts are bounded in characters and
tokenised off the event loop, a client that goes away is noticed while its stream is queued or silent, and a chat
template that refuses a conversation answers 400."""

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from loadtests.common.factories import CHAT_TEMPLATE
from loadtests.common.server_process import ServerProcess
from tests.helpers.http_client import metric, wait_for

PROMPT = "the customer asked about a refund"
KEY = "Zq8xK3y9vTqw7LmRb2Nh5PcY"  # no 6 characters of it may appear in any output
# Llama-2 / Mistral style: the template itself refuses a conversation whose roles do not alternate.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% endfor %}" + CHAT_TEMPLATE
)


# ---- item 9: keys never appear in any output ------------------------------------------------------------------


def serve_output(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``lora-server serve`` with settings it must refuse; its exit status and output. The base model (a missing
    folder, should the settings pass) comes by environment variable so that a flag's value is echoed last."""
    args = [sys.executable, "-m", "server.cli", "serve", *flags]
    env = {**os.environ, "LORA_SERVER_BASE_MODEL": str(tmp_path / "missing"), **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def leaks(secret: str, output: str) -> bool:
    """Any 6 consecutive characters of ``secret`` in ``output`` (pydantic shortens what it echoes to its ends)."""
    return any(secret[i : i + 6] in output for i in range(len(secret) - 5))


@pytest.mark.parametrize(
    ("flags", "env", "names"),
    [
        # A model-level check: pydantic echoed every setting, the keys included.
        (("--admin-key", KEY, "--max-batch-size", "64", "--max-tokens-per-step", "8"), {}, "max_tokens_per_step"),
        ((), {"LORA_SERVER_API_KEY": KEY, "LORA_SERVER_MAX_BATCH_SIZE": "64", "LORA_SERVER_MAX_TOKENS_PER_STEP": "8"},
         "max_tokens_per_step"),
        (("--api-key", KEY, "--port", "0"), {}, "--port"),
        # A mistyped flag: argparse listed the "unrecognized arguments", the key after it included.
        (("--admin-kye", KEY), {}, "--admin-kye"),
        (("--api-kye=" + KEY,), {}, "--api-kye"),
        (("--api-key", "inference", KEY), {}, "unrecognized"),
        (("--admin-kye", "-" + KEY), {}, "--admin-kye"),  # a URL-safe key may start with "-"
        (("--log-level", KEY), {}, "--log-level"),
    ],
    ids=["model-check-flag", "model-check-env", "bad-port", "mistyped-flag", "mistyped-flag-equals", "extra-argument",
         "mistyped-flag-dash-key", "bad-choice"],
)  # fmt: skip
def test_refused_settings_never_print_a_key(tmp_path, flags, env, names) -> None:
    status, output = serve_output(tmp_path, *flags, env=env)
    assert status == 2, output
    assert not leaks(KEY, output) and names in output, output


@pytest.mark.parametrize(
    "bad", ["", "Wq9zXk4vRt Jm2nBc8pLs", " Wq9zXk4vRtJm2nBc8pLs", "Wq9zXk4vRtJm2nBc8pLsключ"],
    ids=["empty", "space", "padded", "non-ascii"],
)
def test_a_key_no_client_can_send_is_refused_without_echo(tmp_path, bad) -> None:
    for flags, env in (((f"--admin-key={bad}",), {}), ((), {"LORA_SERVER_API_KEY": bad})):
        status, output = serve_output(tmp_path, *flags, env=env)
        assert status == 2 and "key" in output and "Traceback" not in output, output
        assert not leaks(bad.replace(" ", ""), output), output


# ---- a server whose model only ever says <unk> (every text delta is empty) ------------------------------------


@pytest.fixture(scope="module")
def quiet_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its final norm zeroed (all logits 0, so greedy decoding picks id 0, ``<unk>``, a special
    token that decodes to no text) and a chat template that raises on roles that do not alternate."""
    folder = tmp_path_factory.mktemp("quiet-model")
    shutil.copytree(tiny_model_dir("llama"), folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quiet(quiet_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("quiet")
    flags = ("--max-batch-size", "1", "--max-seq-len", "2048", "--request-timeout", "120",
             "--startup-adapters", str(data / "none"))  # fmt: skip
    with ServerProcess(quiet_model, data / "store", *flags) as proc:
        yield proc


def model_id(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


def chat(url: str, messages: list[dict[str, str]], **fields: object) -> dict[str, object]:
    return {"model": model_id(url), "messages": messages, "temperature": 0, **fields}


# ---- item 11: a client that goes away is noticed while queued and while its stream is silent -----------------


def test_stream_disconnected_while_queued_leaves_the_queue(quiet) -> None:
    url = quiet.url
    before = metric(url, "lora_requests_total", outcome="cancelled")
    body = b'{"prompt": "%s", "max_new_tokens": 2000, "stream": true}' % PROMPT.encode()
    # The only row runs a long stream; a second stream waits in the queue, then its client hangs up.
    with httpx.stream("POST", f"{url}/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2000, "stream": True},
                      timeout=60) as running:  # fmt: skip
        lines = running.iter_lines()  # held: dropping the iterator would close the connection
        next(line for line in lines if line.startswith("data: "))
        with socket.create_connection(("127.0.0.1", quiet.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            wait_for(lambda: metric(url, "lora_queue_length") == 1)
        # Out of the queue within a step or two, while the first stream still holds the row: never prefilled.
        wait_for(lambda: metric(url, "lora_queue_length") == 0, 3.0)
        assert metric(url, "lora_requests_total", outcome="cancelled") == before + 1
        assert metric(url, "lora_running_requests") == 1
    wait_for(lambda: metric(url, "lora_running_requests") == 0, 3.0)


def test_silent_chat_stream_notices_a_disconnect(quiet) -> None:
    # Every delta is empty, so nothing is written after the role chunk: the disconnect must still be noticed (today
    # by Starlette's StreamingResponse, which listens for it while uvicorn reports ASGI spec 2.3).
    url = quiet.url
    before = metric(url, "lora_requests_total", outcome="cancelled")
    body = chat(url, [{"role": "user", "content": PROMPT}], max_tokens=2000, stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # held: dropping the iterator would close the connection
        next(line for line in lines if line.startswith("data: "))
        wait_for(lambda: metric(url, "lora_running_requests") == 1)
    # The connection is closed: the request is cancelled within a few steps, not after its 2000 tokens.
    wait_for(lambda: metric(url, "lora_requests_total", outcome="cancelled") == before + 1, 3.0)
    assert metric(url, "lora_running_requests") == 0


# ---- item 12: a chat template that refuses the conversation -------------------------------------------------


def test_chat_template_that_raises_answers_400_with_its_message(quiet) -> None:
    url = quiet.url
    twice = [{"role": "user", "content": PROMPT}, {"role": "user", "content": PROMPT}]
    for stream in (False, True):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(url, twice, max_tokens=2, stream=stream), timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request"
        assert "Conversation roles must alternate" in r.json()["error"]["message"]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "ok"}]
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(url, ok, max_tokens=2), timeout=30)
    assert r.status_code == 200, r.text


# ---- item 10: prompts bounded in characters, tokenised off the event loop ------------------------------------


def test_over_long_prompt_is_refused_by_its_length_before_tokenising(quiet, quiet_model) -> None:
    url = quiet.url
    longest = max(len(token) for token in AutoTokenizer.from_pretrained(quiet_model).get_vocab())
    limit = 2047 * longest  # the prompt limit (max_seq_len - 1 tokens) times the longest vocabulary entry
    text = "word " * 400_000  # 2 MB: seconds to tokenise on a busy CPU
    for path, body in (
        ("/v1/generate", {"prompt": text, "max_new_tokens": 1}),
        ("/v1/completions", {"model": model_id(url), "prompt": text, "max_tokens": 1}),
        ("/v1/chat/completions", chat(url, [{"role": "user", "content": text}], max_tokens=1)),
    ):
        start = time.monotonic()
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert f"{len(text)} characters; the limit is {limit}" in message, message
        assert time.monotonic() - start < 1.0  # refused without tokenising
    # At the limit, the tokens decide (and a prompt of short words is over the token limit long before that).
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "a" * limit, "max_new_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "exceeds the maximum sequence length 2048" in r.json()["error"]["message"]


def test_health_answers_while_large_prompts_are_tokenised(tiny_model_dir, tmp_path) -> None:
    # A prompt limit of 199,999 tokens lets ~2.4 MB prompts through the character bound. Two 2 MB prompts take
    # seconds to tokenise (together they held the event loop for seconds before the fix) and are then refused by
    # their token count.
    flags = ("--max-batch-size", "1", "--max-seq-len", "200000", "--startup-adapters", str(tmp_path / "none"))
    with ServerProcess(tiny_model_dir("llama"), tmp_path / "store", *flags) as server:
        text = "word " * 400_000
        with ThreadPoolExecutor(2) as pool:
            big = [pool.submit(httpx.post, f"{server.url}/v1/generate", json={"prompt": text}, timeout=120)
                   for _ in range(2)]  # fmt: skip
            worst, polls = 0.0, 0
            while not all(f.done() for f in big):
                start = time.monotonic()
                assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
                worst, polls = max(worst, time.monotonic() - start), polls + 1
                time.sleep(0.05)
        for f in big:
            r = f.result()
            assert r.status_code == 400 and "the maximum sequence length 200000" in r.json()["error"]["message"], r.text
        assert polls >= 5 and worst < 1.0, (polls, worst)
