"""The GGUF exporter's file-level work (`core/export/gguf.py`: `add_model_metadata`, `ggml_type`,
`_add_tensor_info`, `tensor_data`, `quantize`, `_stream`, `GGUFExporter.export`),
checked against gguf-py: its key names (`gguf.Keys`) and value types, its reader (offsets, sizes,
shapes, types), its quantizers and name map, with the expected values taken from the Hugging Face
configs and tensors as llama.cpp's `convert_hf_to_gguf.py` maps them. Tiny models, built here."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

import gguf  # noqa: E402
torch = pytest.importorskip("torch")
import transformers as tr  # noqa: E402

from llmctl.core.report import Silent  # noqa: E402

K, V = gguf.Keys, gguf.GGUFValueType
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello llama", "one two three four five"] * 8


class Recorder(Silent):
    """A reporter that keeps its messages and its progress bars (description, total, unit, advances)."""

    def __init__(self):
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.bars: list[list] = []

    def info(self, message):
        self.infos.append(message)

    def warn(self, message):
        self.warnings.append(message)

    def progress(self, description, total=None, unit="it"):
        import contextlib

        bar = [description, total, unit, 0]
        self.bars.append(bar)

        class Bar:
            def advance(self, amount=1):
                bar[3] += amount

            def update(self, **kw):
                pass

        return contextlib.nullcontext(Bar())


# ------------------------------------------------------------------------------------- metadata

COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=3e-6, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def _metadata(tmp_path, hf_config, report=None) -> dict:
    """{key: (value, GGUF value type)} of a file holding only `add_model_metadata`'s keys."""
    from llmctl.core.export.gguf import add_model_metadata, family_of
    from llmctl.core.hf import config_from_hf

    cfg = config_from_hf(hf_config.to_dict())
    _, family = family_of(cfg)
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, family.arch)
    add_model_metadata(writer, cfg, family, "tiny-name", report or Silent())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(path).fields
    return {k: (f.contents(), f.types[0]) for k, f in fields.items() if not k.startswith("GGUF.")}


def _want(arch: str, *, ctx=48, embd=32, blocks=3, ffn=80, heads=4, kv=2, vocab=100, rms=3e-6, rope=8,
          theta=500000.0) -> dict:
    """The keys every decoder gets (llama.cpp's converter: from max_position_embeddings, hidden_size, …)."""
    want = {K.General.ARCHITECTURE: (arch, V.STRING), K.General.NAME: ("tiny-name", V.STRING),
            K.LLM.CONTEXT_LENGTH.format(arch=arch): (ctx, V.UINT32),
            K.LLM.EMBEDDING_LENGTH.format(arch=arch): (embd, V.UINT32),
            K.LLM.BLOCK_COUNT.format(arch=arch): (blocks, V.UINT32),
            K.LLM.FEED_FORWARD_LENGTH.format(arch=arch): (ffn, V.UINT32),
            K.Attention.HEAD_COUNT.format(arch=arch): (heads, V.UINT32),
            K.Attention.HEAD_COUNT_KV.format(arch=arch): (kv, V.UINT32),
            K.LLM.VOCAB_SIZE.format(arch=arch): (vocab, V.UINT32)}
    if rms is not None:
        want[K.Attention.LAYERNORM_RMS_EPS.format(arch=arch)] = (pytest.approx(rms, rel=1e-6), V.FLOAT32)
    if rope is not None:
        want[K.Rope.DIMENSION_COUNT.format(arch=arch)] = (rope, V.UINT32)
        want[K.Rope.FREQ_BASE.format(arch=arch)] = (pytest.approx(theta, rel=1e-6), V.FLOAT32)
    return want


