"""GGUF export: a checkpoint as one file that llama.cpp (and ollama, LM Studio) runs.

    GGUFExporter().export("ckpt", "model.gguf", type="q8_0")

The model is loaded memory-mapped (`load_model`: adapters and transforms as every command
sees them); the header (metadata and tensor table) is written first from shapes alone, then
each tensor is converted (llama.cpp's row layout), quantized and written on its own, so the
peak is about one tensor. Names, keys and layouts follow llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llmctl.core.export import EXPORTERS, Exporter
from llmctl.core.outputs import OUTPUT_KINDS
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import CheckpointError, UsageError

MAGIC = b"GGUF"


@OUTPUT_KINDS.register("gguf")
def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def need_gguf():
    """The `gguf` package, or a UsageError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF export needs the gguf package: pip install 'llmctl[gguf]'") from None
    return gguf


# ---------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """How llama.cpp runs one Hugging Face architecture."""

    arch: str  # llama.cpp's architecture name
    mlp: tuple[str, str]  # the (mlp, activation) llama.cpp's graph computes
    permute_qk: bool = False  # llama.cpp's "normal" rope rotates adjacent pairs; HF rotates halves
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1
    fuse_qkv: bool = False  # GPT-2: one attn_qkv tensor
    topk_norm: bool | None = None  # MoE: whether llama.cpp renormalizes the top-k routing weights
    expert_ffn: bool = False  # MoE width under its own key (expert_feed_forward_length)
    needs_biases: bool = False  # llama.cpp's graph requires every projection's bias (StarCoder2)
    qk_norm: bool = False  # llama.cpp's graph normalizes queries and keys per head (Qwen3)
    residuals: tuple[str, ...] = ("sequential",)  # how its blocks may join attention and feed-forward
    # (`norm.RESIDUALS`); several: the graph reads which from `{arch}.use_parallel_residual` (GPT-NeoX)
    approx_mlp: tuple[str, str] | None = None  # an MLP written though llama.cpp computes `mlp` (warned)
    local_rope: bool = False  # the sliding layers' own unscaled rope base, `{arch}.rope.freq_base_swa` (Gemma 3)
    window_pattern: bool = False  # which layers slide: `{arch}.attention.sliding_window_pattern`, one bool each
    needs_output: bool = False  # its graph requires output.weight: a tied head is written as a copy
    partial_rotary: bool = False  # it turns the first rope.dimension_count dims of each head only
    lacks: Callable[[Any], str | None] | None = None  # what else its graph fixes that a config differs from


def _gemma2_lacks(cfg) -> str | None:
    """What llama.cpp's gemma2 graph fixes and `cfg` does otherwise (None: nothing)."""
    windows = cfg.layer_sliding_windows or [cfg.sliding_window] * cfg.num_layers
    scale = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 46 else cfg.head_dim  # its 27B, known by 46 layers
    checks = {
        "slides on the even layers, with one window, and only there": windows[0] is None
        or len(set(windows[::2])) != 1 or any(w is not None for w in windows[1::2]),
        "always caps the attention scores and the logits": cfg.attention_softcap is None or cfg.logit_softcap is None,
        f"scales the attention scores by {scale} ** -0.5": (cfg.attention_scale_dim or cfg.head_dim) != scale,
        "ties the output head to the embeddings": not cfg.tie_embeddings,
    }
    return next((why for why, failed in checks.items() if failed), None)


def _gemma3_lacks(cfg) -> str | None:
    """What llama.cpp's gemma3 graph fixes and `cfg` does otherwise (None: nothing)."""
    windows = cfg.layer_sliding_windows or [cfg.sliding_window] * cfg.num_layers
    scale = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim  # its 27B, known by 62 layers
    checks = {
        "slides with one window on every sliding layer": len({w for w in windows if w is not None}) > 1,
        f"scales the attention scores by {scale} ** -0.5": (cfg.attention_scale_dim or cfg.head_dim) != scale,
        "never caps the logits": cfg.logit_softcap is not None,
        "never caps the attention scores": cfg.attention_softcap is not None,
        "ties the output head to the embeddings": not cfg.tie_embeddings,
    }
    return next((why for why, failed in checks.items() if failed), None)


