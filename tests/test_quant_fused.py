"""Quantized checkpoints of architectures whose Hugging Face projections fuse several of ours
(Phi-3's `qkv_proj` / `gate_up_proj`, GPT-NeoX's head-interleaved `query_key_value`): written as one
pack-quantized module each, as llm-compressor writes them, so transformers (compressed-tensors)
loads them with llmctl's logits, and read back into our parts exactly."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from conftest import logits_of, save_hf  # noqa: E402
from llmctl.core.model.io import load_model, save_model  # noqa: E402
from llmctl.core.quant.linear import PackedLinear, PackQuantized  # noqa: E402

BASES = {
    "phi3": transformers.Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": transformers.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                           tie_word_embeddings=False),
}
IDS = torch.tensor([[5, 17, 42, 7, 90, 3, 50, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
SCHEMES = {"int8": dict(bits=8), "int4-g32": dict(bits=4, group_size=32), "int4-g32-asym": dict(bits=4, group_size=32,
                                                                                                 symmetric=False)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {name: save_hf(tmp_path_factory.mktemp(name), config) for name, config in BASES.items()}


def _logits(model):
    return logits_of(model, IDS)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", BASES)
def test_a_quantized_fused_projection_is_one_module_that_transformers_loads(bases, tmp_path, arch, scheme):
    model, _ = load_model(bases[arch], transforms=[PackQuantized(**SCHEMES[scheme])])
    out = save_model(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch  # not llmctl's own type
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    fused = "model.layers.0.self_attn.qkv_proj" if arch == "phi3" else "gpt_neox.layers.0.attention.query_key_value"
    assert f"{fused}.weight_packed" in names and not any(".q_proj." in n for n in names)
    ours = _logits(model)
    reloaded, _ = load_model(out)
    assert isinstance(reloaded.model.layers[0].self_attn.k_proj, PackedLinear)
    assert torch.equal(_logits(reloaded), ours)  # our parts back, bit for bit
    if SCHEMES[scheme].get("symmetric", True):  # transformers 5 sizes asymmetric zero points unpacked: see below
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert (_logits(theirs) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("arch", BASES)
def test_fused_asymmetric_tensors_decompress_as_compressed_tensors_does(bases, tmp_path, arch):
    """The joined zero points (packed along the rows) and scales give compressed-tensors' own
    dequantization of the fused weight: our parts' weights in the fused row order."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    from llmctl.core.hf import join_rows, module_groups

    model, _ = load_model(bases[arch], transforms=[PackQuantized(bits=4, group_size=32, symmetric=False)])
    out = save_model(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False,
                                                                             strategy="group", group_size=32))
    fused = {theirs: group for theirs, group in module_groups(model.cfg).items() if len(group[1]) > 1}
    assert fused
    for theirs, (rule, parts) in fused.items():
        state = {k: tensors[f"{theirs}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                       "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        expected = join_rows(rule, [model.get_submodule(p).dequantize() for p in parts], model.cfg.head_dim)
        assert torch.equal(weight, expected), theirs


def test_parts_quantized_apart_fall_back_to_llmctl_and_reload(bases, tmp_path, capsys):
    """q in float beside a quantized k and v cannot be one Phi-3 `qkv_proj`: llmctl's own type, said."""
    model, _ = load_model(bases["phi3"], transforms=[PackQuantized(bits=8, ignore=["re:.*q_proj$", "lm_head"])])
    out = save_model(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmctl"
    said = " ".join(capsys.readouterr().err.split())
    assert "warning: transformers cannot load this checkpoint: tensor 'model.layers.0.self_attn.k_proj." in said
    assert "qkv_proj fuses" in said
    assert torch.equal(_logits(load_model(out)[0]), _logits(model))


def test_an_hf_fused_name_in_ignore_keeps_every_part_in_float(bases, tmp_path):
    model, _ = load_model(bases["phi3"], transforms=[PackQuantized(bits=8, ignore=["re:.*qkv_proj$", "lm_head"])])
    attention = model.model.layers[1].self_attn
    assert all(type(getattr(attention, f"{p}_proj")) is torch.nn.Linear for p in "qkv")
    assert isinstance(attention.o_proj, PackedLinear)
    out = save_model(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (_logits(theirs) - _logits(model)).abs().max() < 1e-5


def test_a_fused_quantized_tensor_of_the_wrong_height_is_named(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmctl.errors import CheckpointError

    model, _ = load_model(bases["phi3"], transforms=[PackQuantized(bits=8)])
    out = save_model(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.gate_up_proj.weight_scale"
    tensors[key] = tensors[key][1:]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"gate_up_proj: a fused quantized module's weight_scale has shape \[191, 1\], its parts' \[\[96, 1\], \[96, 1\]\]"):
        load_model(out)
