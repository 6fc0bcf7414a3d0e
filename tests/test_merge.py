"""`llmctl merge`: every deterministic method equals mergekit's output on the same recipe
(≤1e-5 per tensor); randomised methods are seeded; recipes, checks, lineage and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.core.merge import METHODS, merge, parse_recipe
from llmctl.errors import CheckpointError, ConfigError
from conftest import tiny_llama


def _perturb(src: Path, dst: Path, seed: int, *, shard: bool = False) -> Path:
    """A copy of the HF checkpoint `src` with seeded noise on every tensor (sharded on request)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    model.save_pretrained(dst, max_shard_size="40KB" if shard else "5GB")
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    a = root / "a"
    a.mkdir()
    tiny_llama(a, ["merge these models " * 20, "tensor by tensor"], vocab=300, context=64, scale=1.0)
    return {"a": a, "b": _perturb(a, root / "b", 1), "c": _perturb(a, root / "c", 2),
            "b_sharded": _perturb(a, root / "b_sharded", 1, shard=True), "root": root}


def _mergekit(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_file(out / "model.safetensors")


def _ours(recipe: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    merge(parse_recipe(recipe), out, **kw)
    return load_file(out / "model.safetensors")


def _m(name, **params):
    return {"model": name, "parameters": params} if params else {"model": name}


def _slices(*ranges):
    return [{"sources": [{"model": m, "layer_range": list(r)} for m, r in group]} for group in ranges]


RECIPES = {
    "linear_gradient": {"merge_method": "linear", "models": [_m("a", weight=0.3), _m("b", weight=[0.7, 0.1]),
                                                               _m("c", weight=0.5)]},
    "linear_unnormalised": {"merge_method": "linear", "parameters": {"normalize": False},
                            "models": [_m("a", weight=0.25), _m("b", weight=0.5)]},
    "slerp_filters": {"merge_method": "slerp", "base_model": "a",
                      "slices": _slices([("a", (0, 2)), ("b", (0, 2))]),
                      "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.6]},
                                           {"filter": "mlp", "value": [1, 0.2]}, {"value": 0.3}]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "a", "parameters": {"lambda": 0.9},
                        "models": [_m("b", weight=0.5), _m("c", weight=-0.8)]},
    "ties": {"merge_method": "ties", "base_model": "a",
             "models": [_m("b", weight=0.5, density=0.4), _m("c", weight=0.8, density=0.7)]},
    "ties_count_unnormalised": {"merge_method": "ties", "base_model": "a", "parameters": {"normalize": False},
                                "models": [_m("b", weight=1.0, density=0.3), _m("c", weight=0.6, density=0.5)]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "a",
                    "models": [_m("b", weight=0.5, density=0.8), _m("c", weight=0.8, density=0.7, gamma=0.05)]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "a",
                         "models": [_m("b", weight=0.5, density=0.9), _m("c", weight=0.3, density=0.6)]},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "a",
                "models": [_m("b", weight=0.3), _m("c", weight=0.6)]},
    "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_row_wise": True,
                                                                       "nuslerp_flatten": False},
                             "models": [_m("b", weight=0.3), _m("c", weight=0.6)]},
    "model_stock": {"merge_method": "model_stock", "base_model": "a", "models": [_m("b"), _m("c")]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "a", "parameters": {"filter_wise": True},
                                "models": [_m("b"), _m("c")]},
    "nuslerp_no_base": {"merge_method": "nuslerp", "models": [_m("b", weight=0.3), _m("c", weight=0.6)]},
    "nuslerp_rows": {"merge_method": "nuslerp", "base_model": "a", "parameters": {"nuslerp_row_wise": True,
                                                                                  "nuslerp_flatten": False},
                     "models": [_m("b", weight=0.3), _m("c", weight=0.6)]},
    "passthrough": {"merge_method": "passthrough", "slices": _slices([("a", (0, 1))], [("b", (0, 2))])},
    "ties_bf16": {"merge_method": "ties", "base_model": "a", "dtype": "bfloat16",
                  "models": [_m("b", weight=0.5, density=0.4), _m("c", weight=0.8, density=0.7)]},
    "slerp_bf16": {"merge_method": "slerp", "base_model": "a", "dtype": "bfloat16", "parameters": {"t": 0.3},
                   "models": [_m("a"), _m("b")]},
    "linear_bf16_out": {"merge_method": "linear", "out_dtype": "bfloat16", "dtype": "float32",
                        "models": [_m("a", weight=1.0), _m("c", weight=2.0)]},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_equals_mergekit(models, tmp_path, monkeypatch, name):
    monkeypatch.chdir(models["root"])
    recipe = RECIPES[name]
    theirs = _mergekit(recipe, tmp_path / "mergekit")
    ours = _ours(recipe, tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    exempt = {"ties_bf16": _tied_at_threshold, "slerp_bf16": _at_rounding_midpoint}.get(name)
    tied = exempt(recipe, models) if exempt else {}
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        differ = ~torch.isclose(ours[key].float(), theirs[key].float(), rtol=0, atol=1e-5)
        if key in tied:  # ties: bfloat16 magnitudes tie at the k-th value, kept by position here, by sort order there;
            differ &= ~tied[key]  # slerp: the float32 result lies at a bfloat16 rounding midpoint
        assert not differ.any(), f"{key}: {int(differ.sum())} entries differ"
    base = load_file(models["a"] / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in ours if k in base)  # a merge, not a copy


def _tied_at_threshold(recipe: dict, models: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Per tensor, the entries whose task-vector magnitude in some model equals its k-th largest
    (where TIES' selection has to break a tie)."""
    base = load_file(models[recipe["base_model"]] / "model.safetensors")
    tied = {key: torch.zeros(t.shape, dtype=torch.bool) for key, t in base.items()}
    for entry in recipe["models"]:
        other = load_file(models[entry["model"]] / "model.safetensors")
        for key, t in base.items():
            magnitude = (other[key].bfloat16() - t.bfloat16()).abs().float().reshape(-1)
            k = max(1, int(entry["parameters"]["density"] * magnitude.numel()))
            kth = magnitude.kthvalue(magnitude.numel() - k + 1).values
            tied[key] |= (magnitude == kth).reshape(t.shape)
    return tied


def _at_rounding_midpoint(recipe: dict, models: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Per tensor, the entries of a bfloat16 SLERP whose exact value lies within 1e-5 (relative)
    of a bfloat16 rounding midpoint: there the float32 coefficients' own rounding decides the last
    bit (mergekit's float32 dot product is itself ~2e-6 off the exact one on these tensors)."""
    import math

    t = recipe["parameters"]["t"]
    a, b = (load_file(models[m] / "model.safetensors") for m in ("a", "b"))
    near = {}
    for key in a:
        x, y = a[key].bfloat16().double(), b[key].bfloat16().double()
        theta = math.acos(float((x * y).sum() / (x.norm() * y.norm())))
        exact = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
        near[key] = (exact * (1 - 1e-5)).float().bfloat16() != (exact * (1 + 1e-5)).float().bfloat16()
    return near


def test_magnitude_keeps_exactly_k_largest_ties_by_position():
    import numpy as np

    from llmctl.core.merge.sparsify import largest_magnitudes, magnitude_outliers

    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 100, generator=g).numpy()
    for k in (1, 17, 2500, 4999):  # distinct magnitudes: the argsort's selection
        expected = np.zeros(5000, dtype=bool)
        expected[np.argsort(-np.abs(values).reshape(-1))[:k]] = True
        assert np.array_equal(largest_magnitudes(values, k), expected.reshape(50, 100))
    tied = np.array([3.0, 1.0, -2.0, 2.0, 2.0, 0.5, -2.0], dtype=np.float32)
    assert largest_magnitudes(tied, 3).tolist() == [True, False, True, True, False, False, False]
    assert largest_magnitudes(tied, 0).sum() == 0 and largest_magnitudes(tied, 7).all()
    delta = torch.randn(100, 40, generator=g).bfloat16().float().numpy()  # bfloat16 values: many equal magnitudes
    kept = magnitude_outliers(delta, density=0.7, gamma=0.05)
    assert int(kept.sum()) == 2800
    order = np.abs(delta).reshape(-1)
    assert order[kept.reshape(-1)].min() >= np.sort(order[~kept.reshape(-1)])[:1000].max()
    assert order[kept.reshape(-1)].max() <= np.sort(order[~kept.reshape(-1)])[1000:].min()


def test_every_method_is_registered_with_declared_parameters():
    assert set(METHODS.names()) >= {"linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
                                    "passthrough"}
    ties = {p.name: p for p in METHODS.get("ties").params}
    assert ties["weight"].per_model and ties["weight"].required and ties["density"].default == 1.0
    assert ties["normalize"].default is True and "lambda" in ties and "gamma" not in ties
    assert {p.name: p.default for p in METHODS.get("della").params}["epsilon"] == 0.15
    assert METHODS.get("dare_ties").random and not METHODS.get("ties").random


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_are_seeded_and_keep_the_density(models, tmp_path, monkeypatch, method):
    monkeypatch.chdir(models["root"])
    recipe = {"merge_method": method, "base_model": "a", "parameters": {"rescale": False},
              "models": [_m("b", weight=1.0, density=0.3)]}
    first = _ours(recipe, tmp_path / "1", seed=7)
    again = _ours(recipe, tmp_path / "2", seed=7)
    other = _ours(recipe, tmp_path / "3", seed=8)
    base, b = load_file(models["a"] / "model.safetensors"), load_file(models["b"] / "model.safetensors")
    kept = total = 0
    for key in first:
        assert torch.equal(first[key], again[key]), key
        from_b = torch.isclose(first[key], b[key], atol=0, rtol=1e-6)
        from_base = torch.isclose(first[key], base[key], atol=0, rtol=1e-6)
        assert bool((from_b | from_base).all()), key  # each entry kept whole or dropped
        kept, total = kept + int(from_b.sum()), total + from_b.numel()
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert abs(kept / total - 0.3) < 0.02


def test_dare_rescale_keeps_the_l1_norm_of_each_task_vector(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["root"])
    merged = _ours({"merge_method": "dare_linear", "base_model": "a", "models": [_m("b", weight=1.0, density=0.5)]},
                   tmp_path / "out")
    base, b = load_file(models["a"] / "model.safetensors"), load_file(models["b"] / "model.safetensors")
    for key in merged:
        before, after = (b[key] - base[key]).abs().sum(), (merged[key] - base[key]).abs().sum()
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)


def test_full_density_dare_ties_is_ties_without_sparsification(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["root"])
    both = [_m("b", weight=0.5), _m("c", weight=0.8)]
    dare = _ours({"merge_method": "dare_ties", "base_model": "a", "models": both}, tmp_path / "dare")
    ties = _ours({"merge_method": "ties", "base_model": "a", "parameters": {"normalize": False}, "models": both},
                 tmp_path / "ties")
    for key in dare:
        torch.testing.assert_close(dare[key], ties[key], rtol=0, atol=0)


def test_passthrough_renumbers_layers_and_loads_in_transformers(models, tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(models["root"])
    out = tmp_path / "frankenmerge"
    merged = _ours({"merge_method": "passthrough", "slices": _slices([("a", (0, 2))], [("b", (1, 2))])}, out)
    b = load_file(models["b"] / "model.safetensors")
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, model.config.vocab_size)


def test_sharded_input_equals_unsharded(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["root"])
    assert (models["b_sharded"] / "model.safetensors.index.json").is_file()
    one = _ours({"merge_method": "slerp", "base_model": "a", "models": [_m("a"), _m("b")], "parameters": {"t": 0.4}},
                tmp_path / "1")
    two = _ours({"merge_method": "slerp", "base_model": "a", "models": [_m("a"), _m("b_sharded")],
                 "parameters": {"t": 0.4}}, tmp_path / "2")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_llmctl_checkpoints_merge_and_load(tmp_path):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import load_model, save_model

    cfg = ModelConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=16, position="alibi")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(build_model(cfg), tmp_path / f"m{seed}")
    paths = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    merge(parse_recipe({"merge_method": "linear", "models": [_m(p, weight=1.0) for p in paths]}), tmp_path / "avg")
    merged, _ = load_model(tmp_path / "avg")
    m0, m1 = load_model(paths[0])[0].state_dict(), load_model(paths[1])[0].state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, (m0[key] + m1[key]) / 2)


def test_shape_mismatch_is_named_before_any_output(models, tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(models["root"])
    config = transformers.AutoConfig.from_pretrained(models["a"])
    config.intermediate_size = 48
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\[32, 64\].*\[32, 48\]"):
        merge(parse_recipe({"merge_method": "linear", "models": [_m("a", weight=1), _m(str(tmp_path / "wide"),
                                                                                        weight=1)]}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "ties", "base_model": "a", "models": [_m("b"), _m("c")]}, "missing required parameter 'weight'"),
    ({"merge_method": "slerp", "base_model": "a", "models": [_m("b"), _m("c")], "parameters": {"t": 0.5}},
     "takes exactly 2 input models"),
    ({"merge_method": "tie", "models": [_m("a")]}, "did you mean 'ties'"),
    ({"merge_method": "linear", "models": [_m("a", weight="heavy")]}, "expected float"),
    ({"merge_method": "linear", "model": [_m("a")]}, "unknown key 'model'"),
    ({"merge_method": "passthrough", "slices": _slices([("a", (0, 5))])}, r"layer_range \[0, 5\] of a goes past"),
    ({"merge_method": "ties", "slices": _slices([("b", (0, 2)), ("c", (0, 2))]), "base_model": "a",
      "parameters": {"weight": 1}}, "needs a base_model among its input models"),
])
def test_recipe_errors(models, tmp_path, monkeypatch, recipe, message):
    from llmctl.errors import UsageError

    monkeypatch.chdir(models["root"])
    with pytest.raises((ConfigError, UsageError), match=message):
        merge(parse_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_short_form_equals_recipe_and_records_lineage(models, tmp_path, llmctl, monkeypatch):
    monkeypatch.chdir(models["root"])
    out = tmp_path / "short"
    result = llmctl("merge", "a", "b", "--method", "slerp", "--t", "0.5", "-o", out, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["tensors"] == len(load_file(out / "model.safetensors"))
    (tmp_path / "r.yaml").write_text("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
                                     "parameters:\n  t: 0.5\n")
    assert llmctl("merge", "--config", tmp_path / "r.yaml", "-o", tmp_path / "long").code == 0
    short, long = load_file(out / "model.safetensors"), load_file(tmp_path / "long" / "model.safetensors")
    assert all(torch.equal(short[k], long[k]) for k in short)
    lineage = json.loads((out / "llmctl.json").read_text())
    from llmctl.core.checkpoint import checkpoint_hash

    assert lineage["command"] == "merge" and lineage["merge_method"] == "slerp"
    assert [p["hash"] for p in lineage["parents"]] == [checkpoint_hash(models["a"]), checkpoint_hash(models["b"])]
    assert lineage["config"]["recipe"]["parameters"] == {"t": 0.5}
    assert (out / "tokenizer.json").read_bytes() == (models["a"] / "tokenizer.json").read_bytes()
    assert "merge method" in llmctl("info", out).stderr
    shown = llmctl("info", out, "--json").json()["lineage"]
    assert shown["merge_method"] == "slerp" and [p["path"] for p in shown["parents"]] == \
        [str(models["a"].resolve()), str(models["b"].resolve())]
    again = llmctl("merge", "a", "b", "--method", "slerp", "--t", "0.5", "-o", out)
    assert again.code == 2 and "--force" in again.stderr
    assert llmctl("merge", "a", "b", "--method", "linear", "-o", out, "--force").code == 0
    not_ours = tmp_path / "keep"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    assert llmctl("merge", "a", "b", "-o", not_ours, "--force").code == 2
    assert (not_ours / "notes.txt").is_file()


def test_cli_errors_and_listing(models, tmp_path, llmctl, monkeypatch):
    monkeypatch.chdir(models["root"])
    listed = llmctl("merge", "--list", "--json")
    assert listed.code == 0 and listed.json()["ties"]["parameters"][0]["name"] == "weight"
    assert llmctl("merge", "a", "b", "-o", tmp_path / "x", "--method", "ties", "--param", "weight").code == 2
    missing = llmctl("merge", "a", "nope", "-o", tmp_path / "x")
    assert missing.code == 2 and "nope does not exist" in missing.stderr
    both = llmctl("merge", "a", "b", "--config", "x.yaml", "-o", tmp_path / "x")
    assert both.code == 2 and "exclude each other" in both.stderr
    assert not (tmp_path / "x").exists()


def test_tokenizer_source(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["root"])
    both = [_m("b", weight=1.0), _m("c", weight=1.0)]
    merge(parse_recipe({"merge_method": "linear", "models": both, "tokenizer_source": "a"}), tmp_path / "given")
    assert (tmp_path / "given" / "tokenizer.json").is_file()
    merge(parse_recipe({"merge_method": "linear", "models": both}), tmp_path / "none")
    assert not (tmp_path / "none" / "tokenizer.json").exists()  # b and c carry no tokenizer
    with pytest.raises(Exception, match="b has no tokenizer files"):  # no base_model: the first model
        merge(parse_recipe({"merge_method": "linear", "models": both, "tokenizer_source": "base"}), tmp_path / "x")


def test_peak_memory_is_about_one_tensor_per_input(tmp_path):
    """Sixteen 8 MiB tensors per model: the merge's peak RSS above its imports stays near one
    tensor per input plus the result, and what malloc may keep of freed blocks (its trim
    threshold, 64 MiB); memory-mapped reads would hold both whole files (2 × 128 MiB)."""
    import subprocess
    import sys

    for seed, name in enumerate(("x", "y")):
        g = torch.Generator().manual_seed(seed)
        (tmp_path / name).mkdir()
        save_file({f"model.layers.{i}.mlp.weight": torch.randn(1024, 2048, generator=g) for i in range(16)},
                  tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 16}))
    script = f"""
import re, json, torch
from pathlib import Path
from llmctl.core.merge import merge, parse_recipe
def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
recipe = parse_recipe({{"merge_method": "linear", "models": [{{"model": "{tmp_path / 'x'}", "parameters": {{"weight": 1}}}},
                                                         {{"model": "{tmp_path / 'y'}", "parameters": {{"weight": 1}}}}]}})
before = rss("VmRSS")
merge(recipe, "{tmp_path / 'out'}")
print(json.dumps({{"before": before, "peak": rss("VmHWM")}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    from llmctl.runtime import TRIM_THRESHOLD

    tensor_mib, inputs = 8, 2
    assert figures["peak"] - figures["before"] < 2 * tensor_mib * inputs + (TRIM_THRESHOLD >> 20), figures


def test_read_tensor_equals_the_memory_mapped_tensor(tmp_path):
    from llmctl.core.checkpoint import open_checkpoint

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor(2.5), "d": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ck = open_checkpoint(tmp_path)
    for name, tensor in tensors.items():
        read = ck.read_tensor(name)
        assert read.dtype == tensor.dtype and torch.equal(read, ck.get_tensor(name)) and torch.equal(read, tensor)


@pytest.mark.parametrize("preset", ["slerp", "ties", "passthrough", "greedy_soup", "evolve"])
def test_presets_are_valid_recipes(preset):
    """configs/merge: the plain recipes are mergekit's schema (mergekit itself accepts them)."""
    from mergekit.config import MergeConfiguration

    from llmctl.config import preset_path
    from llmctl.core.merge.recipe import read_yaml
    from llmctl.core.merge.search import Objective

    raw = read_yaml(preset_path(preset, "merge"))
    recipe = raw.get("recipe", raw)
    if "evaluation" in raw:
        Objective.parse(raw["evaluation"], preset)
    if recipe["merge_method"] in METHODS:
        parse_recipe(recipe, preset)
        MergeConfiguration.model_validate(recipe)


