"""LoRA / rsLoRA / DoRA adapters: PEFT's forward and file format, loading through `load_model`, merging."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402

from conftest import tiny_llama  # noqa: E402

from llmctl.core.adapters import LoRA, load_adapter, lora_modules, merge_adapter, save_adapter  # noqa: E402
from llmctl.core.model.io import load_model, save_model  # noqa: E402
from llmctl.errors import CheckpointError  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 10]
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 150, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
METHODS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base"), TEXTS, vocab=200, context=64, scale=2.0)


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            for p in (module.lora_A.weight, module.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if module.lora_magnitude_vector is not None:
                module.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(module.out_features, generator=gen))


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _peft(base, adapter):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter).eval()


@pytest.mark.parametrize("method, targets", [("lora", ["q_proj", "v_proj"]), ("rslora", "all-linear"),
                                             ("dora", "all-linear"), ("dora", r".*\.layers\.1\..*_proj")])
def test_saved_adapter_gives_peft_logits(base, tmp_path, method, targets):
    model, _ = load_model(base, transforms=[LoRA(r=4, alpha=8, target_modules=targets, **METHODS[method])])
    _randomize(model)
    out = save_adapter(model, tmp_path / "adapter", base=base, tokenizer_dir=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    assert config["use_rslora"] == (method == "rslora") and config["r"] == 4 and config["lora_alpha"] == 8
    theirs = _peft(base, out)
    ours = _logits(model)
    assert not torch.allclose(ours, _logits(load_model(base)[0]), atol=1e-3)  # the adapter changes the output
    assert torch.allclose(ours, _logits(theirs), atol=1e-4, rtol=0)
    reloaded, _ = load_model(out)  # an adapter directory loads with its base
    assert torch.equal(_logits(reloaded), ours)


@pytest.mark.parametrize("method", METHODS)
def test_peft_trained_adapter_loads_in_llmctl(base, tmp_path, method):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                             use_rslora=method == "rslora", use_dora=method == "dora", init_lora_weights=False)
    wrapped = peft.get_peft_model(hf, config).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    shutil.copytree(base, tmp_path / "base")
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": "../base"}))
    model, _ = load_model(tmp_path / "adapter")  # relative to the adapter directory
    assert len(lora_modules(model)) == 6
    assert torch.allclose(_logits(model), _logits(wrapped), atol=1e-4, rtol=0)
    from llmctl.core.tokenizer import load_tokenizer

    assert not (tmp_path / "adapter" / "tokenizer.json").exists()  # PEFT saves none: the base's is used
    assert load_tokenizer(tmp_path / "adapter").encode(TEXTS[0]) == load_tokenizer(base).encode(TEXTS[0])


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(base, tmp_path, method):
    model, _ = load_model(base, transforms=[LoRA(r=4, target_modules="all-linear", **METHODS[method])])
    _randomize(model, seed=3)
    before = _logits(model)
    merge_adapter(model)
    assert not lora_modules(model) and model.transforms == []
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(_logits(model), before, atol=1e-4, rtol=0)
    out = save_model(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logits(hf), before, atol=1e-4, rtol=0)


def test_modules_to_save_round_trip_peft(base, tmp_path):
    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])])
    _randomize(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    out = save_adapter(model, tmp_path / "adapter", base=base)
    from safetensors import safe_open

    keys = set(safe_open(out / "adapter_model.safetensors", "pt").keys())
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert torch.allclose(_logits(_peft(base, out)), _logits(model), atol=1e-4, rtol=0)
    assert torch.equal(_logits(load_model(out)[0]), _logits(model))


def test_missing_adapter_tensor_and_base_are_named(base, tmp_path):
    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["v_proj"])])
    out = save_adapter(model, tmp_path / "adapter", base=base)
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.v_proj.lora_A.weight'"):
        load_model(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nowhere"}))
    with pytest.raises(CheckpointError, match="base model 'nowhere' not found"):
        load_model(out)


def test_loading_an_adapter_leaves_the_random_stream_alone(base, tmp_path):
    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["v_proj"])])
    out = save_adapter(model, tmp_path / "adapter", base=base)
    torch.manual_seed(5)
    load_adapter(out)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


def test_only_adapters_train(base):
    from llmctl.core.adapters import mark_trainable

    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj", "v_proj"], dora=True)])
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # 2 layers x 2 modules x (A, B, magnitude)


def test_qlora_adapter_records_its_nf4_base_and_merges(base, tmp_path):
    from llmctl.core.quant.nf4 import NF4, NF4Linear

    model, _ = load_model(base, transforms=[NF4(), LoRA(r=2, target_modules=["q_proj", "v_proj"], dora=True)])
    _randomize(model)
    out = save_adapter(model, tmp_path / "qlora", base=base)
    lineage = json.loads((out / "llmctl.json").read_text())
    assert [t["type"] for t in lineage["base_transforms"]] == ["nf4"]
    reloaded, _ = load_model(out)
    q = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q in lora_modules(reloaded).values()
    before = _logits(model)
    assert torch.equal(_logits(reloaded), before)
    merge_adapter(reloaded)  # re-quantized from the merged weight: equal within NF4's error
    assert type(reloaded.model.layers[0].self_attn.q_proj) is NF4Linear
    nf4_error = (_logits(load_model(base, transforms=[NF4()])[0]) - _logits(load_model(base)[0])).abs().mean()
    merge_error = (_logits(reloaded) - before).abs().mean()
    assert 0 < merge_error < nf4_error


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_disabled_adapters_give_the_base_and_come_back(base, method):
    from llmctl.core.adapters import adapters_disabled

    model, _ = load_model(base, transforms=[LoRA(r=4, target_modules="all-linear", **METHODS[method])])
    _randomize(model, seed=5)
    adapted = _logits(model)
    with adapters_disabled(model):
        assert torch.allclose(_logits(model), _logits(load_model(base)[0]), atol=1e-5, rtol=0)
    assert torch.equal(_logits(model), adapted)
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("restored on error too")
    assert torch.equal(_logits(model), adapted)


def test_nf4_base_lets_go_of_the_checkpoint_memory_map(base):
    """QLoRA's memory: once quantized, no tensor is left on the dense checkpoint's memory map (whose
    resident pages — the dense weights just read — would otherwise stay in the process's RSS)."""
    from llmctl.core.quant.nf4 import NF4

    model, _ = load_model(base)
    assert not model.model.embed_tokens.weight.untyped_storage().resizable()  # memory-mapped as loaded
    NF4().apply(model)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.untyped_storage().resizable() for t in tensors)
    assert model.lm_head.weight.untyped_storage().resizable()
