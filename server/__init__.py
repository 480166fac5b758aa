"""Multi-LoRA inference server: one frozen base model, many unmerged LoRA adapters served per request."""
