"""One forward pass over a batch whose rows use many distinct LoRA adapters, timed side by side in one run.

Contenders, on the same base model, the same token ids and the same adapters:
  plain      the base model with no LoRA wrappers at all (the floor)
  ours-base  our wrapped model, every row on the base slot (wrapper overhead alone)
  ours       our wrapped model, each row on its own adapter (the mixed batch)
  peft       PEFT's own mixed batch, ``model(input_ids, adapter_names=[...])``

Usage: python -m loadtests.bench_lora_forward [--rows 64 --tokens 32 --adapters 32 --rank 16 --repeats 3]
Targets on a 2-core CPU with SmolLM2-135M: ours <= 1.15x plain, peft / ours >= 3.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from loadtests.common.factories import save_peft_adapters
from loadtests.common.lora_rows import lora_logits, row_mapping
from loadtests.common.timing import interleave
from server.model.embedded import ensure_embedded_model
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_lora_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=None, help="HF folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--op", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    base_dir = args.base_model or ensure_embedded_model()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names = save_peft_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        plain = load_base_model(base_dir, device="cpu", dtype="float32")
        ours = LoraModel(load_base_model(base_dir, device="cpu", dtype="float32"), args.adapters, args.rank, args.op)
        for slot, name in zip(ours.slots, names, strict=True):
            ours.write_slot(slot, ours.read_adapter(Path(tmp) / name))

    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, plain.config.vocab_size, (args.rows, args.tokens), generator=gen)
    row_adapter = torch.randperm(args.rows, generator=gen) % args.adapters  # each adapter on rows far apart
    row_slots = [list(ours.slots)[a] for a in row_adapter.tolist()]
    row_names = [names[a] for a in row_adapter.tolist()]

    def run_plain() -> torch.Tensor:
        with torch.inference_mode():
            return plain(input_ids=input_ids, use_cache=False).logits

    def run_ours_base() -> torch.Tensor:
        return lora_logits(ours, input_ids, row_mapping([0] * args.rows, args.tokens))

    def run_ours() -> torch.Tensor:
        # The mapping is built inside the timed region: it is part of every step's cost.
        return lora_logits(ours, input_ids, row_mapping(row_slots, args.tokens))

    def run_peft() -> torch.Tensor:
        with torch.inference_mode():
            return peft_model(input_ids=input_ids, adapter_names=row_names, use_cache=False).logits

    # Median seconds of each contender, interleaved in every round after one warm-up round.
    rounds = interleave({"plain": run_plain, "ours_base": run_ours_base, "ours": run_ours, "peft": run_peft},
                        args.repeats, warmup=1)  # fmt: skip
    results = {name: (statistics.median(seconds), rounds.last(name)) for name, seconds in rounds.seconds.items()}
    (t_plain, plain_logits), (t_ours_base, _) = results["plain"], results["ours_base"]
    (t_ours, ours_logits), (t_peft, peft_logits) = results["ours"], results["peft"]
    max_diff = float((ours_logits - peft_logits).abs().max())
    lora_effect = float((ours_logits - plain_logits).abs().max())  # proves the adapters did something

    figures = {
        "rows": args.rows,
        "tokens_per_row": args.tokens,
        "adapters": args.adapters,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "op": ours.op_name,
        "seconds": {"plain": t_plain, "ours_base": t_ours_base, "ours": t_ours, "peft_mixed": t_peft},
        "ours_over_plain": t_ours / t_plain,
        "ours_base_over_plain": t_ours_base / t_plain,
        "peft_over_ours": t_peft / t_ours,
        # What LoRA adds, PEFT's over ours: the part an implementation can change. Each against its own base pass
        # (on CPU ours runs packed base weights, which the plain model does not, so ours - plain would mix the two).
        "peft_added_over_ours_added": (t_peft - t_plain) / max(t_ours - t_ours_base, 1e-9),
        "max_abs_logit_diff_vs_peft": max_diff,
        "max_abs_logit_change_by_adapters": lora_effect,
    }
    print(
        f"batch: {args.rows} rows x {args.tokens} tokens, {args.adapters} adapters of rank {args.rank}, "
        f"{torch.get_num_threads()} threads, op={ours.op_name}"
    )
    for k, v in figures["seconds"].items():
        print(f"  {k:<10} {v * 1000:9.1f} ms")
    print(f"ours / plain      = {figures['ours_over_plain']:.3f}  (target <= 1.15)")
    print(f"ours-base / plain = {figures['ours_base_over_plain']:.3f}")
    print(f"peft / ours       = {figures['peft_over_ours']:.2f}  (target >= 3)")
    print(f"time LoRA adds (peft - plain) / (ours - ours-base) = {figures['peft_added_over_ours_added']:.2f}")
    print(f"max |logit ours - logit peft| = {max_diff:.2e}; adapters change logits by up to {lora_effect:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
