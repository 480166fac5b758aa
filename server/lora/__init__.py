"""LoRA adapters: PEFT checkpoint reading and validation, slot cache, per-step token->slot mapping, layers, ops."""
