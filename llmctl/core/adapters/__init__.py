"""Parameter-efficient adapters: LoRA / rsLoRA / DoRA (`lora.py`) in PEFT's file format (`peft_format.py`).

    from llmctl.core.adapters import LoRA, merge_adapter, save_adapter
    model, cfg = load_model(base, transforms=[LoRA(r=8, target_modules=["q_proj", "v_proj"])])
    save_adapter(model, "out", base=base)       # adapter_config.json + adapter_model.safetensors
    model, cfg = load_model("out")              # an adapter directory loads with its base
    merge_adapter(model)                        # deltas folded into the base weights
"""

from llmctl.core.adapters.lora import LoRA, lora_modules, mark_trainable, merge_adapter
from llmctl.core.adapters.peft_format import base_path, is_adapter, load_adapter, save_adapter

__all__ = ["LoRA", "base_path", "is_adapter", "load_adapter", "lora_modules", "mark_trainable", "merge_adapter",
           "save_adapter"]
