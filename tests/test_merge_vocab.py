"""`tokenizer_source` with different vocabularies: the union tokenizer and the embedding /
lm_head rows of every token equal mergekit's, and the output loads in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.core.merge import merge, parse_recipe
from llmctl.errors import ConfigError
from conftest import tiny_llama

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny llamas whose BPE vocabularies share the bytes and special tokens but not all
    merges (named apart from test_merge's: mergekit caches models by reference)."""
    root = tmp_path_factory.mktemp("vocab")
    texts = {"va": ["merge these models " * 20, "tensor by tensor"],
             "vb": ["tokenizers differ between models " * 20, "every token its row"],
             "vc": ["tokenizers differ between models " * 20, "models merge at last"]}
    for i, (name, text) in enumerate(texts.items()):
        (root / name).mkdir()
        tiny_llama(root / name, text, vocab=290 + 10 * i, context=64, scale=1.0)
        g = torch.Generator().manual_seed(i)
        weights = load_file(root / name / "model.safetensors")
        save_file({k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in weights.items()},
                  root / name / "model.safetensors", metadata={"format": "pt"})
    (root / "vb" / "tokenizer.json").write_text(_with_added(root / "vb", "<|tool|>"))
    _set_vocab_size(root / "vb")
    return {name: root / name for name in texts} | {"root": root}


def _with_added(path: Path, token: str) -> str:
    """b's tokenizer.json with one more special token (an added token only b has)."""
    data = json.loads((path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": len(data["model"]["vocab"]), "content": token, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return json.dumps(data)


def _set_vocab_size(path: Path) -> None:
    """Grow the checkpoint's embedding and head by one row for the added token."""
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(9)
    for key in VOCAB:
        weights[key] = torch.cat([weights[key], torch.randn(1, weights[key].shape[1], generator=g)])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] += 1
    (path / "config.json").write_text(json.dumps(config))


def _mergekit(recipe: dict, out: Path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True))
    return load_file(out / "model.safetensors"), _vocab(out)


def _vocab(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)


def _m(name, **params):
    return {"model": name, "parameters": params} if params else {"model": name}


RECIPES = {
    "union_linear_no_base": {"merge_method": "linear", "tokenizer_source": "union",
                             "models": [_m("va", weight=0.3), _m("vb", weight=0.7), _m("vc", weight=0.5)]},
    "union_ties": {"merge_method": "ties", "base_model": "va", "tokenizer_source": "union",
                   "models": [_m("vb", weight=0.6, density=0.5), _m("vc", weight=0.8, density=0.7)]},
    "union_slerp_bf16": {"merge_method": "slerp", "base_model": "vb", "tokenizer_source": "union", "dtype": "bfloat16",
                         "models": [_m("vb"), _m("va")], "parameters": {"t": 0.3}},
    "base_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "vc", "tokenizer_source": "base",
                             "models": [_m("va", weight=0.5), _m("vb", weight=0.5)]},
    "model_linear": {"merge_method": "linear", "tokenizer_source": "vb",
                     "models": [_m("va", weight=1.0), _m("vc", weight=1.0)]},
    "tokens_block": {"merge_method": "linear", "base_model": "va",
                     "models": [_m("va", weight=0.5), _m("vb", weight=0.5)],
                     "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                         "<|tool|>": {"source": {"kind": "model_token", "model": "va", "token": "<|eos|>"}},
                         "<|bos|>": {"source": "vb", "force": True},
                         "<|new|>": {"source": {"kind": "zero"}}}}},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_rows_and_vocabulary_equal_mergekit(models, tmp_path, monkeypatch, name):
    monkeypatch.chdir(models["root"])
    recipe = RECIPES[name]
    theirs, their_vocab = _mergekit(recipe, tmp_path / "mergekit")
    merge(parse_recipe(recipe), tmp_path / "ours")
    ours, our_vocab = load_file(tmp_path / "ours" / "model.safetensors"), _vocab(tmp_path / "ours")
    assert our_vocab.keys() == their_vocab.keys()
    source = recipe.get("tokenizer", {}).get("source", recipe.get("tokenizer_source"))
    first = _vocab(models[recipe.get("base_model", "va") if source in ("union", "base") else source])
    assert all(our_vocab[t] == i for t, i in first.items())  # the base's ids are kept
    assert ours.keys() == theirs.keys()
    rows = sorted(our_vocab, key=our_vocab.get)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        if key in VOCAB:  # mergekit numbers the new tokens in hash order: compare the rows token by token
            assert ours[key].shape == theirs[key].shape, key
            index = torch.tensor([their_vocab[t] for t in rows])
            n = len(rows)
            torch.testing.assert_close(ours[key][:n].float(), theirs[key][index].float(), rtol=0, atol=1e-5, msg=key)
            torch.testing.assert_close(ours[key][n:].float(), theirs[key][n:].float(), rtol=0, atol=1e-5, msg=key)
        else:
            torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=0, atol=1e-5, msg=key)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["vocab_size"] == ours["model.embed_tokens.weight"].shape[0] == \
        json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"]


def test_union_output_loads_and_rows_come_from_the_models_that_have_the_token(models, tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(models["root"])
    out = tmp_path / "out"
    merge(parse_recipe(RECIPES["union_linear_no_base"]), out)
    vocab = _vocab(out)
    a, b, c = (_vocab(models["v" + m]) for m in "abc")
    assert vocab.keys() == a.keys() | b.keys() | c.keys() and len(vocab) > len(a)
    merged = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    weights = {m: load_file(models["v" + m] / "model.safetensors")["model.embed_tokens.weight"] for m in "abc"}
    only_b = next(t for t in b if t not in a and t not in c)
    torch.testing.assert_close(merged[vocab[only_b]], weights["b"][b[only_b]])  # its one donor's row
    shared = next(t for t in b if t in c and t not in a)  # a's row: the mean of b's and c's (no base)
    rb, rc = weights["b"][b[shared]], weights["c"][c[shared]]
    torch.testing.assert_close(merged[vocab[shared]], (0.3 * (rb + rc) / 2 + 0.7 * rb + 0.5 * rc) / 1.5)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == len(vocab)
    ids = tok("<|tool|> tokenizers differ", return_tensors="pt").input_ids
    assert int(ids.max()) >= len(a) and model(ids).logits.shape == (1, ids.shape[1], len(vocab))


def test_token_sources_are_checked_before_any_output(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["root"])
    recipe = {"merge_method": "linear", "models": [_m("va", weight=1.0), _m("vb", weight=1.0)],
              "tokenizer": {"source": "union", "tokens": {"x": {"source": "vc"}}}}
    with pytest.raises(ConfigError, match="vc is not one of the merged models"):
        merge(parse_recipe(recipe), tmp_path / "out")
    with pytest.raises(ConfigError, match="not both"):
        parse_recipe({**recipe, "tokenizer_source": "union"})
    assert not (tmp_path / "out").exists()
