"""Audit fixes for `quantize` and `prune`: MoE routers kept in floating point (and named in the
written `ignore`, so transformers + compressed-tensors gives our logits), a checkpoint's
`ignore` read against its Hugging Face module names, tokenizers without tokenizer.json carried
over, NF4's fixed grid and `re:` ignore entries, corrupt quantization records as CheckpointError,
and the input size of a `.bin` checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

import compressed_tensors  # noqa: F401  (a dev requirement: transformers reads our files through it)
import torch
import transformers
from torch import nn

from conftest import tiny_llama
from llmctl.core.model.io import load_model  # noqa: E402
from llmctl.core.quant.config import QuantizeConfig  # noqa: E402
from llmctl.core.quant.linear import PackedLinear  # noqa: E402
from llmctl.core.quant.methods import quantize_model  # noqa: E402
from llmctl.core.quant.run import run_quantize  # noqa: E402
from llmctl.errors import CheckpointError  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds.\n"
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _hf_moe(out, kind: str):
    torch.manual_seed(0)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                           **COMMON))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            **COMMON))
    with torch.no_grad():  # peaked: a random router would change the logits by far more than rounding
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out)
    return out


def _logits(path_or_model, ids):
    with torch.no_grad():
        if isinstance(path_or_model, nn.Module):
            return path_or_model(ids).logits
        return transformers.AutoModelForCausalLM.from_pretrained(path_or_model)(ids).logits


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 40], [4, 8, 15, 16, 23, 42, 0, 63]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("audit_base"), [TEXT] * 20, vocab=300, context=64)


@pytest.fixture(scope="module")
def mixtral_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    run_quantize(_hf_moe(root / "base", "mixtral"), root / "q", QuantizeConfig(method="int8"), [])
    return root / "q"


# ------------------------------------------------------------------------------------------ MoE routers


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_routers_stay_float_and_transformers_gives_our_logits(tmp_path, kind, mixtral_int8):
    if kind == "mixtral":
        out = mixtral_int8
    else:
        out = tmp_path / "q"
        run_quantize(_hf_moe(tmp_path / "base", kind), out, QuantizeConfig(method="int8"), [])
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore[0] == "lm_head" and r"re:.*mlp\.gate$" in ignore
    if kind == "qwen2_moe":  # a Linear in transformers too: compressed-tensors must be told to leave it
        assert r"re:.*mlp\.shared_expert_gate$" in ignore
    else:  # the HF module name of the Mixtral checkpoint (transformers 4's too)
        assert r"re:.*block_sparse_moe\.gate$" in ignore
    ours = load_model(out)[0]
    mlp = ours.model.layers[0].mlp
    assert type(mlp.gate) is nn.Linear and isinstance(mlp.experts[0].up_proj, PackedLinear)
    if kind == "qwen2_moe":
        assert type(mlp.shared_expert_gate) is nn.Linear and isinstance(mlp.shared_expert.up_proj, PackedLinear)
    torch.testing.assert_close(_logits(ours, IDS), _logits(out, IDS), rtol=1e-4, atol=1e-4)


def test_nf4_keeps_routers_float_too(tmp_path):
    model = load_model(_hf_moe(tmp_path / "base", "qwen2_moe"))[0]
    quantize_model(model, QuantizeConfig(method="nf4"))
    mlp = model.model.layers[1].mlp
    assert type(mlp.gate) is nn.Linear and type(mlp.shared_expert_gate) is nn.Linear
    assert type(mlp.experts[0].down_proj) is not nn.Linear


def test_an_ignore_in_hf_module_names_loads_with_transformers_logits(tmp_path, mixtral_int8):
    """llm-compressor's Mixtral recipe writes `re:.*block_sparse_moe.gate`, a transformers 4 name."""
    out = tmp_path / "theirs"
    shutil.copytree(mixtral_int8, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*block_sparse_moe.gate"]
    (out / "config.json").write_text(json.dumps(config))
    ours = load_model(out)[0]
    assert type(ours.model.layers[1].mlp.gate) is nn.Linear
    torch.testing.assert_close(_logits(ours, IDS), _logits(out, IDS), rtol=1e-4, atol=1e-4)


def test_unstructured_pruning_leaves_moe_routers_alone(tmp_path):
    from llmctl.core.prune.base import PRUNERS
    from llmctl.core.prune.config import PruneConfig

    model = load_model(_hf_moe(tmp_path / "base", "qwen2_moe"))[0]
    mlp = model.model.layers[0].mlp
    gate, shared_gate = mlp.gate.weight.clone(), mlp.shared_expert_gate.weight.clone()
    PRUNERS.get("magnitude")(PruneConfig(sparsity=0.5)).prune(model, None)
    assert torch.equal(mlp.gate.weight, gate) and torch.equal(mlp.shared_expert_gate.weight, shared_gate)
    assert (mlp.experts[0].up_proj.weight == 0).float().mean() == 0.5


# ------------------------------------------------------------------------------------------ tokenizers


def _without_tokenizer_json(base, out, files: dict[str, str]):
    out.mkdir()
    for f in base.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, out / f.name)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


SLOW_TOKENIZER = {"vocab.json": json.dumps({"a": 0, "b": 1, "ab": 2}), "merges.txt": "#version: 0.2\na b\n",
                  "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer"})}


@pytest.mark.parametrize("files", [SLOW_TOKENIZER, {"tokenizer.model": "sentencepiece bytes",
                                                    "tokenizer_config.json": "{}"}], ids=["bpe-files", "spm"])
