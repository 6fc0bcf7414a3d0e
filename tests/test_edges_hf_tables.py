"""The per-architecture tables of `core/hf.py` (the codecs built at import) against transformers.

Each test reads or writes a config.json and checks it against transformers' own config classes:
their defaults, the keys a transformers-4 reader expects, and the exact errors for what llmctl
refuses.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from test_edges_hf import FAMILIES, SIZES, sizes, transformers_config
from test_hf_parity import VOCAB, ours_logits

from llmctl.core.hf import config_from_hf, config_to_hf
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.model.io import load_model, save_model
from llmctl.errors import CheckpointError

DECODERS = [t for t in FAMILIES if t not in ("gpt2", "bert")]


def test_an_omitted_llama_context_length_is_transformers_default():
    ours = config_from_hf({"model_type": "llama", **SIZES})
    assert ours.max_seq_len == transformers.LlamaConfig(**SIZES).max_position_embeddings == 2048


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_written_rope_theta_is_read_by_a_transformers_4_style_reader(model_type):
    """config.json keeps rope_theta at the top level too: a reader that ignores rope_parameters finds it."""
    cfg = config_from_hf(transformers_config(model_type, **sizes(model_type), rope_theta=321.0))
    written = config_to_hf(cfg)
    assert written["rope_theta"] == 321.0
    legacy = {k: v for k, v in written.items() if k not in ("rope_parameters", "model_type", "architectures")}
    reread = getattr(transformers, FAMILIES[model_type] + "Config")(**legacy)
    assert reread.rope_parameters["rope_theta"] == 321.0


def test_a_partial_rotary_factor_is_refused_with_the_exact_message():
    base = {"model_type": "llama", **SIZES, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}
    with pytest.raises(CheckpointError, match=r"^config.json: partial_rotary_factor is not supported$"):
        config_from_hf(base)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_legacy_qwen_config_with_the_window_switched_off_has_no_window(model_type):
    """Released Qwen2 files say use_sliding_window: false beside a sliding_window size and no layer_types."""
    legacy = dict(sizes(model_type), num_hidden_layers=3, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=0)
    theirs = getattr(transformers, FAMILIES[model_type] + "Config")(**legacy)
    assert theirs.layer_types == ["full_attention"] * 3
    assert config_from_hf({"model_type": model_type, **legacy}).sliding_window is None


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_legacy_qwen_config_without_max_window_layers_reads_as_transformers_does(model_type):
    legacy = dict(sizes(model_type), num_hidden_layers=3, use_sliding_window=True, sliding_window=5)
    theirs = getattr(transformers, FAMILIES[model_type] + "Config")(**legacy)
    assert theirs.layer_types == ["full_attention"] * 3  # transformers' max_window_layers default is past layer 3
    assert config_from_hf({"model_type": model_type, **legacy}).sliding_window is None


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_written_qwen_window_reads_the_same_without_layer_types(model_type):
    """A reader that derives the layers from use_sliding_window / max_window_layers slides on every layer."""
    cfg = config_from_hf(transformers_config(model_type, **dict(sizes(model_type), num_hidden_layers=3),
                                             use_sliding_window=True, sliding_window=5, max_window_layers=0))
    legacy = {k: v for k, v in config_to_hf(cfg).items() if k not in ("layer_types", "model_type", "architectures")}
    reread = getattr(transformers, FAMILIES[model_type] + "Config")(**legacy)
    assert reread.layer_types == ["sliding_attention"] * 3 and reread.sliding_window == 5


def test_a_classifier_config_with_num_labels_and_no_label_names_has_that_many_labels():
    given = dict(SIZES, num_key_value_heads=2, num_labels=3)
    assert transformers.LlamaConfig(**given).num_labels == 3
    cfg = config_from_hf({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"], **given})
    assert cfg.num_labels == 3



@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_legacy_qwen_config_that_slides_past_transformers_default_layer_is_refused(model_type):
    """Without max_window_layers transformers slides from layer 28 on: with 29 layers, only the last slides."""
    legacy = dict(sizes(model_type), num_hidden_layers=29, use_sliding_window=True, sliding_window=5)
    theirs = getattr(transformers, FAMILIES[model_type] + "Config")(**legacy)
    assert theirs.layer_types == ["full_attention"] * 28 + ["sliding_attention"]
    with pytest.raises(CheckpointError, match="^config.json: sliding window on only some layers is not supported$"):
        config_from_hf({"model_type": model_type, **legacy})


def test_a_fused_module_names_the_modules_it_fuses():
    from test_transforms import Lora

    from llmctl.core.hf import tensors_to_hf
    from llmctl.core.model.build import build_model

    cfg = config_from_hf({"model_type": "gpt2", **sizes("gpt2")})
    fused = ", ".join(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    with pytest.raises(CheckpointError, match=rf": transformer.h.0.attn.c_attn fuses {fused}, which cannot carry"):
        tensors_to_hf(build_model(cfg, [Lora(target_modules=["q_proj"])], device="meta"))


def test_an_llmctl_checkpoint_loads_back_bit_for_bit(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                      position="alibi")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    again, _ = load_model(save_model(model, tmp_path / "alibi", lineage={"command": "test"}))
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(ours_logits(again, ids), ours_logits(model, ids))


def test_a_quantized_module_keeps_a_one_word_suffix_under_the_hf_module(tmp_path):
    """An int8 q_proj's `weight_scale` sits beside its weight under Llama's name, and loads back."""
    from safetensors import safe_open
    from test_transforms import Int8

    base = ModelConfig.from_dict(config_from_hf({"model_type": "llama", **SIZES}).to_dict())
    torch.manual_seed(0)
    model, _ = load_model(save_model(Transformer(base), tmp_path / "base", lineage={"command": "test"}),
                          transforms=[Int8()])
    out = save_model(model, tmp_path / "int8", lineage={"command": "test"})
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "model.layers.1.self_attn.q_proj.weight_scale" in f.keys()
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(ours_logits(load_model(out)[0], ids), ours_logits(model, ids))


def test_a_transformed_bert_with_its_base_prefix_loads_back(tmp_path):
    from test_transforms import Lora

    model, _ = load_model(save_model(Transformer(config_from_hf({"model_type": "bert", **sizes("bert")})),
                                     tmp_path / "bert", lineage={"command": "test"}),
                          transforms=[Lora(target_modules=["q_proj"])])
    out = save_model(model, tmp_path / "lora", lineage={"command": "test"})
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(ours_logits(load_model(out)[0], ids), ours_logits(model, ids))
