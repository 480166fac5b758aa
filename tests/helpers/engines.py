"""Engines on the tiny test model, driven step by step from the test's thread."""

import time
from pathlib import Path

from transformers import AutoTokenizer

from server.engine.engine import Engine, EngineConfig
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel


def make_engine(model_dir: Path, adapters: dict[str, Path], slots: int = 3, **config) -> Engine:
    model = LoraModel(load_base_model(model_dir), num_slots=slots, max_rank=64)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    defaults = {"max_batch_size": 4, "max_seq_len": 160, "max_tokens_per_step": 24, "cpu_slots": 2}
    return Engine(model, tokenizer, lambda name: adapters[name], EngineConfig(**{**defaults, **config}))


def run_until_done(engine: Engine, limit: int = 5000) -> None:
    for _ in range(limit):
        if not engine.has_work():
            return
        if engine.step() == 0:
            time.sleep(0.002)  # an adapter is being read on the loader thread
    raise AssertionError("engine did not finish")
