"""Edges of the configuration and wiring modules found by mutation testing: `ModelConfig`'s
derived sizes (transformers' own rules) and every refusal, `layer(i)` and the architecture
views; `build_model`; training plans (`core/train/build.py`) and the settings they route to
the model; the quantize and prune runs (`core/quant/run.py`, `core/prune/run.py`)."""

from __future__ import annotations

import re

import pytest
import torch

from llmctl.core.model.config import ModelConfig
from llmctl.errors import ConfigError


def _refused(message: str, **fields) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        ModelConfig(**fields)


# --- ModelConfig -----------------------------------------------------------------------------------


def test_unset_sizes_follow_the_transformers_defaults():
    """None kv heads → MHA and head_dim = hidden // heads (LlamaConfig); intermediate → 4 × hidden
    (GPT-2's n_inner); an MoE's expert width → the dense width."""
    import transformers

    llama = transformers.LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=None)
    cfg = ModelConfig(hidden_size=48, num_heads=6)
    assert (cfg.num_kv_heads, cfg.head_dim) == (llama.num_key_value_heads, llama.head_dim) == (6, 8)
    assert cfg.intermediate_size == 4 * 48 and cfg.moe_intermediate_size is None  # no experts: left unset
    moe = ModelConfig(hidden_size=48, num_heads=6, intermediate_size=40, num_experts=4)
    assert moe.moe_intermediate_size == 40
    assert ModelConfig(num_experts=4, intermediate_size=40, moe_intermediate_size=24).moe_intermediate_size == 24
    given = ModelConfig(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16, intermediate_size=100)
    assert (given.num_kv_heads, given.head_dim, given.intermediate_size) == (2, 16, 100)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_kv_heads",
                                 "head_dim", "intermediate_size"])
def test_every_size_is_bounded_to_1_through_2_to_the_31(key):
    base = dict(hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16, position="nope")
    for bad in (0, -1, 1 << 31):
        _refused(f"{key} must be in 1 … 2^31, got {bad}", **{**base, key: bad})
    top = (1 << 31) - 1
    if key in ("hidden_size", "num_heads", "num_kv_heads", "num_layers"):  # sizes the rules need real (layers: above)
        return
    assert getattr(ModelConfig(**{**base, key: top}), key) == top
    assert getattr(ModelConfig(**{**base, key: 1}), key) == 1


