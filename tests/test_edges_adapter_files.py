"""Adapter directories without torch (`core/adapters/files.py`), the finetuning methods' transforms
(`methods.py`), switching adapters off (`switch.py`), and adapters as merge inputs
(`core/merge/adapters.py`) — edges the mutation run (docs/testing.md, round 10) found untested."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from llmctl.core.adapters.files import base_path, describe_adapter, is_adapter, method_name, read_config
from llmctl.errors import CheckpointError, OutputExistsError, UsageError


def _adapter(directory: Path, config: dict, tensors: dict | None = None, lineage: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    if lineage is not None:
        (directory / "llmctl.json").write_text(json.dumps(lineage))
    return directory


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


# ------------------------------------------------------------------------------------------------ files


def test_an_adapter_directory_has_an_adapter_config_and_no_model_config(tmp_path):
    adapter = _adapter(tmp_path / "a", {"peft_type": "LORA"})
    assert is_adapter(adapter) and is_adapter(str(adapter))
    assert not is_adapter(_checkpoint(_adapter(tmp_path / "merged", {})))  # a full checkpoint beside its config
    assert not is_adapter(_checkpoint(tmp_path / "model"))
    (tmp_path / "odd" / "adapter_config.json").mkdir(parents=True)  # a directory by that name is no config
    assert not is_adapter(tmp_path / "odd")
    assert read_config(adapter) == {"peft_type": "LORA"}
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path / "model")
    assert str(e.value) == f"{tmp_path / 'model'}: no adapter_config.json (not a model checkpoint directory)"


def test_the_base_is_found_beside_the_adapter_first_then_from_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    inside, outside = _checkpoint(tmp_path / "a" / "base"), _checkpoint(work / "base")
    adapter = _adapter(tmp_path / "a", {"base_model_name_or_path": "base"})
    monkeypatch.chdir(work)
    assert base_path(adapter) == inside  # relative to the adapter wins
    assert base_path(adapter, {"base_model_name_or_path": str(outside)}) == outside  # absolute; the config given
    (inside / "config.json").unlink()  # no longer a checkpoint there: the working directory's
    assert base_path(adapter) == Path("base") and (Path("base") / "config.json").is_file()
    unnamed = _adapter(tmp_path / "unnamed", {"peft_type": "LORA"})
    for path, config in ((unnamed, None), (adapter, {"base_model_name_or_path": ""}),
                         (adapter, {"base_model_name_or_path": None})):
        with pytest.raises(CheckpointError) as e:
            base_path(path, config)
        assert str(e.value) == f"{path / 'adapter_config.json'}: no base_model_name_or_path"
    with pytest.raises(CheckpointError) as e:
        base_path(adapter, {"base_model_name_or_path": "gone"})
    assert str(e.value) == (f"{adapter / 'adapter_config.json'}: base model 'gone' not found (as a directory, "
                            f"absolute or relative to {adapter} or the working directory)")


@pytest.mark.parametrize("config,name", [
    ({"peft_type": "LORA"}, "lora"), ({"peft_type": "lora"}, "lora"),
    ({"peft_type": "LORA", "use_rslora": True}, "rslora"), ({"peft_type": "LORA", "use_dora": True}, "dora"),
    ({"peft_type": "LORA", "use_dora": True, "use_rslora": True}, "dora"),
    ({"peft_type": "LORA", "use_dora": False, "use_rslora": False}, "lora"), ({"peft_type": "PREFIX_TUNING"}, "prefix"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt"), ({"peft_type": "IA3"}, "ia3"), ({}, ""),
])
def test_the_method_an_adapter_config_describes(config, name):
    assert method_name(config) == name


def test_an_adapter_is_described_by_its_config_tensors_and_lineage(tmp_path):
    tensors = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": torch.zeros(shape)
               for i in range(2) for m in ("q_proj", "v_proj") for ab, shape in (("A", (4, 32)), ("B", (16, 4)))}
    tensors["base_model.model.lm_head.weight"] = torch.zeros(3, 5)  # a module saved in full
    config = {"peft_type": "LORA", "use_dora": True, "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "base_model_name_or_path": "b"}
    lineage = {"command": "finetune", "created": "2026-12-01", "llmctl_version": "0.1", "parents": ["b"],
               "config": {"lr": 1}, "base_transforms": [{"type": "nf4"}], "metrics": [{"step": 1}, {"step": 2}]}
    adapter = _adapter(tmp_path / "a", config, tensors, lineage)
    parameters = 2 * 2 * (4 * 32 + 16 * 4) + 15
    assert describe_adapter(adapter, 10 * parameters) == {
        "method": "dora", "task_type": "CAUSAL_LM", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "modules": 4, "ranks": [4],
        "modules_to_save": ["lm_head"], "num_virtual_tokens": None, "parameters": parameters, "trainable_share": 0.1,
        "base": "b", "base_transforms": [{"type": "nf4"}],
        "lineage": {"command": "finetune", "created": "2026-12-01", "llmctl_version": "0.1", "parents": ["b"]},
        "metrics": 2}
    (adapter / "llmctl.json").unlink()  # PEFT's own adapter: no lineage
    prompt = _adapter(tmp_path / "p", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3},
                      {"prompt_embeddings": torch.zeros(3, 8)})
    for path, base, share in ((adapter, None, None), (adapter, 0, None), (prompt, 48, 0.5)):
        described = describe_adapter(path, base)
        assert described["trainable_share"] == share
        assert (described["lineage"], described["base_transforms"], described["metrics"]) == (None, [], 0)
    assert describe_adapter(prompt, None)["modules"] == 0 and describe_adapter(prompt, None)["num_virtual_tokens"] == 3


# ---------------------------------------------------------------------------------------------- methods


def test_each_method_makes_its_transforms_from_the_options():
    from llmctl.core.adapters.lora import LoRA
    from llmctl.core.adapters.methods import METHODS
    from llmctl.core.adapters.prompt import Prefix, Prompt
    from llmctl.core.quant.nf4 import NF4

    o = SimpleNamespace(r=3, alpha=5.0, dropout=0.25, target_modules=["q_proj"], exclude_modules=["k_proj"],
                        rslora=True, modules_to_save=["lm_head"], num_virtual_tokens=7, rank_pattern={"v_proj": 2},
                        alpha_pattern={"v_proj": 1.0})
    lora = dict(r=3, alpha=5.0, dropout=0.25, target_modules=["q_proj"], exclude_modules=["k_proj"], rslora=True,
                modules_to_save=["lm_head"], rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1.0})
    assert METHODS.get("full")(o) == []
    assert METHODS.get("lora")(o) == [LoRA(**lora)]
    assert METHODS.get("dora")(o) == [LoRA(**lora, dora=True)]
    qlora = METHODS.get("qlora")(o)
    assert qlora == [NF4(), LoRA(**lora)] and qlora[0].double_quant
    assert METHODS.get("prefix")(o) == [Prefix(num_virtual_tokens=7)]
    assert METHODS.get("prompt")(o) == [Prompt(num_virtual_tokens=7)]
    assert type(METHODS.get("prefix")(o)[0]) is Prefix and type(METHODS.get("prompt")(o)[0]) is Prompt
    assert sorted(METHODS.names()) == ["dora", "full", "lora", "prefix", "prompt", "qlora"]


# ---------------------------------------------------------------------------------------------- switch


def test_adapters_are_switched_off_inside_the_block_and_back_to_the_class_default_after():
    from torch import nn

    from llmctl.core.adapters import adapters_disabled
    from llmctl.core.adapters.lora import LoRA, lora_modules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    LoRA(r=2, target_modules=["0", "1"]).apply(model)
    first, second = lora_modules(model).values()
    with torch.no_grad():
        for m in (first, second):
            m.lora_B.weight.normal_()
    second.adapter_active = False  # already off (set on the instance): stays off after the block
    x = torch.randn(2, 4)
    with torch.no_grad():
        adapted = model(x)
        with adapters_disabled(model) as same:
            assert same is model
            assert first.adapter_active is False and second.adapter_active is False
            assert not hasattr(model[2], "adapter_active")  # only adapter modules are switched
            base = model(x)
        assert "adapter_active" not in vars(first) and first.adapter_active is True
        assert second.adapter_active is False
        torch.testing.assert_close(model(x), adapted)
        assert not torch.allclose(base, adapted)
        with pytest.raises(RuntimeError, match="inside"):
            with adapters_disabled(model):
                raise RuntimeError("inside")
        assert first.adapter_active is True and "adapter_active" not in vars(first)


# --------------------------------------------------------------------------------------- merge adapters


def test_merge_refs_name_an_adapter_by_its_directory_or_base_plus_adapter(tmp_path, monkeypatch):
    from llmctl.core.merge.adapters import split

    base, adapter = _checkpoint(tmp_path / "base"), _adapter(tmp_path / "adapter", {"peft_type": "LORA"})
    assert split(str(adapter)) == (None, str(adapter))
    assert split(str(base)) is None
    assert split(f"{base}+{adapter}") == (str(base), str(adapter))
    assert split("org/model") is None  # neither a path nor BASE+ADAPTER: a model like any other
    with pytest.raises(UsageError) as e:
        split(f"{tmp_path / 'gone'}+{adapter}")
    assert str(e.value) == (f"model '{tmp_path / 'gone'}+{adapter}': {tmp_path / 'gone'} does not exist "
                            "(BASE+ADAPTER names two directories)")
    with pytest.raises(UsageError) as e:
        split(f"{base}+{tmp_path / 'gone'}")
    assert str(e.value) == (f"model '{base}+{tmp_path / 'gone'}': {tmp_path / 'gone'} does not exist "
                            "(BASE+ADAPTER names two directories)")
    with pytest.raises(UsageError) as e:
        split(f"{base}+{base}")
    assert str(e.value) == (f"model '{base}+{base}': {base} is not a PEFT adapter directory "
                            "(no adapter_config.json)")
    monkeypatch.chdir(tmp_path)
    assert split("base+adapter") == ("base", "adapter")
    _adapter(tmp_path / "adapter+v2", {"peft_type": "LORA"})  # the first `+` separates: an adapter may have one
    assert split("base+adapter+v2") == ("base", "adapter+v2")


def _base(directory: Path, seed: int) -> Path:
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24))
    return save_model(model, directory, generation_config={"max_new_tokens": 7 + seed})  # no tokenizer


def test_adapters_are_materialised_on_the_base_they_are_given_without_a_tokenizer(tmp_path):
    """Each adapter ref becomes its base's weights plus s·BA (by hand from the adapter file) on
    the base its ref names — BASE+ADAPTER over the one the adapter records — with that base's
    generation config, no tokenizer when the base has none, and both parents; other refs are skipped."""
    from safetensors.torch import load_file

    from llmctl.core.adapters import LoRA, lora_modules, save_adapter
    from llmctl.core.merge.adapters import materialise
    from llmctl.core.model.io import load_model

    recorded, given = _base(tmp_path / "recorded", 1), _base(tmp_path / "given", 2)
    model, _ = load_model(recorded, transforms=[LoRA(r=2, alpha=3, target_modules=["q_proj"])])
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_()
    adapter = save_adapter(model, tmp_path / "adapter", base=recorded)
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 1.5 * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    refs = [str(recorded), str(adapter), f"{given}+{adapter}"]
    paths, parents = materialise(refs, tmp_path / "scratch")
    assert list(paths) == refs[1:]
    assert parents == {refs[1]: [str(recorded), str(adapter)], refs[2]: [str(given), str(adapter)]}
    for ref, base in ((refs[1], recorded), (refs[2], given)):
        out, weights = paths[ref], load_file(base / "model.safetensors")
        merged = load_file(out / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[name], weights[name] + delta)
        assert json.loads((out / "generation_config.json").read_text()) == \
            json.loads((base / "generation_config.json").read_text())
        assert not (out / "tokenizer.json").exists()


def test_a_merges_scratch_directory_is_beside_its_output(tmp_path):
    from llmctl.core.merge.run import scratch

    out = tmp_path / "new" / "deeper" / "merged"
    with scratch(out) as directory:
        directory = Path(directory)
        assert directory.parent == out.parent.resolve() and directory.is_dir()
        assert directory.name.startswith(".merged.merge-")
    assert not directory.exists()


def test_integer_tensors_are_copied_when_every_input_agrees_and_refused_otherwise(tmp_path):
    from safetensors.torch import load_file

    from llmctl.core.merge import merge, parse_recipe

    def checkpoint(name, ids):
        directory = tmp_path / name
        directory.mkdir()
        save_file({"w": torch.full((3,), float(len(name))), "ids": ids}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")
        return str(directory)

    same, other = torch.arange(4, dtype=torch.int32), torch.tensor([0, 1, 2, 5], dtype=torch.int32)
    p, q, r = checkpoint("p", same), checkpoint("qq", same.clone()), checkpoint("rrr", other)
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0}}
    merge(parse_recipe({**recipe, "models": [p, q]}), tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["ids"].dtype == torch.int32 and torch.equal(merged["ids"], same)
    assert torch.equal(merged["w"], torch.full((3,), 1.5))
    for models in ([p, r], [r, p, p], [p, q, r]):
        with pytest.raises(CheckpointError) as e:
            merge(parse_recipe({**recipe, "models": models}), tmp_path / "refused")
        assert str(e.value) == "cannot merge 'ids': a non-floating tensor differs between inputs"


def _checkpoint_of(directory: Path, tensors: dict, config: dict | None = None) -> str:
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config or {}))
    return str(directory)


def test_one_input_is_copied_and_the_summary_counts_the_output_bytes(tmp_path):
    from safetensors.torch import load_file

    from llmctl.core.merge import merge, parse_recipe

    ids = torch.arange(4, dtype=torch.int16)
    p = _checkpoint_of(tmp_path / "p", {"w": torch.ones(3, 2, dtype=torch.float64), "ids": ids})
    summary = merge(parse_recipe({"merge_method": "linear", "models": [p], "parameters": {"weight": 2.0}}),
                    tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["ids"].dtype == torch.int16 and torch.equal(merged["ids"], ids)
    assert summary["bytes"] == 6 * 8 + 4 * 2 and summary["tensors"] == 2


def test_a_merge_reports_its_progress_summary_lineage_and_generation_config(tmp_path):
    import re

    from _recorder import Recorder
    from safetensors.torch import load_file

    from llmctl.core.merge import merge, parse_recipe

    tensors = {f"model.layers.{i}.w": torch.full((4, 4), float(i)) for i in range(3)}
    a = _checkpoint_of(tmp_path / "a", tensors, {"model_type": "llama", "num_hidden_layers": 3})
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "temperature": 0.5}))
    b = _checkpoint_of(tmp_path / "b", {k: v + 1 for k, v in tensors.items()}, {"model_type": "llama",
                                                                                "num_hidden_layers": 3})
    report, out = Recorder(), tmp_path / "out"
    summary = merge(parse_recipe({"merge_method": "linear", "models": [a, b], "parameters": {"weight": 1.0}}), out,
                    report=report, record={"cli": "merge a b"}, max_shard_bytes=100)
    assert set(summary) == {"output", "method", "models", "tensors", "layers", "bytes", "seconds"}
    assert (summary["output"], summary["method"], summary["tensors"], summary["bytes"]) == (str(out), "linear", 3, 192)
    assert summary["models"] == [a, b] and summary["layers"] == 3
    assert isinstance(summary["seconds"], float) and 0 <= summary["seconds"] < 60
    assert re.fullmatch(r"\d+(\.\d{1,3})?", str(summary["seconds"]))
    assert report.steps() == [("progress", "merge (linear)", 192, "B"), ("advance", 64), ("advance", 64),
                              ("advance", 64)]
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.5  # the config source's
    assert json.loads((out / "llmctl.json").read_text())["config"]["cli"] == "merge a b"
    assert (out / "model.safetensors.index.json").exists()  # shards of at most 100 bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {n: load_file(out / f)[n] for n, f in index.items()}
    assert all(torch.equal(merged[n], tensors[n] + 0.5) for n in tensors)
    with pytest.raises(OutputExistsError):  # not replaced without force
        merge(parse_recipe({"merge_method": "linear", "models": [a, b], "parameters": {"weight": 1.0}}), out)


def test_a_float64_merge_is_computed_in_float64(tmp_path):
    """Array methods compute 16-bit merges in float32, but float64 ones in float64: by hand,
    (a + 2b) / 3 to the last bit of a double."""
    import numpy as np
    from safetensors.torch import load_file

    from llmctl.core.merge import merge, parse_recipe

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    p, q = _checkpoint_of(tmp_path / "p", {"w": a}), _checkpoint_of(tmp_path / "q", {"w": b})
    merge(parse_recipe({"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}},
                                                              {"model": q, "parameters": {"weight": 2.0}}]}),
          tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    want = (a.numpy() * np.float64(1 / 3) + b.numpy() * np.float64(2 / 3))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15, atol=0)


def test_stacked_layers_keep_their_layer_types(tmp_path):
    """A passthrough of layers from two models: `layer_types` (sliding or full attention per layer)
    follows the layers taken; a source without the list leaves the config source's as it is."""
    from llmctl.core.merge import merge, parse_recipe

    def model(name, types):
        tensors = {f"model.layers.{i}.w": torch.full((2,), float(i)) for i in range(2)}
        config = {"num_hidden_layers": 2} | ({"layer_types": types} if types else {})
        return _checkpoint_of(tmp_path / name, tensors, config)

    p, q = model("p", ["full_p0", "sliding_p1"]), model("q", ["sliding_q0", "full_q1"])
    plain = model("plain", None)
    slices = [{"sources": [{"model": p, "layer_range": [1, 2]}]}, {"sources": [{"model": q, "layer_range": [0, 2]}]}]
    merge(parse_recipe({"merge_method": "passthrough", "slices": slices}), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["layer_types"] == ["sliding_p1", "sliding_q0", "full_q1"]
    slices[1]["sources"][0]["model"] = plain
    merge(parse_recipe({"merge_method": "passthrough", "slices": slices}), tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["layer_types"] == ["full_p0", "sliding_p1"]


def test_a_bfloat16_merge_widens_its_inputs_and_rounds_once(tmp_path):
    """bfloat16 inputs on the array back end: widened exactly to float32, averaged there, and the
    result rounded to bfloat16 (or kept in float32 when the recipe asks for it)."""
    from safetensors.torch import load_file

    from llmctl.core.merge import merge, parse_recipe

    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6, generator=gen).to(torch.bfloat16) for _ in range(2))
    p, q = _checkpoint_of(tmp_path / "p", {"w": a}), _checkpoint_of(tmp_path / "q", {"w": b})
    want = (a.float() + b.float()) / 2
    for dtype, expected in ((None, want.to(torch.bfloat16)), ("float32", want)):
        recipe = {"merge_method": "linear", "models": [p, q], "parameters": {"weight": 1.0}, "dtype": dtype}
        merge(parse_recipe(recipe), tmp_path / f"out-{dtype}")
        got = load_file(tmp_path / f"out-{dtype}" / "model.safetensors")["w"]
        assert got.dtype == expected.dtype and torch.equal(got, expected), dtype


