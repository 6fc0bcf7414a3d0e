"""The prune recipe: every key `llmctl prune` accepts (presets in `configs/prune/`, `key=value`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# every projection of the blocks: not embeddings, not the head, not a mixture-of-experts router
# (`mlp.gate`, Qwen2-MoE's `mlp.shared_expert_gate`: a few weights that decide every token's experts)
BLOCK_LINEARS = r"model\.layers\.\d+\.(?!mlp\.(?:shared_expert_)?gate$).*"


@dataclass
class PruneConfig:
    method: str = "magnitude"  # a registered pruner: magnitude, wanda, sparsegpt, heads, channels, layers
    sparsity: float | None = None  # fraction of weights (unstructured), heads, channels or layers removed (0.5)
    pattern: str | None = None  # N:M semi-structured sparsity, e.g. "2:4" (sets the sparsity: 2:4 removes 0.5)
    scope: Literal["layer", "global"] = "layer"  # magnitude: one threshold per module or one for all

    # which Linear modules unstructured methods prune (PEFT's target_modules rules)
    target_modules: str | list[str] = BLOCK_LINEARS
    exclude_modules: str | list[str] | None = None

    # structured methods
    unit: Literal["groups", "queries"] = "groups"  # heads: whole KV groups, or query heads within each group
    uniform: bool = True  # the same count in every layer (Hugging Face format); false: ranked across layers

    # calibration (wanda, sparsegpt, structured) and evaluation
    calibration: list[str] = field(default_factory=list)  # text files / dirs / globs
    samples: int = 64  # calibration windows
    seq_len: int = 256  # tokens per window (at most the model's context)
    eval_data: list[str] = field(default_factory=list)  # held-out text: perplexity before and after

    # SparseGPT's solver
    block_size: int = 128
    damp: float = 0.01
    seed: int = 0