def test_a_deep_config_builds_no_list_per_layer():
    """Without per-layer sizes nothing is checked layer by layer: a config with 2^31 − 1 layers is
    made at once (it built two lists of num_layers entries: 16 GiB there, 80 MB for 10^7)."""
    import tracemalloc

    tracemalloc.start()
    try:
        cfg = ModelConfig(num_layers=10**7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cfg.num_layers == 10**7 and peak < 1 << 20


def test_each_refusal_names_its_sizes():
    _refused("hidden_size 50 is not divisible by num_heads 4; set head_dim", hidden_size=50)
    assert ModelConfig(hidden_size=50, head_dim=12).head_dim == 12  # an explicit head_dim is not checked against it
    _refused("num_heads 6 is not a multiple of num_kv_heads 4", hidden_size=48, num_heads=6, num_kv_heads=4)
    assert ModelConfig(hidden_size=48, num_heads=6, num_kv_heads=3).num_kv_heads == 3
    for k in (0, 5):
        _refused(f"experts_per_token {k} must be in 1..num_experts 4", num_experts=4, experts_per_token=k)
    assert ModelConfig(num_experts=4, experts_per_token=4).experts_per_token == 4
    assert ModelConfig(num_experts=0, experts_per_token=9).experts_per_token == 9  # dense: not used
    _refused("rope needs an even head_dim, got 15", head_dim=15)
    assert ModelConfig(head_dim=15, position="alibi").head_dim == 15
    _refused("sliding_window must be >= 1, got 0", sliding_window=0)
    assert ModelConfig(sliding_window=1).sliding_window == 1
    classifier = ("num_labels {}: a classifier needs num_labels >= 1 and its own score head (tie_embeddings false)")
    _refused(classifier.format(0), num_labels=0, tie_embeddings=False)
    _refused(classifier.format(2), num_labels=2)
    assert ModelConfig(num_labels=1, tie_embeddings=False).num_labels == 1
    _refused("multi-token-prediction heads need a causal model", is_causal=False, num_mtp_heads=1)
    assert ModelConfig(is_causal=False).num_mtp_heads == 0 and ModelConfig(num_mtp_heads=2).num_mtp_heads == 2


def test_per_layer_sizes_are_one_per_layer_and_keep_the_grouping():
    for key in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes"):
        for sizes in ([4], [4, 4, 4], [4, 0], [4, 1 << 31]):
            _refused(f"{key} must hold 2 sizes (one per layer) in 1 … 2^31, got {sizes}", num_kv_heads=1,
                     **{key: sizes})
    _refused("a layer's 3 heads are not a multiple of its 2 kv heads", num_kv_heads=1, layer_num_heads=[4, 3],
             layer_num_kv_heads=[2, 2])
    _refused("a layer's 3 heads are not a multiple of its 2 kv heads", num_kv_heads=2, layer_num_heads=[4, 3])
    _refused("a layer's 4 heads are not a multiple of its 3 kv heads", num_kv_heads=1, layer_num_kv_heads=[1, 3])
    cfg = ModelConfig(num_kv_heads=2, layer_num_heads=[4, 2], layer_num_kv_heads=[2, 1],
                      layer_intermediate_sizes=[(1 << 31) - 1, 7])
    first, second = cfg.layer(0), cfg.layer(1)
    assert (first.num_heads, first.num_kv_heads, first.intermediate_size) == (4, 2, (1 << 31) - 1)
    assert (second.num_heads, second.num_kv_heads, second.intermediate_size) == (2, 1, 7)
    assert (second.layer_num_heads, second.layer_num_kv_heads, second.layer_intermediate_sizes) == (None, None, None)
    assert second.hidden_size == cfg.hidden_size and second.head_dim == cfg.head_dim
    only = ModelConfig(layer_intermediate_sizes=[8, 9])
    assert (only.layer(1).intermediate_size, only.layer(1).num_heads, only.layer(1).num_kv_heads) == (9, 4, 4)
    plain = ModelConfig()
    assert plain.layer(1) is plain


def test_the_architecture_leaves_out_the_run_time_knobs_and_a_rotary_context():
    from dataclasses import fields

    cfg = ModelConfig(max_seq_len=128, rope_scaling={"rope_type": "linear", "factor": 2.0})
    runtime = {"attention_kernel", "embedding_dropout", "attention_dropout", "residual_dropout",
               "gradient_checkpointing", "initializer_range", "mtp_loss_weight", "router_aux_loss_coef"}
    everything = {f.name for f in fields(ModelConfig)}
    assert set(cfg.architecture()) == everything - runtime
    assert cfg.architecture()["max_seq_len"] == 128 and cfg.architecture()["hidden_size"] == 64
    assert set(cfg.weights_architecture()) == everything - runtime - {"max_seq_len", "rope_scaling"}
    learned = ModelConfig(position="learned", max_seq_len=128)
    assert learned.weights_architecture() == learned.architecture()  # a learned table has max_seq_len rows
    assert ModelConfig(max_seq_len=512, attention_dropout=0.1).weights_architecture() == \
        ModelConfig(max_seq_len=64).weights_architecture()


def test_a_config_round_trips_through_a_dict_and_refuses_unknown_keys():
    cfg = ModelConfig(num_layers=3, num_kv_heads=2, layer_num_heads=[4, 2, 4], eos_token_id=[1, 2])
    data = cfg.to_dict()
    assert data["layer_num_heads"] == [4, 2, 4] and data["num_kv_heads"] == 2 and data["head_dim"] == 16
    again = ModelConfig.from_dict(data)
    assert again == cfg
    data["layer_num_heads"].append(9)
    assert cfg.layer_num_heads == [4, 2, 4]  # from_dict and to_dict share no lists with the config
    with pytest.raises(ConfigError, match=r"^unknown config key 'num_head' \(did you mean 'num_heads'\?\)$"):
        ModelConfig.from_dict({"num_head": 4})


def test_presets_load_by_name_or_path_with_overrides(tmp_path):
    from llmctl.core.model.presets import load_preset

    nano = load_preset("nano")
    assert (nano.hidden_size, nano.num_kv_heads, nano.intermediate_size) == (64, 2, 192)
    assert load_preset("nano", ["num_layers=3", "position=alibi"]).num_layers == 3
    path = tmp_path / "mine.yaml"
    path.write_text("hidden_size: 32\nnum_heads: 2\n")
    mine = load_preset(path, ["vocab_size=99"])
    assert (mine.hidden_size, mine.num_heads, mine.vocab_size, mine.head_dim) == (32, 2, 99, 16)
    with pytest.raises(ConfigError, match="did you mean 'nano'"):
        load_preset("nanoo")


def test_build_model_applies_transforms_in_order_on_the_device_asked():
    from llmctl.core.model.build import build_model
    from llmctl.core.model.transforms import Transform

    seen = []

    class Mark(Transform):
        def __init__(self, tag):
            self.tag = tag

        def apply(self, model):
            seen.append((self.tag, model.model.embed_tokens.weight.device.type))
            return model

    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=16)
    meta = build_model(cfg, [Mark("a"), Mark("b")], device="meta")
    assert seen == [("a", "meta"), ("b", "meta")]
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    again = build_model(cfg, device="cpu")
    assert {p.device.type for p in plain.parameters()} == {"cpu"} and plain.cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))
