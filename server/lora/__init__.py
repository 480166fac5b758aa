"""Where an adapter lives: the accelerator slots and their cache, prefetch, the wrapped linear layer."""
