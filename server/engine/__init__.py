"""The generation engine: requests, scheduler, KV cache, model runner, sampler, the step loop."""
