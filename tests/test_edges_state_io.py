"""Edges of the training state and of model load/save (found by mutation testing): a run resumed
from `save_state`/`load_state` reproduces the uninterrupted run bit for bit (torch's own optimizer
state dict, dropout, python/numpy/torch draws, cached Gaussians), dotted names, per-rank objective
state and the refusals; `load_model` against transformers (stored and asked dtypes, tied heads,
a replaced config, a new score head, transforms) and what `save_model` writes."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_llama
from llmctl.errors import CheckpointError

# -- the training state --------------------------------------------------------------------------


def _setup(seed):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Tanh()))
    model.add_module("head", nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, amsgrad=True)
    return model, optimizer


def _step(model, optimizer):
    """One step whose batch draws from python's, numpy's and torch's generators (and dropout's)."""
    x = torch.randn(4, 6) * random.gauss(1.0, 0.1) + float(np.random.standard_normal())
    y = torch.full((4, 1), random.random() + float(np.random.rand()))
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _by_name(model, optimizer):
    """torch's optimizer state dict keyed by parameter name (what the trainer hands save_state)."""
    names = [n for n, _ in model.named_parameters()]
    full = optimizer.state_dict()
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]]
    return {"state": {names[i]: s for i, s in full["state"].items()}, "param_groups": groups}


