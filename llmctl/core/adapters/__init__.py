"""Parameter-efficient adapters: LoRA / rsLoRA / DoRA (`lora.py`) in PEFT's file format
(`peft_format.py`; `files.py` without torch), and the finetuning methods (`methods.py`).

    from llmctl.core.adapters import LoRA, merge_adapter, save_adapter
    model, cfg = load_model(base, transforms=[LoRA(r=8, target_modules=["q_proj", "v_proj"])])
    save_adapter(model, "out", base=base)       # adapter_config.json + adapter_model.safetensors
    model, cfg = load_model("out")              # an adapter directory loads with its base
    merge_adapter(model)                        # deltas folded into the base weights

Names resolve lazily, so `is_adapter` and `base_path` need no torch.
"""

import importlib

_HOMES = {
    "LoRA": "lora", "lora_modules": "lora", "mark_trainable": "lora", "merge_adapter": "lora",
    "is_adapter": "files", "base_path": "files", "read_config": "files", "describe_adapter": "files",
    "lineage_hash": "files", "base_transforms": "files",
    "load_adapter": "peft_format", "save_adapter": "peft_format", "merge_to_checkpoint": "peft_format",
    "METHODS": "methods", "adapters_disabled": "switch",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
