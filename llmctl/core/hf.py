"""Checkpoint formats: config.json <-> ModelConfig and weight names, per Hugging Face architecture.

`core/model/io.py` loads and saves models through `read_tensors` and `to_checkpoint`.

Each supported architecture is one declarative `Arch`: config codecs (HF keys <-> ModelConfig
fields, plus the fields the architecture fixes) and a weight table of `Rule`s (HF tensor <->
our parameter names, with `{i}` for the layer and `{e}` for the expert; `transpose` for GPT-2's
Conv1D, several of ours for a fused HF tensor). A transformed module's own tensors
(`qweight`, `weight_scale`, `lora_A.weight`, …) keep their suffix under the module's mapped
path. Saving picks the first architecture whose config round trip reproduces the model's
config exactly and whose names hold every tensor (the model's transforms are recorded, see
`core/model/transforms.py`); anything else is written as
`model_type: "llmctl"` with the full ModelConfig and our own parameter names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from itertools import product
from typing import Any, Callable

import torch

from llmctl.core.checkpoint import check_tensors
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.model.build import build_model
from llmctl.core.model.mlp import MLPS
from llmctl.core.model.position import ROPE_SCALINGS
from llmctl.errors import CheckpointError, ConfigError

LLMCTL_TYPE = "llmctl"

# ---------------------------------------------------------------------------------------- config codecs


@dataclass(frozen=True)
class Codec:
    """One piece of config translation: HF dict -> ModelConfig fields, ModelConfig -> HF keys."""

    to_ours: Callable[[dict], dict]
    to_hf: Callable[[ModelConfig], dict]


def rename(ours: str, theirs: str, default: Any = None) -> Codec:
    """A field stored under another name; `default` when config.json omits it."""
    return Codec(lambda hf: {ours: hf.get(theirs, default)}, lambda cfg: {theirs: getattr(cfg, ours)})


def same(*names: str, default: Any = None) -> tuple[Codec, ...]:
    return tuple(rename(n, n, default) for n in names)


def fixed(**values: Any) -> Codec:
    """ModelConfig values the architecture implies (not stored in config.json)."""
    return Codec(lambda hf: dict(values), lambda cfg: {})


def constant(key: str, value: Any) -> Codec:
    """An HF key we only support at one value; another value is an unsupported checkpoint."""

    def check(hf: dict) -> dict:
        if hf.get(key, value) != value:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported (only {value!r})")
        return {}

    return Codec(check, lambda cfg: {key: value})


def both_biases(theirs: str = "attention_bias", mlp: bool = False, default: bool = False) -> Codec:
    """One HF flag for the q/k/v and o projection biases (and the MLP's, when `mlp`)."""
    fields = ("qkv_bias", "o_bias", "mlp_bias") if mlp else ("qkv_bias", "o_bias")

    def to_hf(cfg: ModelConfig) -> dict:
        # a mismatch (qkv_bias != o_bias) fails the round trip, so this arch is not chosen
        return {theirs: cfg.qkv_bias}

    return Codec(lambda hf: dict.fromkeys(fields, bool(hf.get(theirs, default))), to_hf)


_FROM_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_TO_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}
_PLAIN = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu", "relu": "relu"}


def activation(key: str, default: str, gated: bool, tanh_name: str = "gelu_pytorch_tanh",
               legacy: tuple[str, ...] = (), gelu_means_tanh: bool = False) -> Codec:
    """HF's activation name <-> our (mlp, activation) pair for a gated or a plain MLP.

    `legacy` keys are read first when set; `gelu_means_tanh` follows transformers in reading
    an old Gemma "gelu" as the tanh approximation.
    """
    blocks = _GATED if gated else _PLAIN

    def to_ours(hf: dict) -> dict:
        name = next((hf[k] for k in (*legacy, key) if hf.get(k)), default)
        if name not in _FROM_HF_ACT:
            raise CheckpointError(f"config.json: {key}={name!r} is not supported ({', '.join(_FROM_HF_ACT)})")
        act = "gelu_tanh" if gelu_means_tanh and name == "gelu" else _FROM_HF_ACT[name]
        mlp = blocks[act]
        return {"mlp": mlp, "activation": None if act == MLPS.get(mlp).default_activation else act}

    def to_hf(cfg: ModelConfig) -> dict:
        act = cfg.activation or MLPS.get(cfg.mlp).default_activation
        name = tanh_name if act == "gelu_tanh" else _TO_HF_ACT.get(act, act)
        return {key: name}

    return Codec(to_ours, to_hf)


