"""ModelRunner on the paged cache equals a plain Hugging Face forward of each whole sequence: prompt chunks,
decodes, a prefix shared through the block table, a forked sequence's copied block; shuffled block tables."""

import random

import pytest
import torch

from loadtests.common.factories import build_tiny_model
from server.engine.model_runner import ModelRunner, SequenceChunk
from server.kernels.attention.native import native_decode_usable
from server.kernels.attention.select import DECODE_KERNELS
from server.model.lora_model import LoraModel

BS = 4


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_runner_logits_equal_full_forward(kernel: str) -> None:
    if kernel == "native" and not native_decode_usable():
        pytest.skip("no native paged attention kernel here")
    reference = build_tiny_model("llama", layers=2)
    runner = ModelRunner(LoraModel(build_tiny_model("llama", layers=2), num_slots=1, max_rank=8), 40, BS, 64, 8)
    runner.attention.decode = DECODE_KERNELS[kernel]
    rng = random.Random(0)
    seqs = [[rng.randrange(5, 300) for _ in range(n)] for n in (14, 10, 11)]
    seqs.append(seqs[0][:8] + [rng.randrange(5, 300) for _ in range(5)])  # shares seq 0's first two blocks
    seqs.append(seqs[1][:9] + [rng.randrange(5, 300) for _ in range(3)])  # forked from seq 1 at 9 positions
    free = list(range(40))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(s) // BS))] for s in seqs]
    tables[3][:2] = tables[0][:2]
    tables[4][:2] = tables[1][:2]  # full blocks shared; its third block is a copy of seq 1's partial one

    def chunk(seq: int, start: int, end: int, every: bool = True) -> SequenceChunk:
        return SequenceChunk(tables[seq], 0, seqs[seq][start:end], start, needs_logits=True, all_logits=every)

    steps: list[tuple[list[SequenceChunk], list[tuple[int, int]]]] = [
        ([chunk(0, 0, 6), chunk(1, 0, 9, every=False), chunk(2, 0, 3)], []),
        ([chunk(0, 6, 10), chunk(2, 3, 4, every=False), chunk(1, 9, 10)], []),
        ([chunk(3, 8, 12), chunk(4, 9, 10), chunk(0, 10, 11, every=False), chunk(2, 4, 11)],
         [(tables[1][2], tables[4][2])]),
        ([chunk(3, 12, 13), chunk(4, 10, 12), chunk(0, 11, 14)], []),
    ]  # fmt: skip
    with torch.inference_mode():
        expected = [reference(torch.tensor([s])).logits[0].float() for s in seqs]
    for chunks, copies in steps:
        out = runner.run(chunks, copies)
        sample = iter(out.sample)
        every = iter(out.positions)
        for c in chunks:
            seq = tables.index(list(c.block_table))
            want = expected[seq][c.start : c.end]
            if c.all_logits:
                torch.testing.assert_close(next(every), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(next(sample), want[-1], atol=1e-4, rtol=1e-4)


def test_runner_refuses_a_table_too_short() -> None:
    runner = ModelRunner(LoraModel(build_tiny_model("llama", layers=1), num_slots=1, max_rank=8), 8, BS, 32, 2)
    with pytest.raises(ValueError, match="cannot hold"):
        runner.run([SequenceChunk([0], 0, list(range(5, 10)), 0, needs_logits=True)])
    with pytest.raises(ValueError, match="at most 32"):
        runner.run([SequenceChunk(list(range(8)), 0, [5], 32, needs_logits=True)])
    assert runner.cache.num_blocks == 8 and runner.cache.block_size == BS