def _head_size(got: dict, arch: str, embd: int, heads: int) -> tuple[int, int]:
    """(key_length, value_length), llama.cpp's default n_embd / n_head where the keys are absent."""
    k = got.pop(K.Attention.KEY_LENGTH.format(arch=arch), (embd // heads, V.UINT32))
    v = got.pop(K.Attention.VALUE_LENGTH.format(arch=arch), (embd // heads, V.UINT32))
    assert k[1] == v[1] == V.UINT32
    return k[0], v[0]


def test_a_llama_gets_each_hyperparameter_under_its_gguf_key_and_type(tmp_path):
    got = _metadata(tmp_path, tr.LlamaConfig(**COMMON))
    assert _head_size(got, "llama", 32, 4) == (8, 8)
    assert got == _want("llama")


def test_a_head_size_other_than_width_over_heads_is_recorded(tmp_path):
    got = _metadata(tmp_path, tr.Qwen3Config(**COMMON, head_dim=16))
    assert _head_size(got, "qwen3", 32, 4) == (16, 16)
    assert got == _want("qwen3", rope=16)


def test_gpt2_records_a_layernorm_epsilon_and_no_rope(tmp_path):
    config = tr.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=48, layer_norm_epsilon=2e-5)
    got = _metadata(tmp_path, config)
    assert _head_size(got, "gpt2", 32, 4) == (8, 8)
    kv = got.pop(K.Attention.HEAD_COUNT_KV.format(arch="gpt2"), (4, V.UINT32))
    assert kv == (4, V.UINT32)  # llama.cpp's default: as many as the heads
    want = _want("gpt2", ffn=128, rms=None, rope=None)  # n_inner unset: 4 × n_embd
    del want[K.Attention.HEAD_COUNT_KV.format(arch="gpt2")]
    want[K.Attention.LAYERNORM_EPS.format(arch="gpt2")] = (pytest.approx(2e-5, rel=1e-6), V.FLOAT32)
    assert got == want


def test_mixtral_records_the_expert_width_as_its_feed_forward_length(tmp_path):
    config = tr.MixtralConfig(**{**COMMON, "intermediate_size": 72}, num_local_experts=4, num_experts_per_tok=2)
    got = _metadata(tmp_path, config)
    _head_size(got, "llama", 32, 4)
    got.pop(K.Attention.SLIDING_WINDOW.format(arch="llama"), None)  # checked on its own below
    assert got == {**_want("llama", ffn=72), K.LLM.EXPERT_COUNT.format(arch="llama"): (4, V.UINT32),
                   K.LLM.EXPERT_USED_COUNT.format(arch="llama"): (2, V.UINT32)}


@pytest.mark.parametrize("shared", [40, None])
def test_qwen_moe_records_dense_expert_and_shared_widths_under_their_own_keys(shared, tmp_path):
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    if shared:
        config = tr.Qwen2MoeConfig(**COMMON, **moe, shared_expert_intermediate_size=shared, norm_topk_prob=False)
        arch = "qwen2moe"
    else:
        config = tr.Qwen3MoeConfig(**COMMON, **moe, head_dim=8, norm_topk_prob=True)
        arch = "qwen3moe"
    got = _metadata(tmp_path, config)
    _head_size(got, arch, 32, 4)
    got.pop(K.Attention.SLIDING_WINDOW.format(arch=arch), None)
    want = {**_want(arch), K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch): (24, V.UINT32),
            K.LLM.EXPERT_COUNT.format(arch=arch): (4, V.UINT32), K.LLM.EXPERT_USED_COUNT.format(arch=arch): (2, V.UINT32)}
    if shared:
        want[K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=arch)] = (shared, V.UINT32)
    assert got == want


ROPE = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    "yarn": ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
             {"type": "yarn", "factor": 2.0, "orig": 16}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, {}),
}


@pytest.mark.parametrize("kind", ROPE)
def test_rope_scaling_keys_as_gguf_names_them(kind, tmp_path):
    """linear and yarn: the scaling type, the factor (a float) and yarn's original context; llama3
    only a rope_freqs tensor, no scaling key."""
    scaling, want = ROPE[kind]
    got = _metadata(tmp_path, tr.LlamaConfig(**{**COMMON, "rope_parameters": {"rope_theta": 500000.0, **scaling}}))
    scaled = {k: v for k, v in got.items() if k.startswith("llama.rope.scaling.")}
    expect = {}
    if "type" in want:
        expect[K.Rope.SCALING_TYPE.format(arch="llama")] = (want["type"], V.STRING)
        expect[K.Rope.SCALING_FACTOR.format(arch="llama")] = (want["factor"], V.FLOAT32)
    if "orig" in want:
        expect[K.Rope.SCALING_ORIG_CTX_LEN.format(arch="llama")] = (want["orig"], V.UINT32)
    assert scaled == expect