def test_lora_input_equals_merging_its_merged_weights(models, tmp_path, monkeypatch):
    from llmctl.core.adapters import LoRA, lora_modules, merge_adapter, save_adapter
    from llmctl.core.model.io import load_model, save_model

    monkeypatch.chdir(models["root"])
    model, _ = load_model(models["a"], transforms=[LoRA(r=4, target_modules=["q_proj", "down_proj"])])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / "adapter", base=models["a"])
    save_model(merge_adapter(model), tmp_path / "folded")
    recipe = lambda first: {"merge_method": "slerp", "base_model": first, "parameters": {"t": 0.4},  # noqa: E731
                            "models": [_m(first), _m("b")]}
    expected = _ours(recipe(str(tmp_path / "folded")), tmp_path / "expected")
    for ref in (str(tmp_path / "adapter"), f"a+{tmp_path / 'adapter'}"):
        out = tmp_path / f"out-{len(ref)}"
        merged = _ours(recipe(ref), out)
        assert merged.keys() == expected.keys()
        for key in merged:
            torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6, msg=key)
        parents = [p["path"] for p in json.loads((out / "llmctl.json").read_text())["parents"]]
        assert parents == [str(models["a"].resolve()), str((tmp_path / "adapter").resolve()),
                           str(models["b"].resolve())]
        assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out-*"))  # the materialised inputs are gone
    plain = _ours(recipe("a"), tmp_path / "plain")  # the adapter did change the merge
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"],
                           plain["model.layers.0.self_attn.q_proj.weight"])


