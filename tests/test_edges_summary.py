"""Round 10 edges: what `llmctl info` reads from a checkpoint (`core/summary.py`), in-process
and key by key: dimensions under other families' config keys, derived heads, per-layer sizes,
parameter counts of mixtures of experts, and the lineage fields."""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.core.checkpoint import append_metrics, open_checkpoint, save_checkpoint
from llmctl.core.summary import count_parameters, describe, positional_encoding


def _ck(tmp_path, config, tensors=None, **kwargs):
    tensors = tensors or {"h.0.attn.c_attn.weight": torch.zeros(3, 4), "wte.weight": torch.zeros(8, 4,
                                                                                              dtype=torch.float16),
                          "transformer.wpe.weight": torch.zeros(2, 4)}
    return open_checkpoint(save_checkpoint(tmp_path / "ck", tensors, config, **kwargs))


def test_gpt2_style_keys_and_derived_heads(tmp_path):
    data = describe(_ck(tmp_path, {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
                                   "n_layer": 3, "n_embd": 12, "n_inner": 48, "n_head": 6, "n_positions": 256,
                                   "multi_query": True, "vocab_size": 8, "num_layers": None}))
    assert (data["layers"], data["hidden_size"], data["intermediate_size"], data["heads"]) == (3, 12, 48, 6)
    assert (data["kv_heads"], data["head_dim"], data["context_length"]) == (1, 2, 256)  # MQA; 12 / 6
    assert type(data["head_dim"]) is int
    assert data["architecture"] == "GPTBigCodeForCausalLM" and data["model_type"] == "gpt_bigcode"
    assert data["dtypes"] == {"float32": 12 + 8, "float16": 32} and data["tensors"] == 3
    assert data["parameters"] == {"total": 52, "active": None}
    assert data["position"] == {"type": "learned"}  # from the tensor names
    assert data["num_experts"] is None and data["experts_per_token"] is None
    assert (data["quantization"], data["transforms"], data["sparsity"]) == (None, [], None)
    import llmctl

    assert data["lineage"]["llmctl_version"] == llmctl.__version__
    assert data["lineage"]["command"] is None and data["lineage"]["created"]  # save_checkpoint's own record
    (tmp_path / "ck" / "llmctl.json").unlink()
    assert describe(open_checkpoint(tmp_path / "ck"))["lineage"] is None  # a foreign checkpoint
    (tmp_path / "ck" / "llmctl.json").write_text('{"command": "train"}')
    assert describe(open_checkpoint(tmp_path / "ck"))["lineage"]["parents"] == []


def test_explicit_heads_head_dim_and_per_layer_sizes(tmp_path):
    data = describe(_ck(tmp_path, {"model_type": "llmctl", "num_layers": 2, "hidden_size": 16, "num_heads": 4,
                                   "head_dim": 8, "layer_num_heads": [4, 2], "layer_num_kv_heads": [2, 1],
                                   "layer_intermediate_sizes": [32, 24], "intermediate_size": 40,
                                   "quantization_config": {"quant_method": "compressed-tensors"}},
                        lineage={"command": "prune", "sparsity": {"method": "heads"}, "transforms": [{"lora": {}}]}))
    assert (data["heads"], data["kv_heads"], data["intermediate_size"]) == ([4, 2], [2, 1], [32, 24])
    assert data["head_dim"] == 8  # given, not hidden / heads
    assert data["quantization"] == {"quant_method": "compressed-tensors"}  # from config.json when lineage has none
    assert data["sparsity"] == {"method": "heads"} and data["transforms"] == [{"lora": {}}]
    assert data["lineage"]["command"] == "prune" and data["lineage"]["parents"] == []
    assert data["lineage"]["merge_method"] is None and data["metrics"] == 0


def test_heads_without_kv_heads_mean_multi_head_attention(tmp_path):
    data = describe(_ck(tmp_path, {"model_type": "gpt2", "n_head": 4, "n_embd": 16, "multi_query": False}))
    assert (data["heads"], data["kv_heads"], data["head_dim"]) == (4, 4, 4)