FAMILIES = {
    "llama": Family("llama", ("swiglu", "silu"), permute_qk=True),
    "mistral": Family("llama", ("swiglu", "silu"), permute_qk=True),
    "mixtral": Family("llama", ("swiglu", "silu"), permute_qk=True, topk_norm=True),
    "qwen2": Family("qwen2", ("swiglu", "silu")),
    "qwen3": Family("qwen3", ("swiglu", "silu"), qk_norm=True),
    "gemma": Family("gemma", ("geglu", "gelu_tanh"), norm_offset=1.0),
    "gemma2": Family("gemma2", ("geglu", "gelu_tanh"), norm_offset=1.0, lacks=_gemma2_lacks),
    "gemma3_text": Family("gemma3", ("geglu", "gelu_tanh"), norm_offset=1.0, qk_norm=True, local_rope=True,
                          window_pattern=True, lacks=_gemma3_lacks),
    "gpt2": Family("gpt2", ("gelu", "gelu_tanh"), fuse_qkv=True),
    "qwen2_moe": Family("qwen2moe", ("swiglu", "silu"), topk_norm=False, expert_ffn=True),
    "qwen3_moe": Family("qwen3moe", ("swiglu", "silu"), topk_norm=True, expert_ffn=True, qk_norm=True),
    "phi3": Family("llama", ("swiglu", "silu"), permute_qk=True),  # a Llama with fused tensors: written unfused
    "starcoder2": Family("starcoder2", ("gelu", "gelu_tanh"), needs_biases=True),
    "phi": Family("phi2", ("gelu", "gelu_tanh"), needs_biases=True, residuals=("parallel_shared",),
                  partial_rotary=True),
    # Pythia: q/k/v rows written [q; k; v] (HF interleaves them head by head), NeoX rope on rotary_pct of each head
    "gpt_neox": Family("gptneox", ("gelu", "gelu_tanh"), fuse_qkv=True, needs_biases=True,
                       residuals=("parallel", "sequential"), partial_rotary=True, approx_mlp=("gelu", "gelu"),
                       needs_output=True),
}
REFUSED = {"bert": "it is an encoder (masked LM); llama.cpp runs BERT only as an embedding model"}


def mlp_of(cfg) -> tuple[str, str]:
    """(mlp, activation) of a model config."""
    from llmctl.core.model.mlp import MLPS

    return cfg.mlp, cfg.activation or MLPS.get(cfg.mlp).default_activation


def family_of(cfg) -> tuple[str, Family]:
    """(HF model_type, Family) for a model config; UsageError naming why one cannot be exported."""
    from llmctl.core.hf import arch_for

    if cfg.num_labels:
        raise UsageError(f"cannot export a sequence classifier (reward model, {cfg.num_labels} score"
                         f"{'s' if cfg.num_labels > 1 else ''}) to GGUF: llama.cpp runs language models")
    arch = arch_for(cfg)
    if arch is None:
        raise UsageError("this model matches no Hugging Face architecture (its config is llmctl's own), "
                         f"and llama.cpp runs only known ones: {', '.join(FAMILIES)}")
    if arch.model_type in REFUSED or arch.model_type not in FAMILIES:
        why = REFUSED.get(arch.model_type, "llama.cpp has no such architecture")
        raise UsageError(f"cannot export a {arch.model_type} model to GGUF: {why}")
    family = FAMILIES[arch.model_type]
    lacks = {f"a {cfg.residual} residual": cfg.residual not in family.residuals,
             "qk-norm": cfg.qk_norm and not family.qk_norm,
             "partial rotary": cfg.rotary_dim != cfg.head_dim and cfg.position == "rope" and not family.partial_rotary}
    if any(lacks.values()):
        raise UsageError(f"cannot export this {arch.model_type} model to GGUF: llama.cpp's {family.arch} has no "
                         f"{next(k for k, v in lacks.items() if v)}")
    if family.lacks and (why := family.lacks(cfg)):
        raise UsageError(f"cannot export this {arch.model_type} model to GGUF: llama.cpp's {family.arch} {why}")
    if mlp_of(cfg) not in (family.mlp, family.approx_mlp):
        raise UsageError(f"cannot export this {arch.model_type} model to GGUF: its MLP is {'/'.join(mlp_of(cfg))}, "
                         f"llama.cpp's {family.arch} computes {'/'.join(family.mlp)}")
    if family.needs_biases and not (cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias):
        raise UsageError(f"cannot export this {arch.model_type} model to GGUF: llama.cpp's {family.arch} "
                         "requires the attention and MLP biases, and this model has none")
    if family.topk_norm is not None and cfg.moe_normalize_topk != family.topk_norm:
        raise UsageError(f"cannot export this {arch.model_type} model to GGUF: llama.cpp's {family.arch} "
                         f"{'always' if family.topk_norm else 'never'} renormalizes the top-k routing weights")
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if scaling not in (None, "linear", "yarn", "llama3") or scaling == "llama3" and family.arch != "llama":
        raise UsageError(f"cannot export rope scaling {scaling!r} on {arch.model_type} to GGUF: llama.cpp's "
                         f"{family.arch} supports linear and yarn{', llama3' if family.arch == 'llama' else ''}")
    return arch.model_type, family


