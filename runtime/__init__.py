"""lockstep's Python runtime: config, loaders, tokenizer, model, KV cache, scheduler, engine, sampler, CLI."""
