"""bfloat16 on the CPU, end to end: base rows and two adapters mixed in one batch through our model (the C kernel and
the grouped torch op) match PEFT run in bfloat16 row by row; and ``/ready`` reports the dtype the server runs in.

Tolerance (logits of the tiny Llama, |logit| up to ~1): both sides round every activation to bfloat16, at different
places (PEFT rounds ``x @ A.T`` and the scaled LoRA term to bfloat16 before adding it; the C kernel keeps ``x @ A.T``
in float32 and rounds y once; oneDNN's and the reference GEMMs sum in other orders), so they differ by a few bfloat16
roundings of the logits: measured max 2.0e-2 (C kernel) and 2.7e-2 (grouped op) on this AVX2 CPU (float32 vs PEFT
in float32: 5e-5). ATOL = 5e-2, about 2x that, to leave room for oneDNN's AVX512-BF16 kernels elsewhere. Greedy
tokens must be equal wherever PEFT's top-2 gap exceeds 2 x ATOL (closer calls may flip on one rounding; the random
tiny model's logits are flat, so only ~28% of positions are such clear calls; 95% of all agree).
"""

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loadtests.common.lora_rows import lora_logits, row_mapping
from server.api.app import create_app
from server.config import Settings
from server.kernels.native.ops import native_usable
from server.kernels.slots import BASE_SLOT
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.service import Service

BF16 = torch.bfloat16
ATOL = 5e-2
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_usable(BF16), reason="no bf16 kernel here"))
ADAPTERS = (0, 3)  # two of tests/conftest.py's adapters (different ranks and target modules)


@torch.inference_mode()
def _peft_rows(base_dir, adapter_dirs, input_ids: torch.Tensor, row_adapters: list[int | None]) -> torch.Tensor:
    """PEFT in bfloat16, each row run alone with its adapter (None: adapters disabled); logits [B, L, V] float32."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=BF16).eval()
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, folder in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.eval()
    rows = []
    for i, adapter in enumerate(row_adapters):
        if adapter is None:
            with model.disable_adapter():
                rows.append(model(input_ids=input_ids[i : i + 1]).logits)
        else:
            model.set_adapter(f"a{adapter}")
            rows.append(model(input_ids=input_ids[i : i + 1]).logits)
    return torch.cat(rows).float()


@pytest.mark.parametrize("op", ["grouped", NATIVE])
def test_bf16_mixed_batch_matches_peft_in_bf16(op: str, tiny_model_dir, tiny_adapters) -> None:
    base_dir, every = tiny_model_dir("llama"), tiny_adapters("llama")
    adapters = [every[i] for i in ADAPTERS]
    model = LoraModel(load_base_model(base_dir, "cpu", "bfloat16"), num_slots=2, max_rank=64, op=op)
    assert model.dtype == BF16 and model.op_name == op
    for slot, folder in enumerate(adapters, start=1):
        model.write_slot(slot, model.read_adapter(folder))
    row_adapters: list[int | None] = [None, 0, 1, 0, None, 1]  # base rows between, adapter 0 on non-adjacent rows
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(5, model.model.config.vocab_size, (len(row_adapters), 10), generator=g)
    slots = [BASE_SLOT if a is None else a + 1 for a in row_adapters]
    ours = lora_logits(model, input_ids, row_mapping(slots, input_ids.shape[1])).float()
    expected = _peft_rows(base_dir, adapters, input_ids, row_adapters)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)

    top2 = expected.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * ATOL
    assert decided.float().mean() > 0.2  # enough clear calls for the check below to mean something (28% here)
    assert torch.equal(ours.argmax(-1)[decided], expected.argmax(-1)[decided])

    # The test can fail: each adapter moves its rows' logits well past the tolerance.
    base = _peft_rows(base_dir, adapters, input_ids, [None] * len(row_adapters))
    for i, a in enumerate(row_adapters):
        if a is not None:
            assert (expected[i] - base[i]).abs().max() > 5 * ATOL, f"adapter {a} has no visible effect"


def test_ready_reports_the_dtype(tiny_model_dir, tmp_path) -> None:
    fields = {"base_model": tiny_model_dir("llama"), "data_dir": tmp_path / "store", "startup_adapters": None,
              "max_seq_len": 64, "gpu_slots": 1, "dtype": "bfloat16"}  # fmt: skip
    service = Service(Settings.model_validate(fields))
    with TestClient(create_app(service)) as client:
        ready = client.get("/ready").json()
    expected_op = "native" if native_usable(BF16) else "grouped"
    assert ready == {"status": "ready", "dtype": "bfloat16", "device": "cpu", "lora_op": expected_op}
