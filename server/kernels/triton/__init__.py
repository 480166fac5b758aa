"""The batched LoRA add as Triton kernels (SGMV for prefill, BGMV for decode); triton is imported on first use."""
