"""The frozen base model: loading it, wrapping its target modules with batched LoRA layers, the embedded default."""