@pytest.mark.parametrize("window", [16, 47, 48, None])
def test_a_sliding_window_is_recorded_and_warned_about_only_when_shorter_than_the_context(window, tmp_path):
    report = Recorder()
    got = _metadata(tmp_path, tr.MistralConfig(**COMMON, sliding_window=window), report)
    key = K.Attention.SLIDING_WINDOW.format(arch="llama")
    assert got.get(key) == (None if window is None else (window, V.UINT32))
    if window is not None and window < 48:
        assert report.warnings == [f"the sliding window ({window} tokens) is recorded, but llama.cpp's llama "
                                   "attends to all earlier tokens: outputs past the window differ"]
    else:
        assert report.warnings == []


# ------------------------------------------------------------------------------------- tensor types


def _item(name, shape, layer=None):
    from llmctl.core.export.gguf import Item

    return Item(name, shape, [], "one", layer)


# (name, numpy-order shape, --type, layers, type): rows (the last axis) must hold whole blocks —
# 32 values for Q8_0 / Q4_0, 256 for Q4_K / Q6_K (gguf.GGML_QUANT_SIZES); a k-quant that does not
# fit falls back to Q8_0, a Q8_0 / Q4_0 that does not to F16.
TYPE_CASES = [
    ("blk.0.attn_norm.weight", (256,), "q8_0", 2, "F32"),
    ("blk.0.ffn_gate_inp.weight", (4, 64), "q8_0", 2, "F32"),  # a MoE router stays float32
    ("blk.0.ffn_gate_inp.weight", (4, 64), "f16", 2, "F32"),
    ("token_embd.weight", (300, 32), "q8_0", 2, "Q8_0"),  # 300 rows, each 32 long: fits
    ("token_embd.weight", (300, 32), "q4_0", 2, "Q4_0"),
    ("blk.0.attn_q.weight", (64, 48), "q8_0", 2, "F16"),  # rows of 48: no whole 32-blocks
    ("blk.0.attn_q.weight", (64, 48), "q4_0", 2, "F16"),
    ("blk.0.attn_q.weight", (64, 48), "f32", 2, "F32"),
    ("blk.0.attn_q.weight", (64, 48), "bf16", 2, "BF16"),
    ("blk.0.ffn_down_exps.weight", (4, 48, 64), "q8_0", 2, "Q8_0"),  # experts: the row is still the last axis
    ("blk.0.ffn_up_exps.weight", (4, 64, 48), "q8_0", 2, "F16"),
    ("output.weight", (300, 256), "q4_k_m", 8, "Q6_K"),
    ("output.weight", (256, 64), "q4_k_m", 8, "Q8_0"),
    ("output.weight", (256, 48), "q4_k_m", 8, "F16"),
    ("blk.3.attn_v.weight", (64, 256), "q4_k_m", 8, "Q6_K"),  # llama.cpp's use_more_bits(3, 8)
    ("blk.4.attn_v.weight", (64, 256), "q4_k_m", 8, "Q4_K"),
    ("blk.4.attn_v.weight", (256, 64), "q4_k_m", 8, "Q8_0"),
    ("blk.1.attn_q.weight", (256, 256), "q4_k_m", 8, "Q4_K"),
]


@pytest.mark.parametrize("name,shape,type,layers,want", TYPE_CASES)
def test_each_tensor_gets_the_ggml_type_its_rows_can_hold(name, shape, type, layers, want):
    from llmctl.core.export.gguf import ggml_type

    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    got = ggml_type(_item(name, shape, layer), type, layers)
    assert got == want
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[got]][0]
    assert shape[-1] % block == 0  # gguf's quantizer takes it


