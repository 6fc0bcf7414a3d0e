"""The per-architecture tables of `core/hf.py` (the codecs built at import) against transformers.

Each test reads or writes a config.json and checks it against transformers' own config classes:
their defaults, the keys a transformers-4 reader expects, and the exact errors for what llmctl
refuses.
"""

from __future__ import annotations

import pytest
import transformers

from test_edges_hf import FAMILIES, SIZES, sizes, transformers_config

from llmctl.core.hf import config_from_hf, config_to_hf
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