def _by_position(model, state):
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_a_resumed_run_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    from llmctl.core.train.state import load_state, restore_rng, save_state

    _seed_all(7)
    model, optimizer = _setup(0)
    losses = [_step(model, optimizer) for _ in range(3)]
    random.gauss(0, 1), np.random.standard_normal()  # noqa: B018  (leave a cached Gaussian in both)
    losses += [_step(model, optimizer) for _ in range(3)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(7)
    model, optimizer = _setup(0)
    first = [_step(model, optimizer) for _ in range(3)]
    random.gauss(0, 1), np.random.standard_normal()  # noqa: B018  (leave a cached Gaussian in both)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = _by_name(model, optimizer)
    assert sorted(state["state"]["enc.0.weight"]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    save_state(tmp_path, step=3, optimizer=state, data={"index": 3, "epoch": 0}, scaler={"scale": 2.0},
               extra={"world_size": 1})
    expected = (random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(2))

    _seed_all(99)  # another process: other generators, a fresh model and optimizer
    model, optimizer = _setup(5)
    model.load_state_dict(weights)
    meta, loaded = load_state(tmp_path)
    optimizer.load_state_dict(_by_position(model, loaded))
    restore_rng(meta["rng"], meta["rng_tensors"])
    assert (random.gauss(0, 1), float(np.random.standard_normal())) == expected[:2]
    assert torch.equal(torch.randn(2), expected[2])
    restore_rng(meta["rng"], meta["rng_tensors"])
    assert first + [_step(model, optimizer) for _ in range(3)] == losses
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert (meta["step"], meta["data"], meta["scaler"], meta["world_size"]) == (3, {"index": 3, "epoch": 0},
                                                                              {"scale": 2.0}, 1)
    assert meta["format"] == "llmctl-trainer-state" and meta["version"] == 1


def test_the_uninterrupted_reference_depends_on_every_generator(tmp_path):
    """A guard for the test above: each generator changes the run, so restoring each one matters."""
    runs = []
    for which in (None, "python", "numpy", "torch"):
        _seed_all(7)
        model, optimizer = _setup(0)
        _step(model, optimizer)
        if which == "python":
            random.random()
        elif which == "numpy":
            np.random.rand()
        elif which == "torch":
            torch.rand(1)
        runs.append(_step(model, optimizer))
    assert len(set(runs)) == 4


def test_state_keeps_dotted_names_scalars_modules_and_each_ranks_objective_state(tmp_path):
    from llmctl.core.train.state import STATE_DIR, load_state, save_state

    moment = torch.arange(6.0).reshape(2, 3)
    optimizer = {"state": {"model.layers.0.self_attn.q_proj.weight": {"exp_avg": moment.t(), "step": 4, "beta": 0.5},
                           "extra.0.weight": {"exp_avg_sq": torch.ones(3, requires_grad=True)}},
                 "param_groups": [{"lr": 0.1, "betas": [0.9, 0.95], "params": ["model.layers.0.self_attn.q_proj.weight",
                                                                              "extra.0.weight"]}]}
    objective = [{"ref.mean": torch.tensor([1.0, 2.0])}, {}, {"count": torch.tensor(3)}] + [{}] * 8 + [
        {"x": torch.zeros(1)}]
    directory = tmp_path / "checkpoints" / "step-000012"  # made if missing
    save_state(directory, step=12, optimizer=optimizer, data={"kind": "shards"}, scaler=None,
               modules={"0.weight": torch.eye(2).t()[:, :1], "1.bias": torch.ones(2, requires_grad=True)},
               objective=objective)
    meta, state = load_state(directory)
    q = state["state"]["model.layers.0.self_attn.q_proj.weight"]
    assert sorted(state["state"]) == ["extra.0.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q["exp_avg"], moment.t()) and (q["step"], q["beta"]) == (4, 0.5)
    assert torch.equal(state["state"]["extra.0.weight"]["exp_avg_sq"], torch.ones(3))
    assert state["param_groups"] == optimizer["param_groups"]
    assert sorted(meta["modules"]) == ["0.weight", "1.bias"]
    assert torch.equal(meta["modules"]["0.weight"], torch.tensor([[1.0], [0.0]]))
    assert sorted(meta["objective"]) == [0, 2, 11]
    assert torch.equal(meta["objective"][0]["ref.mean"], torch.tensor([1.0, 2.0]))
    assert meta["objective"][2]["count"].item() == 3 and torch.equal(meta["objective"][11]["x"], torch.zeros(1))
    assert sorted(meta["rng_tensors"]) == ["rng.torch"]  # CPU: no CUDA generators
    assert (meta["step"], meta["scaler"]) == (12, None)
    from safetensors import safe_open

    with safe_open(str(directory / STATE_DIR / "state.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["module.0.weight", "module.1.bias", "objective.0.ref.mean", "objective.11.x",
                                    "objective.2.count", "optimizer.extra.0.weight.exp_avg_sq",
                                    "optimizer.model.layers.0.self_attn.q_proj.weight.exp_avg", "rng.torch"]
    raw = json.loads((directory / STATE_DIR / "state.json").read_text(encoding="utf-8"))
    assert raw["optimizer"]["scalars"] == {"model.layers.0.self_attn.q_proj.weight": {"step": 4, "beta": 0.5}}


def test_unreadable_state_is_a_checkpoint_error(tmp_path):
    from llmctl.core.train.state import STATE_DIR, load_state, save_state

    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path)
    assert str(info.value).startswith(f"cannot read training state in {tmp_path / STATE_DIR}: [Errno 2]")
    save_state(tmp_path, step=1, optimizer={"state": {}, "param_groups": []}, data={}, scaler=None)
    (tmp_path / STATE_DIR / "state.json").write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path)
    assert str(info.value).startswith(f"cannot read training state in {tmp_path / STATE_DIR}: Expecting")
    save_state(tmp_path, step=1, optimizer={"state": {}, "param_groups": []}, data={}, scaler=None)
    (tmp_path / STATE_DIR / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path)
    assert str(info.value).startswith(f"cannot read training state in {tmp_path / STATE_DIR}: ")


# -- model load and save -------------------------------------------------------------------------

TEXTS = ["a b c d e f g h", "the quick brown fox jumps over the lazy dog"] * 20
IDS = torch.tensor([[5, 9, 20, 3, 40, 7, 11], [8, 8, 30, 2, 1, 60, 4]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("io") / "base"
    out.mkdir()
    return tiny_llama(out, TEXTS, vocab=300, context=32, scale=2.0)


def _hf(path, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_a_transformers_checkpoint_loads_in_eval_mode_with_its_dtype_unless_one_is_asked(base, tmp_path):
    from llmctl.core.model.io import load_model

    model, cfg = load_model(base)
    assert not model.training and cfg is model.cfg
    assert cfg.vocab_size == json.loads((base / "config.json").read_text())["vocab_size"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(_logits(model), _logits(_hf(base)), atol=1e-5)
    half, _ = load_model(base, dtype=torch.bfloat16)  # a dtype alone converts
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.allclose(_logits(half), _logits(_hf(base, torch.bfloat16)), atol=0.1)
    _hf(base, torch.bfloat16).save_pretrained(tmp_path / "bf16")
    stored, _ = load_model(tmp_path / "bf16", device="cpu")  # a device alone keeps the stored dtype
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())
    assert all(p.dtype == torch.float32 for p in load_model(tmp_path / "bf16", dtype=torch.float32)[0].parameters())


def test_a_given_config_of_the_same_architecture_replaces_the_stored_one_and_another_is_refused(base):
    from llmctl.core.model.io import load_model

    cfg = load_model(base)[1]
    dropped = dataclasses.replace(cfg, attention_dropout=0.5, residual_dropout=0.5)
    model, got = load_model(base, config=dropped)
    assert got == dropped and model.cfg == dropped and not model.training
    assert torch.allclose(_logits(model), _logits(_hf(base)), atol=1e-5)  # eval mode: no dropout
    model.train()
    assert not torch.allclose(_logits(model), _logits(_hf(base)), atol=1e-3)  # the dropout did reach the model
    with pytest.raises(CheckpointError) as info:
        load_model(base, config=dataclasses.replace(cfg, intermediate_size=32))
    assert str(info.value) == f"{base}: the given model config is not the checkpoint's architecture"


def test_a_tied_checkpoint_shares_its_embedding_as_the_head(base, tmp_path):
    import transformers

    from llmctl.core.model.io import load_model

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True, pad_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    model, cfg = load_model(tmp_path / "tied")
    assert cfg.tie_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = IDS % 50
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, _hf(tmp_path / "tied")(ids).logits, atol=1e-5)

    labels = dataclasses.replace(cfg, num_labels=3, tie_embeddings=False, pad_token_id=None)  # a new score head
    scorer, got = load_model(tmp_path / "tied", config=labels)
    assert got == labels and scorer.lm_head.weight.shape == (3, 16)
    assert scorer.lm_head.weight is not scorer.model.embed_tokens.weight
    assert torch.equal(scorer.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_transforms_are_applied_to_the_loaded_model(base):
    from llmctl.core.adapters.lora import LoRA
    from llmctl.core.model.io import load_model

    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj"])])
    assert [type(t).__name__ for t in model.transforms] == ["LoRA"]
    assert hasattr(model.model.layers[0].self_attn.q_proj, "lora_A") and not model.training


def test_save_model_writes_what_transformers_loads_with_the_tokenizer_generation_config_and_lineage(base, tmp_path):
    from llmctl.core.model.io import load_model, save_model
    from llmctl.errors import OutputExistsError

    model, _ = load_model(base)
    out = save_model(model, tmp_path / "out", tokenizer_dir=base, lineage={"note": "x"},
                     generation_config={"max_new_tokens": 7}, max_shard_bytes=20_000)
    assert out == tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    assert json.loads((out / "llmctl.json").read_text())["note"] == "x"
    assert "transforms" not in json.loads((out / "llmctl.json").read_text())
    assert torch.allclose(_logits(_hf(out)), _logits(_hf(base)), atol=1e-5)
    with pytest.raises(OutputExistsError):
        save_model(model, out)
    save_model(model, out, force=True)
    assert not (out / "model.safetensors.index.json").exists()  # the default shard size: one file


def test_save_model_records_a_quantization_in_config_json_and_other_transforms_in_the_lineage(base, tmp_path):
    from llmctl.core.adapters.lora import LoRA
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.quant.nf4 import NF4

    model, _ = load_model(base, transforms=[NF4(), LoRA(r=2, target_modules=["q_proj"])])
    out = save_model(model, tmp_path / "q", lineage={"note": "y"})
    config = json.loads((out / "config.json").read_text())
    lineage = json.loads((out / "llmctl.json").read_text())
    assert config["quantization_config"] == NF4().quantization_config()
    assert lineage["note"] == "y" and lineage["transforms"] == [LoRA(r=2, target_modules=["q_proj"]).spec()]
    again, _ = load_model(out)
    assert [type(t).__name__ for t in again.transforms] == ["NF4", "LoRA"]
    assert torch.equal(_logits(again), _logits(model))

    plain = save_model(load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj"])])[0], tmp_path / "l")
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    lineage = json.loads((plain / "llmctl.json").read_text())
    assert lineage["transforms"] == [LoRA(r=2, target_modules=["q_proj"]).spec()]


def test_an_adapter_directory_loads_as_its_base_with_the_adapter_and_the_settings_given(base, tmp_path):
    from llmctl.core.adapters.lora import LoRA
    from llmctl.core.adapters.peft_format import save_adapter
    from llmctl.core.model.io import load_model

    model, cfg = load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj", "v_proj"])])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = save_adapter(model, tmp_path / "adapter", base=base)
    again, _ = load_model(out)
    assert torch.equal(_logits(again), _logits(model))
    assert not torch.allclose(_logits(again), _logits(load_model(base)[0]), atol=1e-3)  # the adapter is there
    dropped = dataclasses.replace(cfg, attention_dropout=0.5)
    half, got = load_model(out, dtype=torch.bfloat16, config=dropped, transforms=[LoRA(r=2, target_modules=["k_proj"])])
    assert got == dropped and half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert [t.target_modules for t in half.transforms] == [["q_proj", "v_proj"], ["k_proj"]]
