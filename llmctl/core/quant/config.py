"""`QuantizeConfig`: what `llmctl quantize` runs, from its options, a preset under
`configs/quantize/` and `key=value` overrides (`gptq.damp=0.05`, `awq.grid=10`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GPTQConfig:
    damp: float = 0.01            # λ = damp × mean(diag H)
    act_order: bool = False       # columns by decreasing Hessian diagonal (static groups)
    true_sequential: bool = True  # quantize a block's linears in execution order, re-running it between
    block_size: int = 128         # columns per lazy update
    keep_zeros: bool = True       # a pruned model's zero weights stay zero (its 2:4 pattern too)


@dataclass
class AWQConfig:
    grid: int = 20             # scale exponents α ∈ {0, 1/grid, …}: s = mean|x|^α / mean|w|^(1−α)
    duo_scaling: bool = True   # False: s = mean|x|^α
    identity: bool = False     # also try s = 1 (no scaling), as llm-compressor does (raised the KL here: BENCHMARKS)
    clip: bool = True          # search each group's clipping range too
    clip_grid: int = 20        # shrink steps of the clipping search
    max_shrink: float = 0.5    # the clipping range shrinks to at most this fraction
    clip_tokens: int = 512     # input rows the clipping search uses


@dataclass
class QuantizeConfig:
    method: str = "int8"
    bits: int = 8
    group_size: int | None = None  # None: per output channel
    symmetric: bool = True
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # linears kept in floating point
    samples: int = 128             # calibration windows (gptq, awq)
    seq_len: int = 512             # tokens per window
    micro_batch: int = 4           # windows per forward pass while calibrating (peak memory)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