def test_the_output_config_records_the_merges_dtype(tmp_path):
    """`out_dtype`, else `dtype`, replaces the config's `dtype` and `torch_dtype` where it has them
    (and adds neither); without either the config keeps its own."""
    from llmctl.core.merge import merge, parse_recipe

    both = _checkpoint_of(tmp_path / "both", {"w": torch.ones(2)}, {"dtype": "float32", "torch_dtype": "float32"})
    old = _checkpoint_of(tmp_path / "old", {"w": torch.ones(2)}, {"torch_dtype": "float32"})
    for source, settings, want in ((both, {"dtype": "bfloat16"}, {"dtype": "bfloat16", "torch_dtype": "bfloat16"}),
                                   (both, {"dtype": "bfloat16", "out_dtype": "float16"},
                                    {"dtype": "float16", "torch_dtype": "float16"}),
                                   (both, {}, {"dtype": "float32", "torch_dtype": "float32"}),
                                   (old, {"dtype": "float16"}, {"torch_dtype": "float16"})):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        recipe = {"merge_method": "linear", "models": [source], "parameters": {"weight": 1.0}, **settings}
        merge(parse_recipe(recipe), out)
        assert json.loads((out / "config.json").read_text()) == want, settings


def test_a_tokenizer_source_without_tokenizer_files_is_named(tmp_path):
    """No input has a tokenizer: `base` and `union` stand for the config source, whose directory
    the refusal names (no tokenizer_source: no tokenizer, no refusal)."""
    from llmctl.core.merge import merge, parse_recipe

    p = _checkpoint_of(tmp_path / "p", {"w": torch.ones(2)})
    recipe = {"merge_method": "linear", "models": [p], "parameters": {"weight": 1.0}}
    for source in ("base", "union"):
        with pytest.raises(UsageError) as e:
            merge(parse_recipe({**recipe, "tokenizer_source": source}), tmp_path / f"out-{source}")
        assert str(e.value) == f"tokenizer_source: {p} has no tokenizer files"
    merge(parse_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_the_lineage_records_the_seed_of_a_random_method_only_and_the_recipe(tmp_path):
    import yaml

    from llmctl.core.merge import merge, parse_recipe

    gen = torch.Generator().manual_seed(2)
    p, q = (_checkpoint_of(tmp_path / n, {"w": torch.randn(8, generator=gen)}) for n in "pq")
    recipes = {None: {"merge_method": "linear", "models": [p, q], "parameters": {"weight": 1.0}},
               7: {"merge_method": "dare_linear", "base_model": p,
                   "models": [{"model": q, "parameters": {"weight": 1.0, "density": 0.5}}]}}
    for seed, raw in recipes.items():
        out = tmp_path / f"out-{seed}"
        merge(parse_recipe(raw), out, seed=7)
        lineage = json.loads((out / "llmctl.json").read_text())
        assert lineage["command"] == "merge" and lineage["merge_method"] == raw["merge_method"]
        assert lineage["config"]["seed"] == seed and lineage["config"]["recipe"] == raw
        assert [parent["path"] for parent in lineage["parents"]] == [str(Path(p).resolve()), str(Path(q).resolve())]
        written = yaml.safe_load((out / "mergekit_config.yml").read_text())
        assert written == raw and list(written) == list(raw)  # the recipe's own order