def rope(default_theta: float = 10000.0, kinds: tuple[str, ...] | None = None, partial: float | None = None,
         legacy: tuple[str, str] | None = None) -> Codec:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older) <-> ours; a scaling
    type outside `kinds` (default: every one llmctl implements) is an unsupported checkpoint.
    `partial`: the architecture rotates part of each head, by default this `partial_rotary_factor`
    (elsewhere a factor other than 1 is refused); `legacy`: older names of the theta and the
    factor (GPT-NeoX's rotary_emb_base, rotary_pct), read before the top-level new ones as
    transformers does, and written."""
    old_theta, old_factor = legacy or ("rope_theta", "partial_rotary_factor")

    def to_ours(hf: dict) -> dict:
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        params = dict(hf.get(key) or {})
        theta = params.pop("rope_theta", hf.get(old_theta, hf.get("rope_theta", default_theta)))
        kind = params.pop("rope_type", params.pop("type", "default"))
        allowed = kinds or ROPE_SCALINGS.names()
        if kind not in allowed:
            raise CheckpointError(f"config.json: {key} type {kind!r} is not supported ({', '.join(allowed)})")
        factor = params.pop("partial_rotary_factor", hf.get(old_factor, hf.get("partial_rotary_factor", partial)))
        if partial is None and factor not in (None, 1.0):
            raise CheckpointError("config.json: partial_rotary_factor is not supported")
        scaling = None if kind == "default" else {"rope_type": kind, **params}
        return {"rope_theta": float(theta), "rope_scaling": scaling,
                "partial_rotary_factor": float(1.0 if factor is None else factor)}

    def to_hf(cfg: ModelConfig) -> dict:
        params = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
        if partial is None:
            return {"rope_theta": cfg.rope_theta, "rope_parameters": params}
        factor = cfg.partial_rotary_factor
        return {old_theta: cfg.rope_theta, old_factor: factor,
                "rope_parameters": {**params, "partial_rotary_factor": factor}}

    return Codec(to_ours, to_hf)


def qwen_window() -> Codec:
    """Qwen's use_sliding_window / max_window_layers / layer_types; all layers or none."""

    def to_ours(hf: dict) -> dict:
        n = hf.get("num_hidden_layers")
        types = hf.get("layer_types")
        if types is None:
            # transformers' default: the layers from 28 on slide
            start = hf.get("max_window_layers", 28) if hf.get("use_sliding_window") else n
            types = ["full_attention"] * min(start, n) + ["sliding_attention"] * max(n - start, 0)
        sliding = {t == "sliding_attention" for t in types}
        if len(sliding) > 1:
            raise CheckpointError("config.json: sliding window on only some layers is not supported")
        return {"sliding_window": hf.get("sliding_window") if sliding == {True} else None}

    def to_hf(cfg: ModelConfig) -> dict:
        on = cfg.sliding_window is not None
        return {
            "use_sliding_window": on,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if on else cfg.num_layers,
            "layer_types": ["sliding_attention" if on else "full_attention"] * cfg.num_layers,
        }

    return Codec(to_ours, to_hf)


def layer_windows(default: int | None, slides: Callable[[dict, int], bool]) -> Codec:
    """sliding_window + layer_types (Gemma 2, 3) <-> a window per layer, or one for all when every
    layer agrees; without layer_types, layer i slides where `slides(hf, i)` (transformers' default)."""

    def to_ours(hf: dict) -> dict:
        n = hf.get("num_hidden_layers")
        types = hf.get("layer_types") or ["sliding_attention" if slides(hf, i) else "full_attention" for i in range(n)]
        if not set(types) <= {"sliding_attention", "full_attention"}:
            raise CheckpointError(f"config.json: layer_types {sorted(set(types))} are not supported "
                                  "(sliding_attention, full_attention)")
        window = hf.get("sliding_window", default)
        windows = [window if t == "sliding_attention" else None for t in types]
        if len(set(windows)) == 1:
            return {"sliding_window": windows[0], "layer_sliding_windows": None}
        return {"sliding_window": None, "layer_sliding_windows": windows}

    def to_hf(cfg: ModelConfig) -> dict:
        windows = cfg.layer_sliding_windows or [cfg.sliding_window] * cfg.num_layers
        # several window sizes: the largest, which fails the round trip, so this arch is not chosen
        window = max((w for w in windows if w is not None), default=None)
        return {"sliding_window": window,
                "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows]}

    return Codec(to_ours, to_hf)


def attention_scale(default: int) -> Codec:
    """query_pre_attn_scalar (Gemma 2): the scores' scale is its -0.5th power; ours is None at head_dim."""

    def to_ours(hf: dict) -> dict:
        scalar = hf.get("query_pre_attn_scalar", default)
        return {"attention_scale_dim": None if scalar == hf.get("head_dim", default) else scalar}

    def to_hf(cfg: ModelConfig) -> dict:
        scalar = cfg.attention_scale_dim or cfg.head_dim
        return {"query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar}  # an int in HF

    return Codec(to_ours, to_hf)


def local_rope(theta: float = 1e6, local_theta: float = 1e4) -> Codec:
    """Gemma 3's RoPE per layer type: rope_parameters {"full_attention": …, "sliding_attention": …}
    (transformers 5) or rope_theta + rope_scaling + rope_local_base_freq (older) <-> ours, the
    sliding layers' as `local_rope_theta` (None when it is the full layers' own, unscaled)."""
    full_rope = rope(theta)

    def to_ours(hf: dict) -> dict:
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            full, local = params.get("full_attention") or {}, dict(params.get("sliding_attention") or {})
        else:
            full = {"rope_theta": hf.get("rope_theta", theta), **(params or hf.get("rope_scaling") or {})}
            local = {"rope_theta": hf.get("rope_local_base_freq", local_theta)}
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default" or set(local) - {"rope_type", "type", "rope_theta"}:
            raise CheckpointError(f"config.json: the sliding layers' rope_parameters {local} are not supported "
                                  "(only rope_theta)")
        ours = full_rope.to_ours({"rope_parameters": full})
        local_theta_ = float(local.get("rope_theta", local_theta))
        same = local_theta_ == ours["rope_theta"] and ours["rope_scaling"] is None
        return {**ours, "local_rope_theta": None if same else local_theta_}

    def to_hf(cfg: ModelConfig) -> dict:
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        return {"rope_parameters": {"full_attention": full_rope.to_hf(cfg)["rope_parameters"],
                                    "sliding_attention": local}}

    return Codec(to_ours, to_hf)


def refused(key: str, what: str) -> Codec:
    """An HF key llmctl cannot express when it is set (truthy): an unsupported checkpoint."""

    def check(hf: dict) -> dict:
        if hf.get(key):
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported ({what})")
        return {}

    return Codec(check, lambda cfg: {})


TOKEN_IDS = same("bos_token_id", "eos_token_id", "pad_token_id")


def classifier() -> Codec:
    """`num_labels`: a *ForSequenceClassification checkpoint (its `score` is our `lm_head`, never tied:
    transformers ties no score to the embeddings, whatever `tie_word_embeddings` says)."""
    def to_ours(hf: dict) -> dict:
        n = _labels(hf)
        return {"num_labels": n} if n is None else {"num_labels": n, "tie_embeddings": False}

    def _labels(hf: dict) -> int | None:
        archs = hf.get("architectures")
        if archs is not None and not any(str(a).endswith(CLASSIFIER) for a in archs):
            return None
        if hf.get("num_labels") is not None:  # transformers: it wins over an `id2label` of another length
            return hf["num_labels"]
        labels = hf.get("id2label")
        if not archs and labels and {str(k): v for k, v in labels.items()} == DEFAULT_LABELS:
            return None  # every config's `to_dict()` has these, a causal LM's too: no class, no say
        if labels:
            return len(labels)
        # a classifier saved with the default two labels carries neither key (transformers' diff dict)
        return 2 if archs else None

    def to_hf(cfg: ModelConfig) -> dict:
        n = cfg.num_labels
        return {"num_labels": n, "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
                "label2id": {f"LABEL_{i}": i for i in range(n)}} if n else {}

    return Codec(to_ours, to_hf)


CLASSIFIER = "ForSequenceClassification"
DEFAULT_LABELS = {"0": "LABEL_0", "1": "LABEL_1"}  # transformers' PretrainedConfig default


def decoder(tie: bool = False, eps: float = 1e-6, theta: float = 10000.0, context: int = 2048,
            eps_key: str = "rms_norm_eps", norm: str = "rmsnorm", rope_kinds: tuple[str, ...] | None = None,
            rope_partial: float | None = None) -> tuple[Codec, ...]:
    """The config keys shared by the Llama family (and the pre-norm RoPE decoders like it)."""
    return (
        *same("vocab_size", "hidden_size", "intermediate_size", "head_dim"),
        rename("num_layers", "num_hidden_layers"),
        rename("num_heads", "num_attention_heads"),
        rename("num_kv_heads", "num_key_value_heads"),
        rename("max_seq_len", "max_position_embeddings", context),
        rename("norm_eps", eps_key, eps),
        rename("tie_embeddings", "tie_word_embeddings", tie),
        rename("attention_dropout", "attention_dropout", 0.0),
        rename("initializer_range", "initializer_range", 0.02),
        rope(theta, rope_kinds, rope_partial),
        *TOKEN_IDS,
        classifier(),
        fixed(position="rope", norm=norm, norm_placement="pre", is_causal=True),
    )


# ---------------------------------------------------------------------------------------- weight tables


@dataclass(frozen=True)
class Rule:
    """HF tensor `theirs` <-> our parameters `ours` (concatenated along dim 0 when several)."""

    theirs: str
    ours: tuple[str, ...]
    transpose: bool = False  # HF Conv1D stores [in, out]
    per_head: bool = False  # the fused rows go head by head, [heads, len(ours), head_dim] (GPT-NeoX)


def rule(theirs: str, *ours: str, transpose: bool = False, per_head: bool = False) -> Rule:
    return Rule(theirs, ours, transpose, per_head)


def linear(theirs: str, ours: str, transpose: bool = False) -> tuple[Rule, ...]:
    """weight and (when the model has one) bias of a projection."""
    return rule(f"{theirs}.weight", f"{ours}.weight", transpose=transpose), rule(f"{theirs}.bias", f"{ours}.bias")


L = "model.layers.{i}"
LLAMA_NORMS = (
    rule(f"{L}.input_layernorm.weight", f"{L}.input_layernorm.weight"),
    rule(f"{L}.post_attention_layernorm.weight", f"{L}.post_attention_layernorm.weight"),
)
LLAMA_ATTENTION = (
    *linear(f"{L}.self_attn.q_proj", f"{L}.self_attn.q_proj"),
    *linear(f"{L}.self_attn.k_proj", f"{L}.self_attn.k_proj"),
    *linear(f"{L}.self_attn.v_proj", f"{L}.self_attn.v_proj"),
    *linear(f"{L}.self_attn.o_proj", f"{L}.self_attn.o_proj"),
    rule(f"{L}.self_attn.q_norm.weight", f"{L}.self_attn.q_norm.weight"),
    rule(f"{L}.self_attn.k_norm.weight", f"{L}.self_attn.k_norm.weight"),
    *LLAMA_NORMS,
)
LLAMA_OUTER = (
    rule("model.embed_tokens.weight", "model.embed_tokens.weight"),
    rule("model.norm.weight", "model.norm.weight"),
    rule("lm_head.weight", "lm_head.weight"),
)
LLAMA_MLP = tuple(r for p in ("gate_proj", "up_proj", "down_proj") for r in linear(f"{L}.mlp.{p}", f"{L}.mlp.{p}"))
LLAMA = LLAMA_OUTER + LLAMA_ATTENTION + LLAMA_MLP
MIXTRAL = LLAMA_OUTER + LLAMA_ATTENTION + (
    rule(f"{L}.block_sparse_moe.gate.weight", f"{L}.mlp.gate.weight"),
    rule(f"{L}.block_sparse_moe.experts.{{e}}.w1.weight", f"{L}.mlp.experts.{{e}}.gate_proj.weight"),
    rule(f"{L}.block_sparse_moe.experts.{{e}}.w3.weight", f"{L}.mlp.experts.{{e}}.up_proj.weight"),
    rule(f"{L}.block_sparse_moe.experts.{{e}}.w2.weight", f"{L}.mlp.experts.{{e}}.down_proj.weight"),
)
QWEN_MOE = LLAMA_OUTER + LLAMA_ATTENTION + (
    rule(f"{L}.mlp.gate.weight", f"{L}.mlp.gate.weight"),
    *(rule(f"{L}.mlp.experts.{{e}}.{p}.weight", f"{L}.mlp.experts.{{e}}.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")),
)
QWEN2_MOE = QWEN_MOE + (
    *(rule(f"{L}.mlp.shared_expert.{p}.weight", f"{L}.mlp.shared_expert.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")),
    rule(f"{L}.mlp.shared_expert_gate.weight", f"{L}.mlp.shared_expert_gate.weight"),
)
PHI3 = LLAMA_OUTER + LLAMA_NORMS + (  # q, k, v rows and gate, up rows fused, in that order
    rule(f"{L}.self_attn.qkv_proj.weight", *(f"{L}.self_attn.{p}_proj.weight" for p in "qkv")),
    rule(f"{L}.self_attn.o_proj.weight", f"{L}.self_attn.o_proj.weight"),
    rule(f"{L}.mlp.gate_up_proj.weight", f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"),
    rule(f"{L}.mlp.down_proj.weight", f"{L}.mlp.down_proj.weight"),
)
STARCODER2 = LLAMA_OUTER + LLAMA_ATTENTION + (
    *(rule(f"{n}.bias", f"{n}.bias") for n in (f"{L}.input_layernorm", f"{L}.post_attention_layernorm", "model.norm")),
    *linear(f"{L}.mlp.c_fc", f"{L}.mlp.up_proj"),
    *linear(f"{L}.mlp.c_proj", f"{L}.mlp.down_proj"),
)
N = "gpt_neox.layers.{i}"
GPT_NEOX = (
    rule("gpt_neox.embed_in.weight", "model.embed_tokens.weight"),
    *linear(f"{N}.input_layernorm", f"{L}.input_layernorm"),
    *linear(f"{N}.post_attention_layernorm", f"{L}.post_attention_layernorm"),
    *(rule(f"{N}.attention.query_key_value.{w}", *(f"{L}.self_attn.{p}_proj.{w}" for p in "qkv"), per_head=True)
      for w in ("weight", "bias")),
    *linear(f"{N}.attention.dense", f"{L}.self_attn.o_proj"),
    *linear(f"{N}.mlp.dense_h_to_4h", f"{L}.mlp.up_proj"),
    *linear(f"{N}.mlp.dense_4h_to_h", f"{L}.mlp.down_proj"),
    *linear("gpt_neox.final_layer_norm", "model.norm"),
    rule("embed_out.weight", "lm_head.weight"),
)
PHI = (
    rule("model.embed_tokens.weight", "model.embed_tokens.weight"),
    *linear(f"{L}.input_layernorm", f"{L}.input_layernorm"),
    *(r for p in "qkv" for r in linear(f"{L}.self_attn.{p}_proj", f"{L}.self_attn.{p}_proj")),
    *linear(f"{L}.self_attn.dense", f"{L}.self_attn.o_proj"),
    *linear(f"{L}.self_attn.q_layernorm", f"{L}.self_attn.q_norm"),
    *linear(f"{L}.self_attn.k_layernorm", f"{L}.self_attn.k_norm"),
    *linear(f"{L}.mlp.fc1", f"{L}.mlp.up_proj"),
    *linear(f"{L}.mlp.fc2", f"{L}.mlp.down_proj"),
    *linear("model.final_layernorm", "model.norm"),
    *linear("lm_head", "lm_head"),
)
GEMMA2 = LLAMA_OUTER + tuple(r for r in LLAMA_ATTENTION if r not in LLAMA_NORMS) + LLAMA_MLP + (
    rule(f"{L}.input_layernorm.weight", f"{L}.input_layernorm.weight"),  # sandwich norms: HF's names, then ours
    rule(f"{L}.post_attention_layernorm.weight", f"{L}.attn_out_norm.weight"),
    rule(f"{L}.pre_feedforward_layernorm.weight", f"{L}.post_attention_layernorm.weight"),
    rule(f"{L}.post_feedforward_layernorm.weight", f"{L}.mlp_out_norm.weight"),
)
H = "transformer.h.{i}"
GPT2 = (
    rule("transformer.wte.weight", "model.embed_tokens.weight"),
    rule("transformer.wpe.weight", "model.embed_positions.weight"),
    *linear(f"{H}.ln_1", f"{L}.input_layernorm"),
    *linear(f"{H}.ln_2", f"{L}.post_attention_layernorm"),
    rule(f"{H}.attn.c_attn.weight", *(f"{L}.self_attn.{p}_proj.weight" for p in "qkv"), transpose=True),
    rule(f"{H}.attn.c_attn.bias", *(f"{L}.self_attn.{p}_proj.bias" for p in "qkv")),
    *linear(f"{H}.attn.c_proj", f"{L}.self_attn.o_proj", transpose=True),
    *linear(f"{H}.mlp.c_fc", f"{L}.mlp.up_proj", transpose=True),
    *linear(f"{H}.mlp.c_proj", f"{L}.mlp.down_proj", transpose=True),
    *linear("transformer.ln_f", "model.norm"),
    rule("lm_head.weight", "lm_head.weight"),
)
B = "bert.encoder.layer.{i}"
BERT = (
    rule("bert.embeddings.word_embeddings.weight", "model.embed_tokens.weight"),
    rule("bert.embeddings.position_embeddings.weight", "model.embed_positions.weight"),
    rule("bert.embeddings.token_type_embeddings.weight", "model.embed_types.weight"),
    *linear("bert.embeddings.LayerNorm", "model.embed_norm"),
    *linear(f"{B}.attention.self.query", f"{L}.self_attn.q_proj"),
    *linear(f"{B}.attention.self.key", f"{L}.self_attn.k_proj"),
    *linear(f"{B}.attention.self.value", f"{L}.self_attn.v_proj"),
    *linear(f"{B}.attention.output.dense", f"{L}.self_attn.o_proj"),
    *linear(f"{B}.attention.output.LayerNorm", f"{L}.input_layernorm"),
    *linear(f"{B}.intermediate.dense", f"{L}.mlp.up_proj"),
    *linear(f"{B}.output.dense", f"{L}.mlp.down_proj"),
    *linear(f"{B}.output.LayerNorm", f"{L}.post_attention_layernorm"),
    *linear("cls.predictions.transform.dense", "mlm_transform.dense"),
    *linear("cls.predictions.transform.LayerNorm", "mlm_transform.norm"),
    rule("cls.predictions.decoder.weight", "lm_head.weight"),
    rule("cls.predictions.bias", "lm_head.bias"),
)


# ---------------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """A transformers architecture: its config codecs and weight table."""

    model_type: str
    architecture: str  # the transformers class written to "architectures"
    config: tuple[Codec, ...]
    weights: tuple[Rule, ...]
    ignore: str = r"$^"  # regex of HF tensors that carry no weights (buffers, unused heads)
    prefix: str = ""  # old checkpoints may omit this prefix on the base model's tensors


NO_BIAS = fixed(qkv_bias=False, o_bias=False, mlp_bias=False)
NO_WINDOW = fixed(sliding_window=None)
MOE = (Codec(lambda hf: {"num_experts": hf.get("num_experts", hf.get("num_local_experts"))},  # v4 / v5 name
             lambda cfg: {"num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts}),
       rename("experts_per_token", "num_experts_per_tok", 2),
       rename("router_aux_loss_coef", "router_aux_loss_coef", 0.001))
QWEN_MOE_KEYS = (*MOE, rename("moe_intermediate_size", "moe_intermediate_size"),
                 rename("moe_normalize_topk", "norm_topk_prob", False),
                 constant("decoder_sparse_step", 1), constant("mlp_only_layers", []))

ARCHES: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("llama", "LlamaForCausalLM", (
            *decoder(), both_biases(), rename("mlp_bias", "mlp_bias", False), NO_WINDOW,
            activation("hidden_act", "silu", gated=True), fixed(qk_norm=False),
        ), LLAMA),
        Arch("mistral", "MistralForCausalLM", (
            *decoder(), NO_BIAS, rename("sliding_window", "sliding_window", 4096),
            activation("hidden_act", "silu", gated=True), fixed(qk_norm=False),
        ), LLAMA),
        Arch("qwen2", "Qwen2ForCausalLM", (
            *decoder(), fixed(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False), qwen_window(),
            activation("hidden_act", "silu", gated=True),
        ), LLAMA),
        Arch("qwen3", "Qwen3ForCausalLM", (
            *decoder(), both_biases(), fixed(mlp_bias=False, qk_norm=True), qwen_window(),
            activation("hidden_act", "silu", gated=True),
        ), LLAMA),
        Arch("gemma", "GemmaForCausalLM", (
            *decoder(tie=True), both_biases(), NO_WINDOW, fixed(mlp_bias=False, qk_norm=False),
            activation("hidden_act", "gelu_pytorch_tanh", gated=True, legacy=("hidden_activation",),
                       gelu_means_tanh=True),
            fixed(norm="gemma_rmsnorm", scale_embeddings=True),
        ), LLAMA),
        Arch("gemma2", "Gemma2ForCausalLM", (
            *decoder(tie=True, context=8192), rename("head_dim", "head_dim", 256), both_biases(),
            fixed(mlp_bias=False, qk_norm=False, norm="gemma_rmsnorm", norm_placement="sandwich",
                  scale_embeddings=True),
            activation("hidden_activation", "gelu_pytorch_tanh", gated=True),
            layer_windows(4096, lambda hf, i: i % 2 == 0),  # layers 0, 2, 4, … slide
            attention_scale(default=256),
            rename("attention_softcap", "attn_logit_softcapping", 50.0),
            rename("logit_softcap", "final_logit_softcapping", 30.0),
            refused("use_bidirectional_attention", "bidirectional attention"),
        ), GEMMA2),
        Arch("gemma3_text", "Gemma3ForCausalLM", (  # Gemma 2 with q/k norms, 5 local : 1 global, local RoPE
            *decoder(tie=True, context=131072), rename("head_dim", "head_dim", 256), both_biases(), local_rope(),
            fixed(mlp_bias=False, qk_norm=True, norm="gemma_rmsnorm", norm_placement="sandwich",
                  scale_embeddings=True),
            activation("hidden_activation", "gelu_pytorch_tanh", gated=True),
            layer_windows(4096, lambda hf, i: bool((i + 1) % hf.get("sliding_window_pattern", 6))),
            attention_scale(default=256),
            rename("logit_softcap", "final_logit_softcapping"),
            fixed(attention_softcap=None),  # transformers' Gemma 3 keeps attn_logit_softcapping but never applies it
            refused("use_bidirectional_attention", "bidirectional attention"),
        ), GEMMA2),
        Arch("mixtral", "MixtralForCausalLM", (
            *decoder(eps=1e-5, theta=1e6), NO_BIAS, fixed(qk_norm=False, moe_normalize_topk=True),
            rename("sliding_window", "sliding_window"), activation("hidden_act", "silu", gated=True),
            rename("num_experts", "num_local_experts", 8), *MOE[1:],
            Codec(lambda hf: {"moe_intermediate_size": hf.get("intermediate_size")},
                  lambda cfg: {"intermediate_size": cfg.moe_intermediate_size}),
        ), MIXTRAL),
        Arch("qwen3_moe", "Qwen3MoeForCausalLM", (
            *decoder(), both_biases(), fixed(mlp_bias=False, qk_norm=True), qwen_window(),
            activation("hidden_act", "silu", gated=True), *QWEN_MOE_KEYS,
        ), QWEN_MOE),
        Arch("qwen2_moe", "Qwen2MoeForCausalLM", (
            *decoder(), fixed(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False), qwen_window(),
            activation("hidden_act", "silu", gated=True), *QWEN_MOE_KEYS,
            rename("shared_expert_intermediate_size", "shared_expert_intermediate_size"),
        ), QWEN2_MOE),
        Arch("phi3", "Phi3ForCausalLM", (  # a Llama with fused q/k/v and gate/up tensors
            *decoder(eps=1e-5, context=4096, rope_kinds=("default",), rope_partial=1.0), NO_BIAS, fixed(qk_norm=False),
            rename("sliding_window", "sliding_window"), activation("hidden_act", "silu", gated=True),
            rename("residual_dropout", "resid_pdrop", 0.0),  # its embd_pdrop is unused by transformers
        ), PHI3),
        Arch("starcoder2", "Starcoder2ForCausalLM", (
            *decoder(tie=True, eps=1e-5, context=4096, eps_key="norm_epsilon", norm="layernorm"),
            both_biases("use_bias", mlp=True, default=True), fixed(norm_bias=True, qk_norm=False),
            rename("initializer_range", "initializer_range", 0.018042),
            rename("sliding_window", "sliding_window"),
            activation("hidden_act", "gelu_pytorch_tanh", gated=False),
            *same("residual_dropout", "embedding_dropout", default=0.0),
        ), STARCODER2),
        Arch("gpt_neox", "GPTNeoXForCausalLM", (  # Pythia
            *same("vocab_size", "hidden_size", "intermediate_size"), rename("num_layers", "num_hidden_layers"),
            rename("num_heads", "num_attention_heads"), rename("max_seq_len", "max_position_embeddings", 2048),
            rename("norm_eps", "layer_norm_eps", 1e-5), rename("tie_embeddings", "tie_word_embeddings", False),
            *same("attention_dropout", default=0.0), rename("initializer_range", "initializer_range", 0.02),
            Codec(lambda hf: dict.fromkeys(("residual_dropout", "embedding_dropout"), hf.get("hidden_dropout", 0.0)),
                  lambda cfg: {"hidden_dropout": cfg.residual_dropout}),
            Codec(lambda hf: {"residual": "parallel" if hf.get("use_parallel_residual", True) else "sequential"},
                  lambda cfg: {"use_parallel_residual": cfg.residual == "parallel"}),
            rope(partial=0.25, legacy=("rotary_emb_base", "rotary_pct")), *TOKEN_IDS, classifier(),
            both_biases("attention_bias", default=True), activation("hidden_act", "gelu", gated=False),
            fixed(position="rope", norm="layernorm", norm_bias=True, norm_placement="pre", is_causal=True,
                  mlp_bias=True),
        ), GPT_NEOX, ignore=r".*\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)", prefix="gpt_neox."),
        Arch("phi", "PhiForCausalLM", (  # Phi-1, Phi-1.5, Phi-2
            *same("vocab_size", "hidden_size", "intermediate_size"), rename("num_layers", "num_hidden_layers"),
            rename("num_heads", "num_attention_heads"), rename("num_kv_heads", "num_key_value_heads"),
            rename("max_seq_len", "max_position_embeddings", 2048), rename("norm_eps", "layer_norm_eps", 1e-5),
            rename("tie_embeddings", "tie_word_embeddings", False), *same("attention_dropout", default=0.0),
            rename("initializer_range", "initializer_range", 0.02), rename("residual_dropout", "resid_pdrop", 0.0),
            rename("embedding_dropout", "embd_pdrop", 0.0), rename("qk_norm", "qk_layernorm", False),
            rope(partial=0.5), *TOKEN_IDS, classifier(),
            Codec(lambda hf: {"lm_head_bias": not classifier().to_ours(hf)["num_labels"]},  # a score has no bias
                  lambda cfg: {}),
            activation("hidden_act", "gelu_new", gated=False, tanh_name="gelu_new"),
            fixed(position="rope", norm="layernorm", norm_bias=True, norm_placement="pre", is_causal=True,
                  residual="parallel_shared", qkv_bias=True, o_bias=True, mlp_bias=True),
        ), PHI),
        Arch("gpt2", "GPT2LMHeadModel", (
            rename("vocab_size", "vocab_size"), rename("hidden_size", "n_embd"), rename("num_layers", "n_layer"),
            rename("num_heads", "n_head"), rename("max_seq_len", "n_positions", 1024),
            rename("intermediate_size", "n_inner"), rename("norm_eps", "layer_norm_epsilon", 1e-5),
            rename("tie_embeddings", "tie_word_embeddings", True), rename("residual_dropout", "resid_pdrop", 0.1),
            rename("embedding_dropout", "embd_pdrop", 0.1), rename("attention_dropout", "attn_pdrop", 0.1),
            rename("initializer_range", "initializer_range", 0.02), *TOKEN_IDS,
            activation("activation_function", "gelu_new", gated=False, tanh_name="gelu_new"),
            constant("scale_attn_weights", True), constant("scale_attn_by_inverse_layer_idx", False),
            constant("add_cross_attention", False),
            fixed(position="learned", norm="layernorm", norm_bias=True, norm_placement="pre", is_causal=True,
                  qkv_bias=True, o_bias=True, mlp_bias=True),
        ), GPT2, ignore=r".*\.attn\.(masked_)?bias$", prefix="transformer."),
        Arch("bert", "BertForMaskedLM", (
            rename("vocab_size", "vocab_size"), rename("hidden_size", "hidden_size"),
            rename("num_layers", "num_hidden_layers"), rename("num_heads", "num_attention_heads"),
            rename("intermediate_size", "intermediate_size"), rename("max_seq_len", "max_position_embeddings", 512),
            rename("type_vocab_size", "type_vocab_size", 2), rename("norm_eps", "layer_norm_eps", 1e-12),
            rename("tie_embeddings", "tie_word_embeddings", True),
            Codec(lambda hf: dict.fromkeys(("residual_dropout", "embedding_dropout"),
                                           hf.get("hidden_dropout_prob", 0.1)),
                  lambda cfg: {"hidden_dropout_prob": cfg.residual_dropout}),
            rename("attention_dropout", "attention_probs_dropout_prob", 0.1),
            rename("initializer_range", "initializer_range", 0.02), *TOKEN_IDS,
            activation("hidden_act", "gelu", gated=False),
            constant("is_decoder", False), constant("add_cross_attention", False),
            constant("position_embedding_type", "absolute"),
            fixed(is_causal=False, position="learned", norm="layernorm", norm_bias=True, norm_placement="post",
                  embedding_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True),
        ), BERT, ignore=r"bert\.embeddings\.position_ids|bert\.pooler\..*|cls\.seq_relationship\..*"
                        r"|cls\.predictions\.decoder\.bias", prefix="bert."),
    ]
}


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of an HF (or llmctl) config.json; CheckpointError if unsupported or malformed."""
    model_type = hf.get("model_type")
    arch = ARCHES.get(model_type) if isinstance(model_type, str) else None
    if arch is None and model_type != LLMCTL_TYPE:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported; supported: {LLMCTL_TYPE}, {', '.join(ARCHES)}"
        )
    try:
        if arch is None:
            return ModelConfig.from_dict({k: v for k, v in hf.items()
                                          if k not in ("model_type", "architectures", "dtype", "quantization_config")})
        cfg = _decode(arch, hf)
        # recorded only where saving would otherwise pick another type (a Phi-3 computes as a Llama)
        return cfg if arch_for(cfg) is arch else dataclasses.replace(cfg, hf_model_type=arch.model_type)
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as exc:
        raise CheckpointError(f"config.json: malformed ({exc})") from None


_NULLABLE = {"sliding_window", "rope_scaling", "activation", "bos_token_id", "eos_token_id", "pad_token_id"}


def _decode(arch: Arch, hf: dict) -> ModelConfig:
    fields: dict[str, Any] = {}
    for codec in arch.config:
        fields.update(codec.to_ours(hf))
    return ModelConfig.from_dict({k: v for k, v in fields.items() if v is not None or k in _NULLABLE})


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json for `cfg`: an HF architecture's keys when one expresses it, else llmctl's."""
    return _config_to(cfg, dtype, arch_for(cfg))


def _config_to(cfg: ModelConfig, dtype: torch.dtype | None, arch: Arch | None) -> dict:
    dtype_name = {"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}
    if arch is None:
        return {"model_type": LLMCTL_TYPE, "architectures": ["LlmctlTransformer"], **dtype_name, **cfg.to_dict()}
    name = arch.architecture.replace("ForCausalLM", CLASSIFIER) if cfg.num_labels else arch.architecture
    out: dict[str, Any] = {"architectures": [name], "model_type": arch.model_type, **dtype_name}
    for codec in arch.config:
        out.update(codec.to_hf(cfg))
    return out


def arch_for(cfg: ModelConfig) -> Arch | None:
    """The first HF architecture whose config round trip reproduces `cfg` (`cfg.hf_model_type`
    first: a Phi-3 stays a Phi-3 rather than the Llama it computes as), or None."""
    want = cfg.architecture()
    first = ARCHES.get(cfg.hf_model_type)
    for arch in [first] * (first is not None) + [a for a in ARCHES.values() if a is not first]:
        try:
            hf = {k: v for codec in arch.config for k, v in codec.to_hf(cfg).items()}
            if _decode(arch, hf).architecture() == want:
                return arch
        except (CheckpointError, ConfigError, TypeError, ValueError, KeyError):  # (heads the HF keys cannot size)
            continue
    return None


# ---------------------------------------------------------------------------------------- weights


def _expand(arch: Arch, cfg: ModelConfig, ours: set[str] | None = None):
    """(rule, theirs name, our names) for every table entry (that the model has, given `ours`)."""
    for r in arch.weights:
        layers = range(cfg.num_layers) if "{i}" in r.theirs else [None]
        experts = range(cfg.num_experts) if "{e}" in r.theirs else [None]
        for i, e in product(layers, experts):
            names = tuple(o.format(i=i, e=e) for o in r.ours)
            theirs = "score.weight" if cfg.num_labels and names == ("lm_head.weight",) else r.theirs.format(i=i, e=e)
            if ours is None or all(n in ours for n in names):
                yield r, theirs, names


def join_rows(r: Rule, tensors: list[torch.Tensor], head_dim: int | None = None) -> torch.Tensor:
    """The HF tensor (before any transpose) of a rule's parts: their rows in the rule's order
    (`r.per_head`: interleaved head by head, `head_dim` rows each — the caller's `cfg.head_dim`)."""
    if r.per_head:
        if head_dim is None:
            raise ValueError(f"{r.theirs} interleaves its parts head by head: join_rows needs head_dim")
        return torch.stack([t.unflatten(0, (-1, head_dim)) for t in tensors], 1).flatten(0, 2)
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def split_rows(r: Rule, tensor: torch.Tensor, sizes: list[int], head_dim: int | None = None) -> list[torch.Tensor]:
    """Inverse of `join_rows`: the parts of an HF tensor (transposed back), `sizes` rows each."""
    if r.per_head:
        if head_dim is None:
            raise ValueError(f"{r.theirs} interleaves its parts head by head: split_rows needs head_dim")
        return [t.flatten(0, 1) for t in tensor.unflatten(0, (-1, len(sizes), head_dim)).unbind(1)]
    return list(tensor.split(sizes)) if len(sizes) > 1 else [tensor]


def _modules(arch: Arch, cfg: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """{our module path: (HF module path, why it cannot carry other tensors, or None)}.

    A transformed module's extra tensors (`qweight`, `scales`, `lora_A.weight`, …) keep their
    suffix under the module's HF path; a module that HF fuses with others or stores
    transposed has no such place.
    """
    out: dict[str, tuple[str, str | None]] = {}
    for r, theirs, names in _expand(arch, cfg):
        module = theirs.rpartition(".")[0]
        why = (f"{module} fuses {', '.join(n.rpartition('.')[0] for n in names)}" if len(names) > 1
               else f"{module} is stored transposed" if r.transpose else None)
        for name in names:
            ours = name.rpartition(".")[0]
            if ours in out and out[ours][0] != module:
                why = f"{ours} is split across {out[ours][0]} and {module}"
            out[ours] = (module, why or (out[ours][1] if ours in out else None))
    return out


def _by_module(name: str, modules: dict[str, tuple[str, str | None]], arch: Arch) -> str:
    """`name` moved under its module's mapped path (`_modules`, either direction)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            target, why = modules[module]
            if why:
                raise CheckpointError(f"tensor {name!r} has no place in a {arch.model_type} checkpoint: {why}, "
                                      f"which cannot carry '{'.'.join(parts[cut:])}' (such a model is saved as "
                                      f"model_type {LLMCTL_TYPE!r})")
            return target + name[len(module):]
    raise CheckpointError(f"tensor {name!r} has no place in a {arch.model_type} checkpoint")


def _param_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Our tensors that a checkpoint holds: every state entry but a tied output head."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _fused_transformed(arch: Arch, cfg: ModelConfig, ours: set[str]):
    """(rule, HF module path, our module paths) of each fused projection whose parts are not plain
    linears (quantized: their `weight` is not among `ours`)."""
    for r, theirs, names in _expand(arch, cfg):
        if len(names) > 1 and not r.transpose and theirs.endswith(".weight") and not set(names) <= ours:
            yield r, theirs.removesuffix(".weight"), [n.removesuffix(".weight") for n in names]


def _rows(r: Rule, cfg: ModelConfig, join: bool) -> Callable:
    """`join_rows` / `split_rows` for `r` over tensors of `rows_per_channel` rows per output channel
    (packed rows: a fraction), as a module transform's `fuse_state` / `split_state` call them."""

    def head_rows(rows_per_channel) -> int:
        rows = cfg.head_dim * rows_per_channel
        if rows != int(rows):
            raise CheckpointError(f"{r.theirs}: a head's {cfg.head_dim} rows do not pack into whole rows")
        return int(rows)

    if join:
        return lambda tensors, rows_per_channel: join_rows(r, tensors, head_rows(rows_per_channel))
    return lambda tensor, sizes, rows_per_channel: split_rows(r, tensor, sizes, head_rows(rows_per_channel))


def _own(names, prefix: str) -> dict[str, str]:
    """{suffix: name} of the names under module path `prefix`."""
    return {n[len(prefix) + 1:]: n for n in names if n.startswith(prefix + ".")}


def _tensors_from_hf(arch: Arch, model: Transformer, ck, shapes: dict) -> dict[str, torch.Tensor]:
    """Our tensors from an HF checkpoint via the table; every stored tensor must be used."""
    cfg = model.cfg
    available = set(ck.tensor_names())
    aliases = {}
    if arch.prefix and not any(n.startswith(arch.prefix) for n in available):
        aliases = {arch.prefix + n: n for n in available}
    canonical = {stored: theirs for theirs, stored in aliases.items()}
    used, out = set(), {}
    for r, theirs, names in _expand(arch, cfg, set(shapes)):
        stored = aliases.get(theirs, theirs)
        if stored not in available:
            raise CheckpointError(f"{ck.path}: missing tensor {theirs!r} (for {names[0]})")
        used.add(stored)
        tensor = ck.get_tensor(stored)
        if r.transpose:
            tensor = tensor.t().contiguous()
        sizes = [shapes[n][0] for n in names]
        if sum(sizes) != tensor.shape[0]:
            raise CheckpointError(f"{ck.path}: tensor {theirs!r} has shape {list(tensor.shape)}, "
                                  f"expected {sum(sizes)} rows for {', '.join(names)}")
        out.update(zip(names, split_rows(r, tensor, sizes, cfg.head_dim)))
    for r, module, parts in _fused_transformed(arch, cfg, set(shapes)):  # a quantized fused module: its parts'
        split = getattr(type(model.get_submodule(parts[0])), "split_state", None)
        left = {canonical.get(n, n) for n in available - used}
        stored = {s: aliases.get(n, n) for s, n in _own(left, module).items()}
        if split is None or not stored:
            continue  # (its tensors are unexpected below)
        part_shapes = [{s: shapes[n] for s, n in _own(shapes, p).items() if n not in out} for p in parts]
        try:
            pieces = split({s: ck.get_tensor(n) for s, n in stored.items()}, part_shapes, _rows(r, cfg, join=False))
        except CheckpointError as exc:
            raise CheckpointError(f"{ck.path}: {module}: {exc}") from None
        for p, own in zip(parts, pieces):
            out.update({f"{p}.{s}": t for s, t in own.items()})
        used.update(stored.values())
    head = next((aliases.get(r.theirs, r.theirs) for r in arch.weights if r.ours == ("lm_head.weight",)), None)
    ignore = re.compile(arch.ignore)
    extra = sorted(n for n in available - used if not ignore.fullmatch(n) and not (cfg.tie_embeddings and n == head))
    # an HF module holding several of ours is a fused rule, which `_modules` already marks
    theirs_modules = {theirs: (ours, why) for ours, (theirs, why) in _modules(arch, cfg).items()}
    for n in extra:  # a transformed module's own tensors, by module prefix
        try:
            out[_by_module(canonical.get(n, n), theirs_modules, arch)] = ck.get_tensor(n)
        except CheckpointError as exc:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{ck.path}: unexpected {exc}{more}") from None
    return out


def tensors_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under the names its config.json architecture uses; CheckpointError
    for a tensor that architecture has no place for (`save_model` then writes llmctl's type)."""
    return _tensors_to(model, arch_for(model.cfg))


def _tensors_to(model: Transformer, arch: Arch | None) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    state = model.state_dict()
    shapes = _param_shapes(model)
    if arch is None:
        return {n: state[n] for n in shapes}
    out, used = {}, set()
    for r, theirs, names in _expand(arch, cfg, set(shapes)):
        tensor = join_rows(r, [state[n] for n in names], cfg.head_dim)
        out[theirs] = tensor.t().contiguous() if r.transpose else tensor
        used.update(names)
    for r, module, parts in _fused_transformed(arch, cfg, set(shapes)):  # quantized parts of a fused module
        fuse = getattr(type(model.get_submodule(parts[0])), "fuse_state", None)
        if fuse is None or len({type(model.get_submodule(p)) for p in parts}) > 1:
            continue  # (their tensors have no place below)
        own = [_own(set(shapes) - used, p) for p in parts]
        joined = fuse([{s: state[n] for s, n in names.items()} for names in own], _rows(r, cfg, join=True))
        out.update({f"{module}.{s}": t for s, t in joined.items()})
        used.update(n for names in own for n in names.values())
    modules = _modules(arch, cfg)
    for name in sorted(set(shapes) - used):  # transformed modules' own tensors, by module prefix
        out[_by_module(name, modules, arch)] = state[name]
    return out


def module_groups(cfg: ModelConfig) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """{HF module path: (its weight's rule, our module paths in the order of its rows)} for every
    projection of cfg's architecture (several of ours where HF fuses them: Phi-3's `qkv_proj`;
    `rule.transpose` where HF stores it transposed: GPT-2's Conv1D); {} for llmctl's own type."""
    return dict(_module_groups(json.dumps(cfg.to_dict(), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _module_groups(config: str) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """`module_groups` of a config as JSON (cached: adapter and quantization files ask several times,
    and a large model's meta build takes a while)."""
    cfg = ModelConfig.from_dict(json.loads(config))
    arch = arch_for(cfg)
    if arch is None:
        return {}
    ours = set(_param_shapes(build_model(cfg, device="meta")))
    return {theirs.removesuffix(".weight"): (r, tuple(n.removesuffix(".weight") for n in names))
            for r, theirs, names in _expand(arch, cfg, ours) if theirs.endswith(".weight")}


# ------------------------------------------------------------- what `core/model/io.py` reads and writes


def read_tensors(ck, model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s tensors from the open checkpoint `ck` (llmctl's names or its HF architecture's),
    shapes checked; a tied output head is not among them."""
    shapes = _param_shapes(model)
    if ck.config.get("model_type") == LLMCTL_TYPE:
        check_tensors(shapes, ck.tensor_shapes(), ck.path)
        return {n: ck.get_tensor(n) for n in shapes}
    tensors = _tensors_from_hf(ARCHES[ck.config["model_type"]], model, ck, shapes)
    check_tensors(shapes, {n: tuple(t.shape) for n, t in tensors.items()}, ck.path)
    return tensors


def to_checkpoint(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """`model`'s tensors and config.json under the first HF architecture that round-trips its
    config and can hold every tensor, else under `model_type: "llmctl"`."""
    arch = arch_for(model.cfg)
    try:
        tensors = _tensors_to(model, arch)
    except CheckpointError as exc:
        from llmctl.console import warn

        warn(f"transformers cannot load this checkpoint: {exc}")
        arch = None
        tensors = _tensors_to(model, arch)
    return tensors, _config_to(model.cfg, model.model.embed_tokens.weight.dtype, arch)
