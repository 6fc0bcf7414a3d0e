"""`llmctl info`: JSON shape, HF and llmctl directories, MoE active parameters, no torch import."""

import json
import subprocess
import sys

import pytest
import torch

from llmctl.core.checkpoint import append_metrics, save_checkpoint
from llmctl.core.summary import positional_encoding

KEYS = {
    "path", "architecture", "model_type", "parameters", "layers", "hidden_size", "intermediate_size", "heads",
    "kv_heads", "head_dim", "vocab_size", "context_length", "num_experts", "experts_per_token", "position",
    "dtypes", "tensors", "format", "size_bytes", "disk_bytes", "shards", "tokenizer", "chat_template", "lineage",
    "quantization", "sparsity", "transforms", "metrics",
}


@pytest.fixture
def ours(tmp_path):
    """A tiny llmctl-format checkpoint with a parent, a tokenizer, quantization facts and metrics."""
    config = {"model_type": "llmctl", "num_layers": 2, "hidden_size": 16, "num_heads": 4, "num_kv_heads": 2,
              "vocab_size": 32, "max_seq_len": 64, "position": "rope", "rope_theta": 500000.0}
    tensors = {"model.embed_tokens.weight": torch.zeros(32, 16, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(16)}
    parent = save_checkpoint(tmp_path / "parent", tensors, config, lineage={"command": "train"})
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    out = save_checkpoint(tmp_path / "ck", tensors, config, tokenizer_dir=tok, max_shard_bytes=600,
                          lineage={"command": "quantize", "parents": [parent],
                                   "quantization": {"method": "int8", "group_size": 64}})
    append_metrics(out, {"task": "perplexity", "ppl": 9.9})
    return out


def test_info_json_on_llmctl_checkpoint(llmctl, ours):
    result = llmctl("info", ours, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == KEYS
    assert data["parameters"] == {"total": 32 * 16 + 16, "active": None}
    assert (data["layers"], data["heads"], data["kv_heads"], data["head_dim"]) == (2, 4, 2, 4)
    assert (data["vocab_size"], data["context_length"]) == (32, 64)
    assert data["position"] == {"type": "rope", "theta": 500000.0, "scaling": None}
    assert data["dtypes"] == {"bfloat16": 512, "float32": 16}
    assert len(data["shards"]) == 2 and data["format"] == "safetensors"
    assert data["tokenizer"] is True and data["chat_template"] is True
    assert data["lineage"]["command"] == "quantize" and data["lineage"]["created"]
    assert [len(p["hash"]) for p in data["lineage"]["parents"]] == [64]
    assert data["quantization"] == {"method": "int8", "group_size": 64}
    assert data["sparsity"] is None and data["metrics"] == 1


def test_info_human_table_on_stderr(llmctl, ours):
    result = llmctl("info", ours)
    assert result.code == 0 and result.stdout == ""
    for text in ("parameters", "rope (theta=500000)", "int8", "quantize", "2 safetensors"):
        assert text in result.stderr


def test_info_on_hf_directories(llmctl, tmp_path):
    import transformers
    moe = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    transformers.MixtralForCausalLM(moe).save_pretrained(tmp_path / "mixtral")
    data = llmctl("info", tmp_path / "mixtral", "--json").json()
    total = sum(p.numel() for p in transformers.MixtralForCausalLM(moe).parameters())
    per_expert = 3 * 16 * 32
    assert data["parameters"] == {"total": total, "active": total - 2 * (4 - 2) * per_expert}
    assert data["architecture"] == "MixtralForCausalLM" and data["lineage"] is None
    assert (data["num_experts"], data["experts_per_token"], data["kv_heads"]) == (4, 2, 2)
    assert data["position"]["type"] == "rope" and data["context_length"] == 128

    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    data = llmctl("info", tmp_path / "gpt2", "--json").json()
    assert data["position"] == {"type": "learned"}
    assert (data["layers"], data["heads"], data["kv_heads"], data["hidden_size"]) == (2, 2, 2, 16)
    assert data["tokenizer"] is False and data["metrics"] == 0
    append_metrics(tmp_path / "gpt2", {"task": "perplexity", "ppl": 9.9})  # what `eval` records on a foreign checkpoint
    from llmctl.commands.info import _rows
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.summary import describe

    assert ["created by", "not recorded (made elsewhere; llmctl.json holds no lineage)"] in _rows(
        describe(open_checkpoint(tmp_path / "gpt2")))  # not "llmctl ? at ?"


def test_info_errors(llmctl, tmp_path):
    result = llmctl("info", tmp_path / "nope")
    assert result.code == 2 and "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "file.txt").write_text("x")
    assert llmctl("info", tmp_path / "file.txt").code == 2
    (tmp_path / "empty").mkdir()
    result = llmctl("info", tmp_path / "empty")
    assert result.code == 1 and "config.json" in result.stderr


def test_info_does_not_import_torch(ours):
    code = (
        "import sys; from llmctl.cli import main; code = main(['info', sys.argv[1], '--json']); "
        "heavy = [m for m in ('torch', 'numpy', 'safetensors', 'transformers') if m in sys.modules]; "
        "assert code == 0 and not heavy, (code, heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ours)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 2


@pytest.mark.parametrize("config, names, expected", [
    ({"model_type": "t5", "relative_attention_num_buckets": 32}, [], {"type": "relative_bias", "buckets": 32}),
    ({"model_type": "bloom"}, [], {"type": "alibi"}),
    ({"model_type": "mpt", "attn_config": {"alibi": True}}, ["transformer.wpe.weight"], {"type": "alibi"}),
    ({"model_type": "llmctl", "position": "sinusoidal"}, [], {"type": "sinusoidal"}),
    ({"model_type": "opt"}, ["model.decoder.embed_positions.weight"], {"type": "learned"}),
    ({"model_type": "llama"}, [], {"type": "rope", "theta": 10000.0, "scaling": None}),
    ({"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, [],
     {"type": "rope", "theta": 5e5, "scaling": {"rope_type": "linear", "factor": 2.0}}),
    ({"model_type": "qwen3", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, [],
     {"type": "rope", "theta": 1e6, "scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ({"model_type": "gpt_neox", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.25}}, [],
     {"type": "rope", "theta": 1e4, "scaling": None, "partial_rotary_factor": 0.25}),
    ({"model_type": "something"}, [], {"type": "unknown"}),
])
def test_positional_encoding(config, names, expected):
    assert positional_encoding(config, names) == expected