@pytest.mark.parametrize("tied", [True, False])
def test_q4_k_m_gives_a_tied_embedding_the_outputs_q6_k(tied):
    """llama.cpp's Q4_K_M: Q6_K for output.weight, or for token_embd.weight where there is no output.weight
    (the embedding is also the LM head); an untied embedding stays Q4_K."""
    import dataclasses

    import torch

    from llmctl.core.export.gguf import FAMILIES, ggml_type, plan
    from llmctl.core.model import ModelConfig

    cfg = ModelConfig(vocab_size=300, hidden_size=256, num_layers=8, num_heads=4, intermediate_size=512)
    cfg = dataclasses.replace(cfg, tie_embeddings=tied)
    tensors = {"model.embed_tokens.weight": torch.empty(300, 256), "lm_head.weight": torch.empty(300, 256),
               "model.layers.0.self_attn.q_proj.weight": torch.empty(256, 256)}
    types = {item.name: ggml_type(item, "q4_k_m", cfg.num_layers) for item in plan(tensors, cfg, FAMILIES["llama"])}
    assert types == ({"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K"} if tied else
                     {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K"})


# ------------------------------------------------------------------------------------- the header


def test_tensor_infos_give_gguf_readers_shapes_sizes_and_aligned_offsets(tmp_path):
    """Each type's header entry (ggml shape, byte size, offset on the file's 32-byte alignment) and
    data read back by gguf-py's reader, values as gguf-py's own quantizer makes them."""
    from llmctl.core.export.gguf import _add_tensor_info, quantize

    rng = np.random.default_rng(0)
    specs = [("a", (3, 40), "F32"), ("b", (5, 24), "F16"), ("c", (2, 3, 64), "Q8_0"), ("d", (7, 32), "Q4_0"),
             ("e", (3, 16), "BF16"), ("f", (2, 256), "Q6_K"), ("g", (1, 512), "Q4_K"), ("h", (5,), "F32")]
    data = {n: rng.standard_normal(shape).astype(np.float32) for n, shape, _ in specs}
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for n, shape, t in specs:
        _add_tensor_info(writer, _item(n, shape), t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, _, t in specs:
        writer.write_tensor_data(np.asarray(quantize(data[n], t)))
    writer.close()
    reader = gguf.GGUFReader(path)
    assert reader.alignment == gguf.GGUF_DEFAULT_ALIGNMENT == 32
    assert [t.name for t in reader.tensors] == [n for n, _, _ in specs]
    end = 0
    for t, (n, shape, type_name) in zip(reader.tensors, specs):
        qtype = gguf.GGMLQuantizationType[type_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert t.tensor_type == qtype
        assert list(t.shape) == list(reversed(shape))  # ggml's order: the row length first
        assert t.n_elements == int(np.prod(shape)) and t.n_bytes == int(np.prod(shape)) // block * size
        assert t.data_offset % 32 == 0 and t.data_offset >= end
        end = t.data_offset + t.n_bytes
        back = gguf.quants.dequantize(t.data, qtype).reshape(shape)
        if type_name in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
            ref = gguf.quants.dequantize(gguf.quants.quantize(data[n], qtype), qtype).reshape(shape)
            np.testing.assert_array_equal(back, ref)
        else:  # llmctl's own k-quant: within its error
            assert np.sqrt(((back - data[n]) ** 2).mean()) / data[n].std() < (0.03 if type_name == "Q6_K" else 0.1)
    assert reader.data_offset % 32 == 0 and path.stat().st_size == -(-end // 32) * 32  # offsets are absolute; the last tensor padded too


# ------------------------------------------------------------------------------------- whole exports


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny HF Llama (4 query heads, 2 key/value heads; rows of 32 and 64) with a byte-level BPE."""
    path = tmp_path_factory.mktemp("gguf-edges") / "tiny"
    path.mkdir()
    return tiny_llama(path, TEXTS, vocab=280, context=32)


def _hf_as_gguf(ckpt: Path) -> dict[str, np.ndarray]:
    """The HF tensors under gguf-py's names for them, q/k rows left in HF's order."""
    from safetensors.numpy import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    out = {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    return out


def _hf_order(name: str, w: np.ndarray, heads: int = 4, kv: int = 2) -> np.ndarray:
    """llama.cpp's q/k rows (rope pairs adjacent) back to HF's rotate-half order."""
    n = heads if ".attn_q." in name else kv if ".attn_k." in name else None
    if n is None:
        return w
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_a_q8_0_export_holds_gguf_quantized_hf_weights_and_reports_what_it_wrote(llama, tmp_path):
    from llmctl.core.export.gguf import GGUFExporter

    out, report = tmp_path / "m.gguf", Recorder()
    result = GGUFExporter().export(llama, out, type="q8_0", report=report)
    fields, tensors = _read(out)
    hf = _hf_as_gguf(llama)
    assert sorted(tensors) == sorted(hf)
    for name, t in tensors.items():
        want = hf[name].astype(np.float32)
        qtype = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == qtype, name
        back = _hf_order(name, gguf.quants.dequantize(t.data, qtype).reshape(want.shape))
        ref = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype).reshape(want.shape)
        np.testing.assert_array_equal(back, ref, err_msg=name)
    assert fields[K.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields[K.General.QUANTIZATION_VERSION] == gguf.GGML_QUANT_VERSION == 2
    assert fields[K.General.NAME] == "tiny"
    from tokenizers import Tokenizer

    n_tokens = Tokenizer.from_file(str(llama / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert result == {"output": str(out), "format": "gguf", "type": "q8_0", "architecture": "llama",
                      "model_type": "llama", "tensors": len(tensors),
                      "tensor_types": dict(Counter(t.tensor_type.name for t in tensors.values())),
                      "tokenizer": f"gpt2 (byte-level BPE), {n_tokens} tokens", "bytes": out.stat().st_size}
    assert report.bars == [["export", len(tensors), "tensor", len(tensors)]]
    assert report.infos == [] and report.warnings == []


def test_the_default_type_is_f16_and_an_existing_file_is_kept_without_force(llama, tmp_path, monkeypatch):
    from llmctl.core.export.gguf import GGUFExporter
    from llmctl.errors import LlmctlError

    monkeypatch.chdir(llama.parent)
    out = tmp_path / "m.gguf"
    result = GGUFExporter().export("tiny", out)  # a relative path: the name is its directory's
    fields, tensors = _read(out)
    assert result["type"] == "f16" and fields[K.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_F16
    assert fields[K.General.NAME] == "tiny"
    hf = _hf_as_gguf(llama)
    for name, t in tensors.items():
        want = hf[name].astype(np.float32)
        assert t.tensor_type.name == ("F32" if want.ndim == 1 else "F16")
        back = _hf_order(name, np.array(t.data, dtype=np.float32).reshape(want.shape))
        np.testing.assert_array_equal(back, want.astype(np.float16).astype(np.float32) if want.ndim > 1 else want)
    before = out.read_bytes()
    with pytest.raises(LlmctlError, match="force"):
        GGUFExporter().export(llama, out, type="f32")
    assert out.read_bytes() == before


def test_a_bfloat16_checkpoint_exports_its_exact_values(llama, tmp_path):
    """Weights stored as bfloat16 are widened to float32 (numpy has no bfloat16), every value kept."""
    from safetensors.torch import load_file, save_file

    from llmctl.core.export.gguf import GGUFExporter

    ckpt = tmp_path / "bf16"
    shutil.copytree(llama, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    GGUFExporter().export(ckpt, tmp_path / "m.gguf", type="f32")
    _, got = _read(tmp_path / "m.gguf")
    for name, t in got.items():
        src = {k: v.to(torch.bfloat16).float().numpy() for k, v in tensors.items()}
        want = _hf_as_gguf_from(src, config)[name]
        np.testing.assert_array_equal(_hf_order(name, np.array(t.data)), want, err_msg=name)


def _hf_as_gguf_from(hf: dict, config: dict) -> dict:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    return {names.get_name(n, try_suffixes=(".weight", ".bias")): t for n, t in hf.items()}


@pytest.mark.parametrize("type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"])
def test_a_quantized_checkpoint_warns_about_quantizing_twice_only_for_quantized_types(type, llama, tmp_path):
    from llmctl.core.export.gguf import GGUFExporter
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.quant.nf4 import NF4

    model, _ = load_model(llama, transforms=[NF4()])
    save_model(model, tmp_path / "nf4", tokenizer_dir=llama)
    report = Recorder()
    GGUFExporter().export(tmp_path / "nf4", tmp_path / "m.gguf", type=type, report=report)
    twice = " and re-quantized: quantizing twice loses more than quantizing the original once"
    assert report.warnings == [f"{tmp_path / 'nf4'} is quantized: its weights are dequantized"
                               f"{'' if type in ('f32', 'f16', 'bf16') else twice}"]
    assert report.infos == []


def _adapter(llama: Path, out: Path) -> Path:
    from llmctl.core.adapters import LoRA, save_adapter
    from llmctl.core.model.io import load_model

    model, _ = load_model(llama, transforms=[LoRA(r=2, target_modules=["v_proj"])])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.25)
    return save_adapter(model, out, base=llama)


def test_an_adapter_uses_its_own_tokenizer_or_else_its_bases(llama, tmp_path):
    """The base's tokenizer when the adapter directory has none; the adapter's own when it has one."""
    from llmctl.core.export.gguf import GGUFExporter

    adapter = _adapter(llama, tmp_path / "lora")
    assert not (adapter / "tokenizer.json").exists()
    report = Recorder()
    GGUFExporter().export(adapter, tmp_path / "a.gguf", type="f32", report=report)
    assert report.infos == ["merging the adapter into its base weights"] and report.warnings == []
    fields, _ = _read(tmp_path / "a.gguf")
    base = json.loads((llama / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.tokens"][2] == "<|pad|>" == next(t["content"] for t in base["added_tokens"]
                                                                  if t["id"] == 2)
    own = json.loads(json.dumps(base).replace("<|pad|>", "<|padding|>"))
    (adapter / "tokenizer.json").write_text(json.dumps(own))
    shutil.copy(llama / "tokenizer_config.json", adapter / "tokenizer_config.json")
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<|padding|>"}))
    GGUFExporter().export(adapter, tmp_path / "b.gguf", type="f32")
    fields, _ = _read(tmp_path / "b.gguf")
    assert fields["tokenizer.ggml.tokens"][2] == "<|padding|>"


def test_an_unknown_type_is_refused_by_name_before_anything_is_written(llama, tmp_path):
    from llmctl.core.export.gguf import GGUFExporter
    from llmctl.errors import UsageError

    with pytest.raises(UsageError) as e:
        GGUFExporter().export(llama, tmp_path / "m.gguf", type="q3_k")
    assert str(e.value) == "unknown GGUF type 'q3_k'; choose from: f16, f32, bf16, q8_0, q4_0, q4_k_m"
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_existing_gguf_file(llama, tmp_path):
    from llmctl.core.export.gguf import GGUFExporter

    out = tmp_path / "m.gguf"
    GGUFExporter().export(llama, out, type="q8_0")
    GGUFExporter().export(llama, out, type="f32", force=True)
    _, tensors = _read(out)
    assert {t.tensor_type.name for t in tensors.values()} == {"F32"}


def test_a_checkpoint_without_a_tokenizer_says_so_and_records_no_vocabulary(llama, tmp_path):
    """llama.cpp's `no_vocab` tokenizer model, a warning through the export's reporter, and no
    tokenizer in the result."""
    from llmctl.core.export.gguf import GGUFExporter

    ckpt = tmp_path / "bare"
    shutil.copytree(llama, ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).unlink()
    report = Recorder()
    result = GGUFExporter().export(ckpt, tmp_path / "m.gguf", type="f32", report=report)
    fields, _ = _read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "no_vocab" and result["tokenizer"] is None
    assert report.warnings == ["the checkpoint has no tokenizer: the GGUF file carries none (llama.cpp can then "
                               "only run token ids)"]


def test_starcoder2_without_biases_is_refused_by_name():
    """llama.cpp's starcoder2 graph requires every projection bias (it fails to load a use_bias=false file)."""
    from llmctl.core.export.gguf import family_of
    from llmctl.core.hf import config_from_hf
    from llmctl.errors import UsageError

    base = {"model_type": "starcoder2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48}
    assert family_of(config_from_hf(base))[1].arch == "starcoder2"
    with pytest.raises(UsageError, match=r"^cannot export this starcoder2 model to GGUF: llama.cpp's starcoder2 "
                                         r"requires the attention and MLP biases"):
        family_of(config_from_hf(dict(base, use_bias=False)))