def test_bfloat16_casts_equal_torch():
    """numpy has no bfloat16: widening and round-to-nearest-even narrowing equal torch's (∞, NaN,
    halfway cases, overflow, subnormals)."""
    import numpy as np

    from llmctl.core.merge.arrays import Numpy

    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-30, 30, (100_000,), generator=g),
                        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1 + 2**-8, 1 + 3 * 2**-8,
                                      3.4e38, 1e-40])])
    xp = Numpy()
    narrowed = xp.cast(values.numpy(), "float32", "bfloat16")
    assert narrowed.dtype == np.uint16
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    number = ~values.isnan().numpy()  # a NaN stays a NaN; its payload bits are torch's choice
    assert np.array_equal(narrowed[number], bits[number])
    widened = xp.cast(narrowed, "bfloat16", "float32")
    expected = values.to(torch.bfloat16).float().numpy()
    assert np.array_equal(widened, expected, equal_nan=True)
    assert np.array_equal(xp.cast(narrowed, "bfloat16", "float16"), values.to(torch.bfloat16).half().numpy(),
                          equal_nan=True)


@pytest.mark.parametrize("recipe", [
    {"merge_method": "linear", "dtype": "bfloat16", "models": [_m("a", weight=0.3), _m("b", weight=0.9)]},
    {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False},
     "models": [_m("a", weight=0.5), _m("c", weight=0.25)]},
    {"merge_method": "passthrough", "slices": _slices([("a", (0, 1))], [("b", (1, 2))]),
     "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": None}]}},
    {"merge_method": "slerp", "base_model": "a", "models": [_m("a"), _m("b")],
     "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.3}]}},
    {"merge_method": "ties", "base_model": "a", "dtype": "bfloat16",
     "models": [_m("b", weight=0.5, density=0.4), _m("c", weight=0.8, density=0.7)]},
    {"merge_method": "dare_ties", "base_model": "a", "models": [_m("b", weight=0.7, density=0.5), _m("c", weight=0.6)]},
])
def test_numpy_path_equals_torch_path_without_importing_torch(models, tmp_path, monkeypatch, recipe):
    """linear, slerp, passthrough and the TIES family run on numpy (no torch import) and write
    what the torch path writes (there they get the tensors' memory as numpy arrays)."""
    import subprocess
    import sys

    from llmctl.core.merge import arrays, run

    monkeypatch.chdir(models["root"])
    p = run.plan(parse_recipe(recipe))
    assert isinstance(arrays.backend_for(p), arrays.Numpy)
    script = (f"import sys, json; from llmctl.core.merge import merge, parse_recipe; "
              f"merge(parse_recipe(json.loads({json.dumps(json.dumps(recipe))})), {str(tmp_path / 'numpy')!r}); "
              f"print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=models["root"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]
    monkeypatch.setattr(run, "backend_for", lambda plan: arrays.Torch())
    expected = _ours(recipe, tmp_path / "torch")
    got = load_file(tmp_path / "numpy" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
