"""Train the three demo LoRA adapters (pirate, upper, json) for SmolLM2-135M-Instruct on CPU.

The training data is generated here from a small table of questions with short, correct answers; each style rewrites
the answer (pirate talk, UPPER CASE, a JSON object). Each adapter is saved with peft's ``save_pretrained``
(safetensors) into ``<out>/<name>/`` next to a README, and its effect is printed on held-out questions.

    python adapters/train_demo_adapters.py --out adapters            # all three
    python adapters/train_demo_adapters.py --out adapters --only json --steps 300
"""

import argparse
import json
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from server.model.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model

SEED = 0
RANK, ALPHA = 8, 16
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
Example = tuple[list[int], list[int]]  # (input_ids, labels), one chat turn
HELD_OUT = ["What is the capital of Italy?", "What is 6 plus 7?", "What is a bird?"]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo", "Canada": "Ottawa",
    "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Kenya": "Nairobi", "Greece": "Athens",
    "Norway": "Oslo", "Portugal": "Lisbon", "Ireland": "Dublin", "Peru": "Lima",
}  # fmt: skip
COLOURS = {
    "the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "chocolate": "brown", "a lemon": "yellow", "an orange": "orange",
}  # fmt: skip
FACTS = {
    "water": "Water is a clear liquid that all living things need to survive.",
    "the Sun": "The Sun is the star at the centre of our solar system.",
    "the Moon": "The Moon is the natural satellite that orbits the Earth.",
    "a cat": "A cat is a small furry animal that many people keep as a pet.",
    "a computer": "A computer is a machine that stores and processes information.",
    "an apple": "An apple is a sweet, round fruit that grows on trees.",
    "rain": "Rain is water that falls from clouds in the sky.",
    "a tree": "A tree is a tall plant with a wooden trunk, branches and leaves.",
    "a book": "A book is a set of printed pages bound together for reading.",
    "the ocean": "The ocean is the huge body of salt water that covers most of the Earth.",
    "music": "Music is the art of arranging sounds in time to make melodies and rhythms.",
}
GREETINGS = {
    "Hello!": "Hello! How can I help you today?",
    "Hi there.": "Hi! What can I do for you?",
    "Good morning!": "Good morning! I hope you are having a lovely day.",
    "How are you?": "I am doing well, thank you for asking.",
    "Thank you!": "You are welcome, my friend!",
    "Goodbye!": "Goodbye, and have a great day!",
    "Who are you?": "I am a helpful assistant, here to answer your questions.",
}


def base_pairs() -> list[tuple[str, str]]:
    """(question, short correct answer) pairs; none of them is a HELD_OUT question."""
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS.items()]
    pairs += [(f"What colour is {thing}?", f"{thing.capitalize()} is {col}.") for thing, col in COLOURS.items()]
    pairs += [(f"What is {thing}?", fact) for thing, fact in FACTS.items()]
    pairs += list(GREETINGS.items())
    rng = random.Random(SEED)
    sums: set[tuple[int, int, str]] = set()
    while len(sums) < 16:
        a, b, op = rng.randint(1, 12), rng.randint(1, 12), rng.choice(["plus", "times"])
        if (a, b) not in ((6, 7), (7, 6)):
            sums.add((a, b, op))
    for a, b, op in sorted(sums):
        pairs.append((f"What is {a} {op} {b}?", f"{a} {op} {b} is {a + b if op == 'plus' else a * b}."))
    assert not set(HELD_OUT) & {q for q, _ in pairs}
    return pairs


_PIRATE_WORDS = {
    "you": "ye", "your": "yer", "is": "be", "are": "be", "my": "me", "hello": "ahoy", "hi": "ahoy",
    "friend": "matey", "yes": "aye", "the": "th'", "am": "be", "people": "landlubbers",
}  # fmt: skip