def test_a_mixture_of_experts_counts_its_active_parameters(tmp_path):
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.mlp.experts.0.w1.weight": torch.zeros(4, 4),
               "model.layers.0.mlp.experts.1.w1.weight": torch.zeros(4, 4),
               "model.layers.0.mlp.experts.2.w1.weight": torch.zeros(4, 4),
               "model.layers.0.mlp.experts.3.w1.weight": torch.zeros(4, 4)}
    data = describe(_ck(tmp_path, {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
                        tensors))
    assert data["parameters"] == {"total": 32 + 64, "active": 32 + 32}
    assert (data["num_experts"], data["experts_per_token"]) == (4, 2)


def test_no_heads_means_no_derived_dimensions(tmp_path):
    data = describe(_ck(tmp_path, {"model_type": "mamba", "hidden_size": 16}, {"w": torch.zeros(2)}))
    assert (data["heads"], data["kv_heads"], data["head_dim"]) == (None, None, None)
    assert data["position"] == {"type": "unknown"}


def test_files_tokenizer_template_and_metrics(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": ""}))
    ck = _ck(tmp_path, {"model_type": "llama", "num_hidden_layers": 1}, tokenizer_dir=tok,
             lineage={"command": "merge", "merge_method": "slerp"})
    append_metrics(ck.path, {"task": "a"})
    append_metrics(ck.path, {"task": "b"})
    data = describe(open_checkpoint(ck.path))
    assert data["tokenizer"] is True and data["chat_template"] is False  # an empty template is none
    assert data["lineage"]["merge_method"] == "slerp" and data["metrics"] == 2
    files = [p for p in ck.path.rglob("*") if p.is_file()]
    assert data["disk_bytes"] == sum(p.stat().st_size for p in files) > data["size_bytes"] > 0
    assert data["shards"] == ["model.safetensors"] and data["format"] == "safetensors"
    assert data["path"] == str(ck.path)
    (ck.path / "chat_template.jinja").write_text("{{ messages }}")
    assert describe(open_checkpoint(ck.path))["chat_template"] is True


@pytest.mark.parametrize("num_experts, per_token, active", [(4, 2, 104 - 64 + 32), (3, 1, 104 - 64 + 21),
                                                            (4, None, None), (None, 2, None), (0, 2, None)])
def test_active_parameters_count_the_routed_experts_only(num_experts, per_token, active):
    shapes = {"embed.weight": ((4, 5), "F32"), "layers.0.mlp.experts.0.w1": ((4, 8), "F32"),
              "layers.0.mlp.experts.1.w1": ((4, 8), "F32"), "layers.0.mlp.shared_expert.w1": ((2, 8), "F32"),
              "layers.0.mlp.shared_experts.w1": ((2, 2), "F32")}  # shared experts are always active
    assert count_parameters(shapes, num_experts, per_token) == {"total": 104, "active": active}
    assert count_parameters({"w": ((2, 3), "F32")}, 8, 2) == {"total": 6, "active": None}  # no routed experts


def test_rope_details_from_the_nested_parameters_and_older_keys():
    assert positional_encoding({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                           "rope_theta": 1e6,
                                                                           "partial_rotary_factor": 0.5}}) == {
        "type": "rope", "theta": 1e6, "scaling": {"rope_type": "yarn", "factor": 4.0}, "partial_rotary_factor": 0.5}
    assert positional_encoding({"model_type": "gpt_neox", "rotary_emb_base": 20000, "rotary_pct": 0.25}) == {
        "type": "rope", "theta": 20000.0, "scaling": None, "partial_rotary_factor": 0.25}
    assert positional_encoding({"model_type": "phi", "partial_rotary_factor": 1.0}) == {
        "type": "rope", "theta": 10000.0, "scaling": None}
    assert positional_encoding({"model_type": "x", "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}) \
        == {"type": "rope", "theta": 5.0, "scaling": None}
    assert positional_encoding({"model_type": "x", "position": 3, "alibi": True}) == {"type": "alibi"}
    assert positional_encoding({"model_type": "x", "rope_parameters": {"rope_theta": 7.0, "extra": 1}}) == {
        "type": "rope", "theta": 7.0, "scaling": None}  # no rope_type: the default, not a scaling
    assert positional_encoding({"model_type": "x", "rope_theta": 7.0, "partial_rotary_factor": 0.5}) == {
        "type": "rope", "theta": 7.0, "scaling": None, "partial_rotary_factor": 0.5}
    for key, value in (("rope_theta", 3.0), ("rope_scaling", {"type": "linear", "factor": 2.0}),
                       ("rotary_emb_base", 3.0), ("rotary_pct", 0.5)):  # a family we do not know, with rope keys
        assert positional_encoding({"model_type": "custom", key: value})["type"] == "rope", key
    assert positional_encoding({"model_type": "custom"}) == {"type": "unknown"}


def test_gemma3_rope_per_layer_type():
    """Gemma 3's rope_parameters per layer type: the full layers' theta and scaling, the sliding layers' theta."""
    full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    config = {"model_type": "gemma3_text", "rope_parameters": {"full_attention": full,
                                                               "sliding_attention": {"rope_theta": 1e4}}}
    assert positional_encoding(config) == {"type": "rope", "theta": 1e6, "local_theta": 1e4,
                                           "scaling": {"rope_type": "linear", "factor": 8.0}}
    legacy = {"model_type": "gemma3_text", "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert positional_encoding(legacy) == {"type": "rope", "theta": 1e6, "scaling": None, "local_theta": 1e4}
