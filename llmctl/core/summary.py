"""What `llmctl info` reports about a checkpoint, from its configs and safetensors headers only
(no torch): dimensions under the config.json keys of many HF families, the positional
encoding, parameter counts (active ones for mixtures of experts), lineage and transforms.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from llmctl.core.checkpoint import CHAT_TEMPLATE_GLOB, Checkpoint, read_json_object

# config.json keys across HF families and llmctl's own ModelConfig (first present wins)
_KEYS = {
    "layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff", "ffn_hidden_size", "ffn_dim"),
    "heads": ("num_attention_heads", "num_heads", "n_head", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads"),
    "head_dim": ("head_dim", "d_kv"),
    "vocab_size": ("vocab_size",),
    "context_length": ("max_position_embeddings", "max_seq_len", "n_positions", "n_ctx", "seq_length"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
    "experts_per_token": ("num_experts_per_tok", "experts_per_token", "moe_top_k", "top_k"),
}
_ROPE_FAMILIES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "gpt_neox", "gptj", "falcon", "olmo", "olmo2", "stablelm",
    "starcoder2", "cohere", "deepseek_v2", "deepseek_v3", "granite", "internlm2",
}
_LEARNED_POSITION = re.compile(r"(^|\.)(wpe|position_embeddings|embed_positions|pos_emb)\.weight$")


def _first(config: Mapping, keys: tuple[str, ...]):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def positional_encoding(config: Mapping, tensor_names=()) -> dict:
    """{"type": rope|alibi|learned|relative_bias|sinusoidal|nope|unknown, …details} from
    config.json keys (HF families, or `position` of an llmctl config) and tensor names."""
    if "relative_attention_num_buckets" in config:
        return {"type": "relative_bias", "buckets": config["relative_attention_num_buckets"]}
    kind = config.get("position")
    if not isinstance(kind, str):
        kind = _position_kind(config, tensor_names)
    if kind != "rope":
        return {"type": kind}
    rope = config.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq",
                                                                               config.get("local_rope_theta")))
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type, the sliding layers' theta as `local_theta`
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    scaling = config.get("rope_scaling")
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out = {"type": "rope", "theta": float(theta), "scaling": scaling or None}
    if local is not None:
        out["local_theta"] = float(local)
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct")))
    if partial not in (None, 1, 1.0):
        out["partial_rotary_factor"] = partial
    return out


def _position_kind(config: Mapping, tensor_names) -> str:
    if config.get("alibi") or (config.get("attn_config") or {}).get("alibi") or config.get("model_type") == "bloom":
        return "alibi"
    if any(_LEARNED_POSITION.search(n) for n in tensor_names):
        return "learned"
    rope_keys = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_emb_base", "rotary_pct")
    if any(config.get(k) is not None for k in rope_keys) or config.get("model_type") in _ROPE_FAMILIES:
        return "rope"
    return "unknown"


def count_parameters(shapes: Mapping[str, tuple], num_experts: int | None, experts_per_token: int | None) -> dict:
    """{"total", "active"}: active counts only `experts_per_token` of `num_experts` routed-expert
    tensors (names containing `experts`, shared experts excluded); None for dense models."""
    sizes = {n: math.prod(shape) for n, (shape, _) in shapes.items()}
    total = sum(sizes.values())
    routed = sum(s for n, s in sizes.items() if "experts" in n and "shared_expert" not in n)
    active = None
    if routed and num_experts and experts_per_token:
        active = total - routed + routed * experts_per_token // num_experts
    return {"total": total, "active": active}


def describe(ck: Checkpoint) -> dict:
    """Everything `llmctl info` reports, as plain JSON data, read from configs and headers only."""
    config, lineage = ck.config, ck.lineage or {}
    dims = {key: _first(config, keys) for key, keys in _KEYS.items()}
    if dims["kv_heads"] is None and dims["heads"] is not None:
        dims["kv_heads"] = 1 if config.get("multi_query") else dims["heads"]
    if dims["head_dim"] is None and dims["heads"] and dims["hidden_size"]:
        dims["head_dim"] = dims["hidden_size"] // dims["heads"]
    for key, per_layer in (("heads", "layer_num_heads"), ("kv_heads", "layer_num_kv_heads"),
                           ("intermediate_size", "layer_intermediate_sizes")):
        if isinstance(config.get(per_layer), list):  # structured pruning: sizes per layer
            dims[key] = config[per_layer]
    shapes = ck.tensor_shapes()
    dtypes: dict[str, int] = {}
    for shape, dtype in shapes.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + math.prod(shape)
    files = [p for p in ck.path.rglob("*") if p.is_file()]
    tokenizer_config = read_json_object(ck.path / "tokenizer_config.json", required=False) or {}
    return {
        "path": str(ck.path),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "parameters": count_parameters(shapes, dims["num_experts"], dims["experts_per_token"]),
        **dims,
        "position": positional_encoding(config, shapes),
        "dtypes": dtypes,
        "tensors": len(shapes),
        "format": ck.weights_format,
        "size_bytes": ck.size_bytes,
        "disk_bytes": sum(p.stat().st_size for p in files),
        "shards": list(ck.shards),
        "tokenizer": ck.has_tokenizer,
        "chat_template": bool(tokenizer_config.get("chat_template") or any(ck.path.glob(CHAT_TEMPLATE_GLOB))),
        "lineage": {
            "command": lineage.get("command"),
            "created": lineage.get("created"),
            "llmctl_version": lineage.get("llmctl_version"),
            "parents": lineage.get("parents", []),
            "merge_method": lineage.get("merge_method"),
        } if ck.lineage is not None else None,
        "quantization": lineage.get("quantization") or config.get("quantization_config"),
        "transforms": lineage.get("transforms", []),  # module transforms recorded in llmctl.json
        "sparsity": lineage.get("sparsity"),
        "metrics": len(lineage.get("metrics", [])),
    }
