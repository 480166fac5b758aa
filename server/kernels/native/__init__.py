"""The batched LoRA add on CPU by a C kernel built on first use (``lora_runs.c``; ``lora_runs_bf16.c`` for bfloat16)."""