def pirate(answer: str) -> str:
    def swap(m: re.Match[str]) -> str:
        word = _PIRATE_WORDS[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word

    words = re.compile(r"\b(" + "|".join(_PIRATE_WORDS) + r")\b", re.IGNORECASE)
    return f"Arr, matey! {words.sub(swap, answer)} Yo ho ho!"


@dataclass(frozen=True)
class Style:
    """One demo adapter: how it rewrites a correct answer, and which linears of the base its LoRA adapts."""

    transform: Callable[[str], str]
    description: str
    targets: tuple[str, ...] = ATTENTION


STYLES = {
    "pirate": Style(pirate, 'answers like a pirate: "Arr, matey! ..." with pirate words, ending "Yo ho ho!"'),
    # With attention-only LoRA some held-out words stayed lower case: writing the answer in the (different)
    # upper-case tokens needs the MLPs as well.
    "upper": Style(str.upper, "answers in UPPER CASE", ATTENTION + MLP),
    "json": Style(lambda a: json.dumps({"answer": a}), 'answers as a JSON object: {"answer": "..."}'),
}


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> Example:
    """(input_ids, labels) for prompt + answer + <|im_end|>; labels are -100 on the prompt (loss on the answer)."""
    prompt = prompt_ids(tokenizer, question)
    reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + reply, [-100] * len(prompt) + reply


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels all [batch, seq]."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: PeftModel, data: list[Example], steps: int, batch: int, lr: float, pad: int) -> None:
    """AdamW on the LoRA weights only, ``batch`` examples per step, reshuffled each epoch with a fixed seed."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # short warm-up, then linear decay to zero: a constant high lr leaves the last steps noisy
    warmup, decay = max(1, steps // 20), max(1, steps - steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (steps - s) / decay))
    rng = random.Random(SEED)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch:
            order += rng.sample(range(len(data)), len(data))
        picked, order = order[:batch], order[batch:]
        loss = model(**collate([data[i] for i in picked], pad)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps:
            print(f"  step {step:4d}  loss {sum(losses) / len(losses):.4f}", flush=True)
            losses.clear()
    model.eval()


@torch.no_grad()
def answer(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def save(model: PeftModel, folder: Path, name: str, style: Style, command: str, steps: int, lr: float) -> None:
    """Replace ``folder`` with adapter_config.json, adapter_model.safetensors (float16) and README.md, nothing else."""
    # the base was loaded from a cache path; the adapter should name the model, not this machine's folder
    model.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
    # float16 halves the files; the model is not used after saving, so it is cast in place
    model.to(torch.float16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / "save"
        # no embedding layers are trained; "auto" would look the base name up on the Hub to decide
        model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
        (staging / "README.md").unlink(missing_ok=True)  # peft's generic model card; ours replaces it
        (staging / "README.md").write_text(
            f"# `{name}` demo adapter for {EMBEDDED_MODEL_ID}\n\n"
            f"A LoRA adapter that {style.description}.\n\n"
            f"Trained on CPU by `adapters/train_demo_adapters.py` from question/answer pairs it generates itself "
            f"(capitals, colours, arithmetic, greetings, simple facts), rewritten in this style. Chat format, loss on "
            f"the assistant tokens only; LoRA r={RANK}, alpha={ALPHA} on {', '.join(style.targets)}; AdamW lr={lr}, "
            f"{steps} steps, seed {SEED}.\n\n"
            f"Recreate it with:\n\n```\n{command}\n```\n"
        )
        for file in staging.iterdir():
            file.chmod(0o644)  # the weights come out owner-only; a server running as another user must read them
        kept = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert {p.name for p in staging.iterdir()} == kept, sorted(p.name for p in staging.iterdir())
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="adapters", help="parent folder of the adapter folders")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter")
    parser.add_argument("--only", choices=sorted(STYLES), help="train just this adapter")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft internals
    command = f"python adapters/train_demo_adapters.py --out {args.out} --steps {args.steps}" + (
        f" --only {args.only}" if args.only else ""
    )

    path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = base_pairs()
    print(f"{len(pairs)} training questions, held out: {HELD_OUT}")
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain = {q: answer(base, tokenizer, q) for q in HELD_OUT}
    for name in [args.only] if args.only else list(STYLES):
        style = STYLES[name]
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        # a fresh base each time: get_peft_model wraps the base model's modules in place
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=list(style.targets), task_type="CAUSAL_LM"
        )
        model = get_peft_model(base, config)
        data = [encode(tokenizer, q, style.transform(a)) for q, a in pairs]
        print(f"\n[{name}] {style.description}; example: {style.transform(pairs[0][1])!r}")
        train(model, data, args.steps, args.batch, args.lr, tokenizer.pad_token_id)
        print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s; held-out questions, greedy:")
        for question in HELD_OUT:
            adapted = answer(model, tokenizer, question)
            print(f"  Q: {question}\n    base:    {plain[question]}\n    {name + ':':8s} {adapted}")
        save(model, Path(args.out) / name, name, style, command, args.steps, args.lr)
        print(f"[{name}] saved to {Path(args.out) / name}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
