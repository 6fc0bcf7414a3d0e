"""Merges chosen by an eval score: greedy soups keep only helpful candidates; the evolution
strategy is seeded and improves on its start within its budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama


def _noisy(src: Path, dst: Path, seed: int, scale: float) -> Path:
    """`src` plus seeded noise of `scale` × each tensor's std, with `src`'s tokenizer."""
    from safetensors.torch import save_file

    dst.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + torch.randn(v.shape, generator=g) * v.std() * scale
               for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("soup")
    text = "the cat sat on the mat and the dog sat on the log " * 8
    (root / "val.txt").write_text(text)
    (root / "good").mkdir()
    tiny_llama(root / "good", [text], vocab=290, context=64, scale=1.0)
    _noisy(root / "good", root / "near", 1, 0.05)
    _noisy(root / "good", root / "bad", 2, 30.0)
    return root


EVALUATION = {"task": "perplexity", "data": "val.txt"}


def test_greedy_soup_keeps_only_candidates_that_help(pool, tmp_path, llmctl):
    recipe = pool / "soup.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "greedy_soup", "models": ["bad", "near", "good"],
                                      "evaluation": EVALUATION}))
    out = tmp_path / "soup"
    result = llmctl("merge", "--config", recipe, "-o", out, "--json")
    assert result.code == 0, result.stderr
    summary = result.json()
    kept = [Path(m).name for m in summary["kept"]]
    assert "bad" not in kept and kept[0] in ("good", "near")
    scores = {Path(k).name: v for k, v in summary["individual_scores"].items()}
    assert scores["bad"] < min(scores["good"], scores["near"])  # -perplexity: higher is better
    merged = load_file(out / "model.safetensors")
    members = [load_file(pool / name / "model.safetensors") for name in kept]
    for key, value in merged.items():
        torch.testing.assert_close(value, sum(m[key] for m in members) / len(members))
    lineage = json.loads((out / "llmctl.json").read_text())
    assert lineage["config"]["search"] == "greedy_soup" and len(lineage["config"]["trials"]) == 2
    assert not list(tmp_path.glob(".soup.merge-*"))  # candidates cleaned up


def test_evolve_is_seeded_and_improves_on_its_start(pool, tmp_path, llmctl):
    search = {"recipe": {"merge_method": "linear", "models": [{"model": "good", "parameters": {"weight": 1.0}},
                                                              {"model": "bad", "parameters": {"weight": 0.5}}]},
              "search": {"models.1.parameters.weight": [0.0, 1.0]},
              "evaluation": EVALUATION, "budget": 7, "population": 3, "seed": 3}
    (pool / "search.yaml").write_text(yaml.safe_dump(search))
    runs = []
    for name in ("one", "two"):
        result = llmctl("merge", "--evolve", pool / "search.yaml", "-o", tmp_path / name, "--json")
        assert result.code == 0, result.stderr
        runs.append(result.json())
    first, second = runs
    assert first["best"] == second["best"] and first["evaluations"] == 7
    lineage = json.loads((tmp_path / "one" / "llmctl.json").read_text())["config"]
    start = lineage["history"][0]
    assert start["point"] == {"models.1.parameters.weight": 0.5}
    assert first["score"] >= max(h["score"] for h in lineage["history"]) > start["score"]
    assert first["best"]["models.1.parameters.weight"] < 0.5
    assert first["recipe"]["models"][1]["parameters"]["weight"] == first["best"]["models.1.parameters.weight"]


def test_search_errors(pool, tmp_path, llmctl):
    (pool / "bad_search.yaml").write_text(yaml.safe_dump({"recipe": {"merge_method": "linear", "models": ["good"]},
                                                          "search": {"models.7.weight": [0, 1]},
                                                          "evaluation": EVALUATION}))
    result = llmctl("merge", "--evolve", pool / "bad_search.yaml", "-o", tmp_path / "x")
    assert result.code == 2 and "models.7.weight" in result.stderr
    (pool / "no_eval.yaml").write_text(yaml.safe_dump({"merge_method": "greedy_soup", "models": ["good", "near"]}))
    result = llmctl("merge", "--config", pool / "no_eval.yaml", "-o", tmp_path / "x")
    assert result.code == 2 and "evaluation" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_search_never_replaces_one_of_its_candidates(pool, tmp_path, llmctl):
    """`-o CANDIDATE --force`, where the candidate is an earlier merge (an output of ours): refused
    before any scoring, by the greedy soup (the candidate would not be kept) and by evolve."""
    earlier = pool / "earlier"
    result = llmctl("merge", pool / "good", pool / "near", "--method", "linear", "-o", earlier)
    assert result.code == 0, result.stderr
    before = (earlier / "model.safetensors").read_bytes()
    (pool / "soup2.yaml").write_text(yaml.safe_dump({"merge_method": "greedy_soup", "models": ["good", "bad", "earlier"],
                                                     "evaluation": EVALUATION}))
    (pool / "search2.yaml").write_text(yaml.safe_dump({
        "recipe": {"merge_method": "linear", "models": [{"model": "good", "parameters": {"weight": 1.0}},
                                                        {"model": "earlier", "parameters": {"weight": 0.5}}]},
        "search": {"models.1.parameters.weight": [0.0, 1.0]}, "evaluation": EVALUATION, "budget": 2}))
    for args in (["--config", pool / "soup2.yaml"], ["--evolve", pool / "search2.yaml"]):
        result = llmctl("merge", *args, "-o", earlier, "--force")
        assert result.code == 2 and "it is the input" in result.stderr, result.stderr
        assert (earlier / "model.safetensors").read_bytes() == before