# ---------------------------------------------------------------------------------------- tensor names

_L = r"model\.layers\.(\d+)\."
NAMES: list[tuple[str, str]] = [  # our parameter name (regex) → GGUF tensor name
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.embed_positions\.weight", "position_embd.weight"),
    (r"model\.norm\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.weight", "output.weight"),
    (r"lm_head\.bias", "output.bias"),
    (_L + r"input_layernorm\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (_L + r"post_attention_layernorm\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (_L + r"attn_out_norm\.weight", r"blk.\1.post_attention_norm.weight"),  # sandwich norms (Gemma 2)
    (_L + r"mlp_out_norm\.weight", r"blk.\1.post_ffw_norm.weight"),
    (_L + r"self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (_L + r"self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (_L + r"mlp\.(gate|up|down)_proj\.(weight|bias)", r"blk.\1.ffn_\2.\3"),
    (_L + r"mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (_L + r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_exps.weight"),
    (_L + r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (_L + r"mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),  # one row: 1-D in GGUF
]
_NAMES = [(re.compile(a), b) for a, b in NAMES]


def gguf_name(name: str) -> str:
    for pattern, target in _NAMES:
        if (m := pattern.fullmatch(name)) is not None:
            return m.expand(target)
    raise CheckpointError(f"tensor {name!r} has no GGUF counterpart")


@dataclass
class Item:
    """One GGUF tensor: its name, numpy-order shape, our source tensors and how they combine."""

    name: str
    shape: tuple[int, ...]
    sources: list[str]
    combine: str  # "one", "cat" (GPT-2's fused qkv) or "stack" (experts)
    layer: int | None
    tied: bool = False  # the embedding, which is also the output


def plan(tensors: dict, cfg, family: Family) -> list[Item]:
    """The GGUF tensors of a model's dense tensors (`dense_tensors`), in order, from shapes alone."""
    state = {n: t.shape for n, t in tensors.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    items: dict[str, Item] = {}
    for name, shape in state.items():
        target = gguf_name(name)
        if family.fuse_qkv:
            target = re.sub(r"attn_[qkv]\.", "attn_qkv.", target)
        layer = int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", target)) else None
        if target not in items:
            combine = "stack" if "_exps." in target else "cat" if "attn_qkv." in target else "one"
            items[target] = Item(target, shape, [], combine, layer)
        items[target].sources.append(name)
    for item in items.values():
        first = state[item.sources[0]]
        if item.combine == "stack":
            item.shape = (len(item.sources), *first)
        elif item.combine == "cat":
            item.shape = (sum(state[s][0] for s in item.sources), *first[1:])
        elif item.name.endswith("ffn_gate_inp_shexp.weight"):
            item.shape = first[1:]
    if cfg.tie_embeddings and family.needs_output and "token_embd.weight" in items:
        embd = items["token_embd.weight"]
        items["output.weight"] = Item("output.weight", embd.shape, list(embd.sources), "one", None)
    elif cfg.tie_embeddings and "token_embd.weight" in items:
        items["token_embd.weight"].tied = True
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        items["rope_freqs.weight"] = Item("rope_freqs.weight", (cfg.head_dim // 2,), [], "rope_freqs", None)
    return list(items.values())


def _permute(w, heads: int):
    """HF's rotate-half rows → llama.cpp's interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg):
    """llama.cpp's rope_freqs for llama3 scaling: the divisor of each rotary frequency."""
    import math

    import numpy as np

    s = cfg.rope_scaling
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensor_data(tensors: dict, cfg, family: Family, item: Item):
    """`item` as a float32 numpy array in llama.cpp's layout, from the model's dense tensors
    (one tensor materialized)."""
    import numpy as np
    import torch

    if item.combine == "rope_freqs":
        return _llama3_factors(cfg)
    with torch.no_grad():
        parts = [tensors[s].get().to("cpu", torch.float32) for s in item.sources]
        t = torch.stack(parts) if item.combine == "stack" else torch.cat(parts) if item.combine == "cat" else parts[0]
        if family.permute_qk and re.search(r"\.attn_[qk]\.", item.name):
            t = _permute(t, cfg.num_heads if ".attn_q." in item.name else cfg.num_kv_heads)
        if family.norm_offset and re.search(r"norm\.weight$", item.name):
            t = t + family.norm_offset
        return np.ascontiguousarray(t.reshape(item.shape).numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------- tensor types


@dataclass(frozen=True)
class FileType:
    """A `--type`: the GGML type of each tensor (1-D tensors and routers stay float32)."""

    file_type: str  # gguf.LlamaFileType member
    choose: Callable[[Item, int], str]  # (item, num_layers) → GGML type name for a 2-D+ weight


def _uniform(t: str) -> Callable[[Item, int], str]:
    return lambda item, n: t


def _q4_k_m(item: Item, n: int) -> str:
    """llama.cpp's Q4_K_M mix: Q6_K for the output (the embedding where it is tied: `plan` then writes no
    output.weight) and for attn_v / ffn_down in some layers."""
    if item.name == "output.weight" or item.name == "token_embd.weight" and item.tied:
        return "Q6_K"
    if re.search(r"\.(attn_v|ffn_down(_exps)?)\.", item.name):
        i = item.layer or 0
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:
            return "Q6_K"
    return "Q4_K"


TYPES: dict[str, FileType] = {  # the first is the default
    "f16": FileType("MOSTLY_F16", _uniform("F16")),
    "f32": FileType("ALL_F32", _uniform("F32")),
    "bf16": FileType("MOSTLY_BF16", _uniform("BF16")),
    "q8_0": FileType("MOSTLY_Q8_0", _uniform("Q8_0")),
    "q4_0": FileType("MOSTLY_Q4_0", _uniform("Q4_0")),
    "q4_k_m": FileType("MOSTLY_Q4_K_M", _q4_k_m),
}
FALLBACK = {"Q4_K": "Q8_0", "Q6_K": "Q8_0", "Q8_0": "F16", "Q4_0": "F16"}  # rows too short for the blocks


def ggml_type(item: Item, type: str, num_layers: int) -> str:
    """The GGML type name `item` is written in under `--type`."""
    gguf = need_gguf()
    if len(item.shape) < 2 or item.name.endswith("ffn_gate_inp.weight"):
        return "F32"
    chosen = TYPES[type].choose(item, num_layers)
    while chosen in FALLBACK and item.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]][0]:
        chosen = FALLBACK[chosen]
    return chosen


def quantize(data, type_name: str):
    """`data` (float32) in GGML type `type_name`: float arrays for F32/F16, bytes otherwise."""
    gguf = need_gguf()
    from llmctl.core.export import kquants

    if type_name in kquants.QUANTIZERS:
        return kquants.QUANTIZERS[type_name](data)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[type_name])


# ---------------------------------------------------------------------------------------- metadata


def add_model_metadata(writer, cfg, family: Family, name: str, report: Reporter) -> None:
    """Hyper-parameters under llama.cpp's `{arch}.*` keys."""
    gguf = need_gguf()
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    moe = cfg.moe_intermediate_size or cfg.intermediate_size
    writer.add_feed_forward_length(moe if cfg.num_experts and not family.expert_ffn else cfg.intermediate_size)
    if cfg.num_experts and family.expert_ffn:
        writer.add_expert_feed_forward_length(moe)
    if cfg.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.position == "rope":
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type")
        if kind in ("linear", "yarn"):
            writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn" and scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if family.local_rope:
            writer.add_rope_freq_base_swa(cfg.local_rope_theta or cfg.rope_theta)
    if len(family.residuals) > 1:
        writer.add_parallel_residual(cfg.residual == "parallel")
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
    if cfg.attention_softcap is not None:  # Gemma 2
        writer.add_attn_logit_softcapping(cfg.attention_softcap)
    if cfg.logit_softcap is not None:
        writer.add_final_logit_softcapping(cfg.logit_softcap)
    if cfg.layer_sliding_windows is not None:  # the sliding layers' window (which ones: the family's graph or key)
        writer.add_sliding_window(next(w for w in cfg.layer_sliding_windows if w is not None))
    if family.window_pattern and (cfg.layer_sliding_windows is not None or cfg.sliding_window is not None):
        slides = [w is not None for w in cfg.layer_sliding_windows or [cfg.sliding_window] * cfg.num_layers]
        writer.add_sliding_window_pattern(slides)  # (none sliding: no window key, else llama.cpp asserts one does)
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
        if slides != [(i + 1) % 6 != 0 for i in range(cfg.num_layers)]:
            report.warn(f"this model slides on layers {_spans(slides)}: llama.cpp builds that predate "
                        f"{family.arch}.attention.sliding_window_pattern make every 6th layer global instead")
    elif cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.sliding_window < cfg.max_seq_len:
            report.warn(f"the sliding window ({cfg.sliding_window} tokens) is recorded, but llama.cpp's "
                        f"{family.arch} attends to all earlier tokens: outputs past the window differ")


def _spans(flags: list[bool]) -> str:
    """The indices where `flags` holds, as ranges: "0-4, 6"."""
    spans: list[list[int]] = []
    for i, f in enumerate(flags):
        if f and spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        elif f:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ---------------------------------------------------------------------------------------- the exporter


@EXPORTERS.register("gguf")
class GGUFExporter(Exporter):
    types = tuple(TYPES)
    kind = "gguf"

    def export(self, checkpoint, output, *, type: str = "f16", force: bool = False,
               report: Reporter = SILENT) -> dict[str, Any]:
        if type not in TYPES:
            raise UsageError(f"unknown GGUF type {type!r}; choose from: {', '.join(TYPES)}")
        gguf = need_gguf()
        from llmctl.core.export.dense import dense_tensors
        from llmctl.core.export.vocab import add_vocab
        from llmctl.core.io import atomic_file
        from llmctl.core.model.io import load_model

        model, cfg = load_model(checkpoint)
        model_type, family = family_of(cfg)
        if mlp_of(cfg) == family.approx_mlp:
            report.warn(f"llama.cpp's {family.arch} computes the tanh approximation of this model's exact "
                        f"{mlp_of(cfg)[1]}: its logits differ from llmctl's by about 1e-3 of their scale")
        tensors, folded = dense_tensors(model)
        if "adapted" in folded:
            report.info("merging the adapter into its base weights")
        if "quantized" in folded:
            twice = " and re-quantized: quantizing twice loses more than quantizing the original once" \
                if type not in ("f32", "f16", "bf16") else ""
            report.warn(f"{checkpoint} is quantized: its weights are dequantized{twice}")
        items = plan(tensors, cfg, family)
        types = {item.name: ggml_type(item, type, cfg.num_layers) for item in items}
        with atomic_file(output, "wb", force=force) as f:
            writer = gguf.GGUFWriter(f.name, family.arch)
            try:
                add_model_metadata(writer, cfg, family, Path(checkpoint).resolve().name, report)
                vocab = add_vocab(writer, checkpoint, cfg.vocab_size, report)
                writer.add_file_type(gguf.LlamaFileType[TYPES[type].file_type])
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                for item in items:
                    _add_tensor_info(writer, item, types[item.name])
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                with report.progress("export", total=len(items), unit="tensor") as bar:
                    for item in _stream(tensors, cfg, family, items, types):
                        writer.write_tensor_data(item)
                        bar.advance()
            finally:
                writer.close()
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        return {"output": str(output), "format": "gguf", "type": type, "architecture": family.arch,
                "model_type": model_type, "tensors": len(items), "tensor_types": counts,
                "tokenizer": vocab, "bytes": os.path.getsize(output)}


def _add_tensor_info(writer, item: Item, type_name: str) -> None:
    """Declare `item` in the header: its GGML type, shape and byte size."""
    import math

    import numpy as np

    gguf = need_gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = type_name not in ("F32", "F16")  # bytes: the writer reads the byte shape back as elements
    shape = gguf.quant_shape_to_byte_shape(item.shape, qtype) if raw else item.shape
    dtype = np.dtype("uint8" if raw else type_name.replace("F", "float"))
    writer.add_tensor_info(item.name, shape, dtype, math.prod(item.shape) // block * size, raw_dtype=qtype)


def _stream(tensors: dict, cfg, family: Family, items: list[Item], types: dict[str, str]) -> Iterator[Any]:
    for item in items:
        yield quantize(tensor_data(tensors, cfg, family, item), types[item.name])