def test_quantize_and_prune_carry_tokenizers_without_tokenizer_json(llmctl, base, tmp_path, files):
    src = _without_tokenizer_json(base, tmp_path / "src", files)
    r = llmctl("quantize", src, "-m", "int8", "-o", tmp_path / "q")
    assert r.code == 0, r.stderr
    r = llmctl("prune", src, "-m", "magnitude", "-o", tmp_path / "p")
    assert r.code == 0, r.stderr
    for out in ("q", "p"):
        for name, text in files.items():
            assert (tmp_path / out / name).read_text() == text, (out, name)


# ------------------------------------------------------------------------------------------ nf4


@pytest.mark.parametrize("flags", [["--bits", "8"], ["--group-size", "16"], ["--asym"], ["bits=8"],
                                   ["--bits", "8", "--group-size", "16", "--asym"]])
def test_nf4_refuses_grid_options_it_does_not_take(llmctl, base, tmp_path, flags):
    r = llmctl("quantize", base, "-m", "nf4", *flags, "-o", tmp_path / "n")
    assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nf4" in r.stderr and "fixed grid" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "n").exists()


def test_nf4_records_the_grid_it_applies(llmctl, base, tmp_path):
    r = llmctl("quantize", base, "-m", "nf4", "--bits", "4", "-o", tmp_path / "n", "--json")  # its own value: fine
    assert r.code == 0, r.stderr
    assert {k: r.json()["quantization"][k] for k in ("bits", "group_size", "symmetric")} == \
        {"bits": 4, "group_size": 64, "symmetric": True}
    lib = run_quantize(base, tmp_path / "lib", QuantizeConfig(method="nf4", bits=8, group_size=16, symmetric=False), [])
    lineage = json.loads((tmp_path / "lib" / "llmctl.json").read_text())
    for record in (lib["quantization"], lineage["quantization"], lineage["config"]):
        assert (record["bits"], record["group_size"], record["symmetric"]) == (4, 64, True)


def test_nf4_honours_re_ignore_entries(base, tmp_path):
    from llmctl.core.model.io import save_model
    from llmctl.core.quant.nf4 import NF4Linear

    model = load_model(base)[0]
    quantize_model(model, QuantizeConfig(method="nf4", ignore=["lm_head", "re:.*mlp.*", "o_proj"]))
    save_model(model, tmp_path / "n")
    for m in (model, load_model(tmp_path / "n")[0]):
        kinds = {p: type(x) for p, x in m.named_modules() if isinstance(x, (nn.Linear, NF4Linear))}
        assert {p for p, k in kinds.items() if k is NF4Linear} == {
            f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qkv"}


# ------------------------------------------------------------------------------------------ bad records


def _corrupt(base, out, config=None, lineage=None):
    shutil.copytree(base, out)
    if config:
        c = json.loads((out / "config.json").read_text())
        c.update(config)
        (out / "config.json").write_text(json.dumps(c))
    if lineage is not None:
        (out / "llmctl.json").write_text(json.dumps(lineage))
    return out


@pytest.mark.parametrize("config, lineage, words", [
    ({"quantization_config": "int8"}, None, ["config.json", "quantization_config", "object"]),
    (None, {"transforms": [{"type": "pack-quantized", "bits": 3}]}, ["llmctl.json", "bits", "3"]),
    (None, {"transforms": "lora"}, ["llmctl.json", "transforms"]),
], ids=["string-config", "bits-3", "transforms-not-a-list"])
def test_corrupt_transform_records_are_checkpoint_errors(base, tmp_path, config, lineage, words):
    path = _corrupt(base, tmp_path / "bad", config, lineage)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert all(w in str(e.value) for w in words) and "--" not in str(e.value), e.value


@pytest.mark.parametrize("change, words", [
    (lambda q: q.update(ignore=["lm_head", "re:["]), ["ignore", "re:[", "regular expression"]),
    (lambda q: q.update(ignore="lm_head"), ["ignore", "list"]),
    (lambda q: q["config_groups"].update(group_0="int8"), ["config_groups", "object"]),
], ids=["bad-regex", "ignore-string", "group-string"])
def test_corrupt_quantization_configs_are_one_line_checkpoint_errors(llmctl, base, tmp_path, change, words):
    q = tmp_path / "q"
    run_quantize(base, q, QuantizeConfig(method="int8"), [])
    config = json.loads((q / "config.json").read_text())
    change(config["quantization_config"])
    (q / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(q)
    assert "config.json quantization_config" in str(e.value) and all(w in str(e.value) for w in words), e.value
    r = llmctl("generate", q, "The", "--max-new-tokens", "2")
    assert r.code == 1 and len(r.stderr.strip().splitlines()) == 1 and "quantization_config" in r.stderr, r.stderr


def test_a_bad_ignore_regex_on_the_command_line_is_a_usage_error(llmctl, base, tmp_path):
    for method in ("int8", "nf4"):
        r = llmctl("quantize", base, "-m", method, 'ignore=["lm_head", "re:["]', "-o", tmp_path / method)
        assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1 and "re:[" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ sizes


def test_input_size_of_a_bin_checkpoint_is_counted(base, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(base / "config.json", src / "config.json")
    torch.save(load_file(base / "model.safetensors"), src / "pytorch_model.bin")
    result = run_quantize(src, tmp_path / "q", QuantizeConfig(method="int8"), [])
    assert result["input_size_mb"] == pytest.approx((src / "pytorch_model.bin").stat().st_size / 1e6)
    assert result["input_size_mb"] > 0
