"""How LoRA is computed: the op protocol and selection, the torch reference and grouped ops, the C kernel
(``native/``) and the Triton kernels (``triton/``). Nothing here imports ``server.lora``."""
