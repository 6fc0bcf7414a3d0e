"""ModelConfig: every architectural choice of the transformer, as one flat dataclass.

Strategy fields (`position`, rope_scaling's type, `norm`, `norm_placement`, `mlp`,
`activation`, `attention_kernel`) name entries of the registries in position.py, norm.py,
mlp.py and attention.py; they are checked when the model is built, so this module stays
importable without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmctl.errors import ConfigError

# Training and run-time knobs: never part of an architecture's identity.
CONTEXT_FIELDS = ("max_seq_len", "rope_scaling")  # a rotary model's context, set at finetune time
RUNTIME_FIELDS = frozenset(
    {
        "attention_kernel",
        "embedding_dropout",
        "attention_dropout",
        "residual_dropout",
        "gradient_checkpointing",
        "initializer_range",
        "mtp_loss_weight",
        "router_aux_loss_coef",
        "hf_model_type",
    }
)

# per-layer size lists -> the field each one replaces in `ModelConfig.layer(i)`
PER_LAYER = {"layer_num_heads": "num_heads", "layer_num_kv_heads": "num_kv_heads",
             "layer_intermediate_sizes": "intermediate_size", "layer_sliding_windows": "sliding_window"}
NULLABLE_PER_LAYER = {"layer_sliding_windows"}  # None: that layer attends to every earlier token


@dataclass
class ModelConfig:
    """The shape and strategies of a `Transformer`; `None` sizes are derived in __post_init__."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None → num_heads (MHA); 1 → MQA; else GQA
    head_dim: int | None = None  # None → hidden_size // num_heads
    intermediate_size: int | None = None  # None → 4 * hidden_size
    max_seq_len: int = 256
    is_causal: bool = True  # False: encoder-only, bidirectional, with an MLM transform head

    # positions: 'rope', 'learned', 'sinusoidal', 'alibi', 'nope'
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": linear|dynamic|yarn|llama3, "factor": …}
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_dim * this) dims of each head (GPT-NeoX, Phi)

    # norms: 'rmsnorm', 'layernorm', 'gemma_rmsnorm' (x * (1 + w)); placement 'pre', 'post' or 'sandwich'
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_placement: str = "pre"
    # how a block joins its sublayers (norm.py's RESIDUALS): 'sequential'; 'parallel', x + attn(ln1(x)) +
    # mlp(ln2(x)) (GPT-NeoX); 'parallel_shared', one norm for both (Phi-2)
    residual: str = "sequential"
    qk_norm: bool = False
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)

    # feed-forward: 'swiglu', 'geglu', 'reglu', 'gelu', 'relu', 'silu'; activation overrides
    # the nonlinearity ('silu', 'gelu', 'gelu_tanh', 'relu', 'relu2')
    mlp: str = "swiglu"
    activation: str | None = None

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    type_vocab_size: int = 0  # token-type (segment) embeddings (BERT)
    num_labels: int | None = None  # a sequence classifier (reward model): lm_head gives this many scores
    sliding_window: int | None = None  # each query sees itself and window-1 earlier tokens
    attention_scale_dim: float | None = None  # scores scaled by this ** -0.5 (None: head_dim; Gemma 2's
    # query_pre_attn_scalar)
    attention_softcap: float | None = None  # scores = cap * tanh(scores / cap) before the mask (Gemma 2; eager kernel)
    logit_softcap: float | None = None  # an LM's logits = cap * tanh(logits / cap) (Gemma 2)
    local_rope_theta: float | None = None  # the sliding-window layers' RoPE: this theta, unscaled (Gemma 3)

    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0

    # mixture of experts (num_experts > 0 replaces every MLP by a routed MoE layer)
    num_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int | None = None  # None → intermediate_size
    moe_normalize_topk: bool = True  # renormalize the top-k routing weights (Mixtral)
    router_aux_loss_coef: float = 0.01
    shared_expert_intermediate_size: int = 0  # > 0: an always-on, sigmoid-gated expert (Qwen2-MoE)

    num_mtp_heads: int = 0  # extra heads predicting tokens t+2 … t+1+n (training aid)
    mtp_loss_weight: float = 0.3
    gradient_checkpointing: bool = False
    attention_kernel: str = "sdpa"  # 'sdpa' or 'eager'; plugins may register more
    initializer_range: float = 0.02

    # per-layer sizes after structured pruning (None: every layer has the sizes above)
    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    # per-layer sliding windows, None for a full-attention layer (Gemma 2 alternates); sliding_window stays None
    layer_sliding_windows: list[int | None] | None = None

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # the Hugging Face model_type to save as when several express this config (a Phi-3 computes
    # as a Llama, with fused tensors); None: the first that does (`core/hf.py`)
    hf_model_type: str | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_kv_heads", "head_dim",
                    "intermediate_size"):
            if getattr(self, key) is not None and not 0 < getattr(self, key) < 1 << 31:
                raise ConfigError(f"{key} must be in 1 … 2^31, got {getattr(self, key)}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_experts and self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"experts_per_token {self.experts_per_token} must be in 1..num_experts {self.num_experts}"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.position == "rope" and self.partial_rotary_factor == 1 and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.position == "rope" and (self.rotary_dim % 2 or not self.rotary_dim):
            raise ConfigError(f"rope needs an even number of rotary dims, got {self.rotary_dim} (head_dim "
                              f"{self.head_dim} × partial_rotary_factor {self.partial_rotary_factor})")
        if self.residual != "sequential" and self.norm_placement != "pre":
            raise ConfigError(f"residual {self.residual!r} needs norm_placement 'pre'")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.layer_sliding_windows is not None and self.sliding_window is not None:
            raise ConfigError("layer_sliding_windows gives every layer's window: leave sliding_window unset (null)")
        if self.local_rope_theta is not None and self.position != "rope":
            raise ConfigError(f"local_rope_theta needs position 'rope', got {self.position!r}")
        for key in ("attention_scale_dim", "attention_softcap", "logit_softcap", "local_rope_theta"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0 (or null), got {getattr(self, key)}")
        if self.num_labels is not None and (self.num_labels < 1 or self.tie_embeddings):
            raise ConfigError(f"num_labels {self.num_labels}: a classifier needs num_labels >= 1 and its own score "
                              "head (tie_embeddings false)")
        if not self.is_causal and self.num_mtp_heads:
            raise ConfigError("multi-token-prediction heads need a causal model")
        for key in PER_LAYER:
            sizes = getattr(self, key)
            valid = (n is None and key in NULLABLE_PER_LAYER or n is not None and 0 < n < 1 << 31 for n in sizes or ())
            if sizes is not None and (len(sizes) != self.num_layers or not all(valid)):
                raise ConfigError(f"{key} must hold {self.num_layers} sizes (one per layer) in 1 … 2^31, got {sizes}")
        if self.layer_sliding_windows is not None and len(set(self.layer_sliding_windows)) == 1:  # one for all
            self.sliding_window, self.layer_sliding_windows = self.layer_sliding_windows[0], None
        if self.layer_num_heads is not None or self.layer_num_kv_heads is not None:  # uniform: checked above
            for heads, kv in zip(self.layer_num_heads or [self.num_heads] * self.num_layers,
                                 self.layer_num_kv_heads or [self.num_kv_heads] * self.num_layers):
                if heads % kv:
                    raise ConfigError(f"a layer's {heads} heads are not a multiple of its {kv} kv heads")

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (all of them unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def local_rope(self) -> ModelConfig:
        """The config the sliding-window layers' RoPE computes with when `local_rope_theta` is set."""
        return dataclasses.replace(self, rope_theta=self.local_rope_theta, rope_scaling=None, local_rope_theta=None)

    def layer(self, i: int) -> ModelConfig:
        """The config of block `i`: its own head counts, MLP width and window when they are per-layer."""
        if not any(getattr(self, key) is not None for key in PER_LAYER):
            return self
        own = {field: getattr(self, key)[i] for key, field in PER_LAYER.items() if getattr(self, key) is not None}
        return dataclasses.replace(self, **own, **dict.fromkeys(PER_LAYER))

    def weights_architecture(self) -> dict[str, Any]:
        """`architecture()` less a rotary model's context (`CONTEXT_FIELDS`): the same weights
        serve a longer or rescaled context (long-context finetuning)."""
        skip = CONTEXT_FIELDS if self.position == "rope" else ()
        return {k: v for k, v in self.architecture().items() if k not in skip}

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are a ConfigError with a suggestion."""
        from llmctl.config import build

        return build(cls, dict(data))

    def architecture(self) -> dict[str, Any]:
        """The fields that define the computation (no training-only knobs)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

