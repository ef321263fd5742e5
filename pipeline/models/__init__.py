"""Models: the backbone factory (and later LoRA, prompts, fusion, decoders)."""
