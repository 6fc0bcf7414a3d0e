"""Parameter-efficient adapters (LoRA, DoRA, prefix and prompt tuning) and their PEFT-compatible files."""
