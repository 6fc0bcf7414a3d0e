"""Edges of the merge methods and sparsifiers that the checkpoint-level mergekit parity tests
miss (found by mutation testing): each compared with mergekit's own function on small arrays —
the declared parameters against mergekit's specs, SLERP of a zero or nearly collinear tensor,
NuSLERP column-wise and with collinear vectors, task arithmetic's divisor (normalised without a
consensus, weights that cancel, a single task vector), bfloat16 rescaling, DELLA's ε. Then the
vocabulary (mergekit's `build_tokenizer` and `PermutedVocabulary`), the plan (its `MergePlanner`)
and the recipe (its `evaluate_setting`; every refusal by its message)."""

# No `from __future__ import annotations`: the plugin below declares its parameters with real types.
import dataclasses
import re
import typing

import numpy as np
import pytest
import torch

from llmctl.core.merge import METHODS
from llmctl.core.merge.methods import REQUIRED, Inputs, nuslerp_tensors, slerp_arrays
from llmctl.core.merge.plan import promote
from llmctl.core.merge.sparsify import sparsify

BUILT_IN = ["linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
            "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough"]


def _their_params(name: str) -> dict:
    """mergekit's parameter spec of `name`: {name: (type, per model, default or REQUIRED)}."""
    from mergekit.merge_methods import ParameterScope, get

    spec = {}
    for p in get(name).spec.parameters:
        kind = next((t for t in typing.get_args(p.value_type) if t is not type(None)), p.value_type)
        spec[p.name] = (kind, p.scope is not ParameterScope.SHARED, REQUIRED if type(p.default) is object else p.default)
    return spec


@pytest.mark.parametrize("name", BUILT_IN)
def test_declared_parameters_equal_mergekits_spec(name):
    declared = dataclasses.replace(METHODS.get(name))  # declared anew: its signature read under the test
    assert {p.name: (p.type, p.per_model, p.default) for p in declared.params} == _their_params(name)


Weights = list[float]  # a name only the plugin's module knows


def test_register_reads_a_plugins_signature(monkeypatch):
    """A third-party method: real or string annotations (evaluated in its own module), `X | None`,
    a keyword's trailing underscore, keyword-only arguments bound, defaulted or left out."""
    from llmctl.core.merge import methods
    from llmctl.core.registry import Registry

    monkeypatch.setattr(methods, "METHODS", Registry("merge method"))

    def scaled(inputs: Inputs, weight: list[float], lambda_: float = 2.0, shift: int | None = None, *,
               mode: str = "add", extra: int = 0, hidden: bool = False) -> np.ndarray:
        return sum(w * x for w, x in zip(weight, inputs.others)) * lambda_ + (shift or 0) + extra * (mode == "add")

    def aliased(inputs: "Inputs", weight: "Weights", flag: "bool" = False):
        return inputs.others[0]

    assert methods.register("scaled", base="optional", inputs=(1, 2), fixed={"mode": "add"},
                            defaults={"extra": 5})(scaled) is scaled
    methods.register("aliased")(aliased)
    method = methods.METHODS.get("scaled")
    assert (method.fn, method.base, method.inputs) == (scaled, "optional", (1, 2))
    assert [(p.name, p.type, p.per_model, p.default) for p in method.params] == [
        ("weight", float, True, REQUIRED), ("lambda", float, False, 2.0), ("shift", int, False, None),
        ("extra", int, False, 5)]
    assert method(Inputs(None, [np.ones(2), np.full(2, 3.0)]), weight=[1.0, 2.0], extra=1, shift=1,
                  **{"lambda": 0.5}).tolist() == [5.5, 5.5]
    assert [(p.name, p.type, p.per_model, p.default) for p in methods.METHODS.get("aliased").params] == [
        ("weight", float, True, REQUIRED), ("flag", bool, False, False)]


def _their_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from mergekit.merge_methods.slerp import slerp

    return slerp(torch.tensor(t), torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()


@pytest.mark.parametrize("case", ["nearly_collinear", "antipodal", "zero_base", "zero_other", "both_zero", "apart"])
def test_slerp_equals_mergekits(case):
    g = np.random.default_rng(0)
    a = g.standard_normal((8, 16)).astype(np.float32)
    b = {"nearly_collinear": a + 0.02 * g.standard_normal((8, 16)).astype(np.float32),  # cos ≈ 0.9998: linear
         "antipodal": -a, "zero_base": a, "zero_other": np.zeros_like(a), "both_zero": np.zeros_like(a),
         "apart": g.standard_normal((8, 16)).astype(np.float32)}[case]
    if case in ("zero_base", "both_zero"):  # a zero-initialised bias
        a = np.zeros_like(a)
    theirs = _their_slerp(0.3, a, b)
    np.testing.assert_allclose(slerp_arrays(0.3, a.copy(), b.copy()), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row_wise, flatten", [(False, False), (True, False), (False, True), (True, True)])
def test_nuslerp_with_collinear_vectors_equals_mergekits(row_wise, flatten):
    """Each vector (a row, a column, or the flattened tensor) on its own sphere; collinear and
    antipodal ones interpolated linearly."""
    from mergekit.merge_methods.nuslerp import nuslerp

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    b[1], b[:, 2] = -2 * a[1], 3 * a[:, 2]  # row 1 antipodal, column 2 collinear
    for y in (b, 0.5 * a):  # 0.5·a: the flattened tensors collinear too
        ours = nuslerp_tensors(0.3, a, y, row_wise, flatten)
        theirs = nuslerp(0.3, a, y, dim=0 if row_wise else -1, flatten=flatten)
        assert ours.isfinite().all()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _both(name: str, base: np.ndarray, others: list[np.ndarray], narrow=None, **params):
    """(ours, mergekit's) merge of one tensor by the task-arithmetic family member `name`;
    per-model parameters as lists, the rest defaulted from the declared parameters."""
    from mergekit.merge_methods import TensorGroup, get

    declared = {p.name: p for p in METHODS.get(name).params}
    params = {k: [p.default] * len(others) if p.per_model else p.default
              for k, p in declared.items() if not p.required} | params
    inputs = Inputs(base.copy(), [o.copy() for o in others], np.random.default_rng(0))
    if narrow is not None:
        inputs.narrow = narrow
    ours = METHODS.get(name)(inputs, **params)
    dtype = torch.float32 if narrow is None else torch.bfloat16
    group = TensorGroup.from_tensors([torch.from_numpy(x).to(dtype) for x in [base, *others]], base_index=0)
    theirs = get(name).merge_group(group, **{k: {i + 1: x for i, x in enumerate(v)} if declared[k].per_model else v
                                               for k, v in params.items()})
    return ours, theirs.float().numpy()


def test_cancelling_linear_weights_merge_without_normalize():
    """normalize: false keeps a zero-sum linear merge meaningful (a difference of models): planned."""
    plan = _plan({"merge_method": "linear", "parameters": {"normalize": False},
                  "models": [{"model": "p", "parameters": {"weight": 1}}, {"model": "q", "parameters": {"weight": -1}}]},
                 p=_stack(), q=_stack())
    assert plan.jobs and all(j.params["weight"] == [1.0, -1.0] for j in plan.jobs)


@pytest.mark.parametrize("name, weight, extra", [
    ("task_arithmetic", [0.5, -0.8], {"normalize": True}),  # the sum of the weights divides
    ("task_arithmetic", [0.3, -0.3], {"normalize": True}),  # weights that cancel: not divided
    ("task_arithmetic", [1e-9, 0.0], {"normalize": True}),  # |Σ weights| < 1e-8: not divided
    ("task_arithmetic", [1e-8, 0.0], {"normalize": True}),  # at the bound (in float32): divided
    ("task_arithmetic", [0.5, 0.8], {"lambda": 2.0}),
    ("ties", [0.5, -0.5], {}),  # agreeing weighted deltas whose weights cancel: not divided
    ("ties", [0.0], {}),  # one task vector, weight 0: the base
    ("ties", [1e-9], {}),  # one task vector: its tiny weight divides (a consensus keeps only exact 0 out)
    ("breadcrumbs_ties", [0.4, 0.7], {"normalize": True, "density": [0.8, 0.6]}),
])
def test_task_arithmetic_divisor_equals_mergekits(name, weight, extra):
    g = np.random.default_rng(1)
    base = g.standard_normal((16, 8)).astype(np.float32)
    others = [base + g.standard_normal((16, 8)).astype(np.float32) for _ in weight]
    ours, theirs = _both(name, base, others, weight=weight, **extra)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(ours, base) or weight == [0.0]


def test_bfloat16_rescaled_ties_rounds_as_mergekit():
    """TIES with `rescale` in bfloat16: the L1 norms and the factor rounded at each step.
    Distinct magnitudes, so that no tie at the k-th value is broken differently."""
    from llmctl.core.merge.arrays import narrowed

    g = torch.Generator().manual_seed(0)
    base = np.zeros(64, dtype=np.float32)
    others = [((torch.randperm(64, generator=g) + 64) / 128 * torch.randn(64, generator=g).sign()).numpy()
              for _ in range(2)]  # bfloat16 values
    ours, theirs = _both("ties", base, others, narrow=lambda x: narrowed(x, "bfloat16"), weight=[0.6, 0.7],
                         density=[0.3, 0.5], rescale=True)
    np.testing.assert_array_equal(ours, theirs)


def test_della_keeps_by_rank_with_the_recipes_epsilon():
    """DELLA's MagPrune: an entry of rank r (of n, by magnitude in its row) is kept with probability
    density - ε + 2ε·r/(n - 1); ε given per model reaches the sparsifier."""
    g = np.random.default_rng(2)
    delta = g.standard_normal((400, 250)).astype(np.float32)
    base = np.zeros_like(delta)
    merged = METHODS.get("della_linear")(Inputs(base, [delta.copy()], g), weight=[1.0], density=[0.5],
                                         epsilon=[0.05], rescale=False, normalize=False, lambda_=1.0,
                                         int8_mask=False)
    kept = merged != 0
    assert np.array_equal(merged[kept], delta[kept])
    ranks = np.abs(delta).argsort(axis=1).argsort(axis=1)
    for low in range(0, 250, 50):  # by fifths of the ranks, 20,000 draws each
        band = (ranks >= low) & (ranks < low + 50)
        expected = 0.45 + 0.1 * ranks[band].mean() / 249
        assert abs(kept[band].mean() - expected) < 0.015, (low, kept[band].mean(), expected)


@pytest.mark.parametrize("density, epsilon", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.6), (0.5, 0.5), (0.4, 0.1)])
def test_della_refuses_probabilities_outside_0_1_as_mergekit(density, epsilon):
    from mergekit.sparsify import della_magprune

    delta = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    try:
        della_magprune(torch.from_numpy(delta), density, epsilon)
    except ValueError:
        with pytest.raises(ValueError, match=r"density ± epsilon must lie in \(0, 1\)"):
            sparsify("della_magprune", delta, density=density, epsilon=epsilon, generator=np.random.default_rng(0))
    else:
        sparsify("della_magprune", delta, density=density, epsilon=epsilon, generator=np.random.default_rng(0))


def _distinct(shape, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """Values of distinct magnitudes (no tie at any k-th value), random signs, times `scale`."""
    g = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return ((g.permutation(n) + 1) / n * g.choice([-1.0, 1.0], n) * scale).astype(np.float32).reshape(shape)


@pytest.mark.parametrize("method, density, options, delta", [
    ("magnitude", 0.3, {}, _distinct((16, 8))),
    ("magnitude", 0.0, {}, _distinct((16, 8))),
    ("magnitude", 0.5, {}, _distinct((1,))),  # a one-element tensor: its entry kept
    ("magnitude", 0.3, {"rescale": True}, _distinct((16, 8), 1e-4)),  # a fine-tuning delta: L1 norm < 1
    ("magnitude_outliers", 0.7, {"gamma": 0.05}, _distinct((16, 8))),
    ("magnitude_outliers", 0.97, {"gamma": 0.1}, _distinct((16, 8))),  # density + gamma > 1: fewer outliers
    ("magnitude_outliers", 0.5, {"gamma": 0.1, "rescale": True}, _distinct((16, 8), 1e-3)),
    ("della_magprune", 1.0, {"epsilon": 0.15}, _distinct((16, 8))),  # density 1 (the default): no-op
    ("random", 1.0, {}, _distinct((16, 8))),
])
def test_sparsifiers_equal_mergekits(method, density, options, delta):
    from mergekit.sparsify import RescaleNorm
    from mergekit.sparsify import sparsify as their_sparsify

    options = dict(options)
    rescale = options.pop("rescale", False)
    theirs = their_sparsify(torch.from_numpy(delta.copy()), density, method, rescale_norm=RescaleNorm.l1 if rescale else None,
                            **options)
    if method in ("random", "della_magprune"):
        options["generator"] = np.random.default_rng(0)
    ours = sparsify(method, delta.copy(), density=density, **({"rescale": True} if rescale else {}), **options)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("delta", [np.zeros((16, 8), np.float32), _distinct((16, 8))])
def test_rescaling_nothing_left_gives_zeros(delta):
    """DARE that drops every entry, or a tensor fine-tuning left unchanged: zeros, not 0/0."""
    out = sparsify("random", delta.copy(), density=1e-9, rescale=True, generator=np.random.default_rng(0))
    assert not out.any()


# ------------------------------------------------------------------ tokenizer_source (vocab.py)
# Small word-level vocabularies, each checked against mergekit's own `build_tokenizer` (the output
# vocabulary, every model's row of each token, the added tokens' settings) and `PermutedVocabulary`
# (the aligned embedding rows), without checkpoints: `build_vocabulary` reads only a model's
# directory and its config.

def _model_dir(path, vocab: list[str], special=(), size: int | None = None, tokenizer: bool = True):
    """A model directory: config.json (`size` rows; None: no vocab_size) and, with `tokenizer`, a
    word-level tokenizer of `vocab` whose `special` tokens are added (those not in `vocab` last)."""
    import json

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    path.mkdir()
    if tokenizer:
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
              "num_attention_heads": 2, "num_key_value_heads": 2}
    (path / "config.json").write_text(json.dumps(config | ({"vocab_size": size} if size else {})))
    return str(path)


@dataclasses.dataclass
class _Ck:
    """What `build_vocabulary` and `plan` read of a Checkpoint."""

    path: str
    config: dict
    shapes: dict = dataclasses.field(default_factory=dict)  # {name: (shape, dtype)}

    def tensor_shapes(self) -> dict:
        return self.shapes


def _vocabulary(recipe: dict, opened: dict | None = None):
    import json
    from pathlib import Path

    from llmctl.core.merge.recipe import parse_recipe
    from llmctl.core.merge.vocab import build_vocabulary

    recipe = parse_recipe(recipe)
    opened = opened or {m: m for m in recipe.models()}
    return build_vocabulary(recipe, {m: _Ck(p, json.loads((Path(p) / "config.json").read_text()))
                                     for m, p in opened.items()})


@pytest.fixture(scope="module")
def vocab_dirs(tmp_path_factory) -> dict[str, str]:
    """a: padded (9 rows, 7 tokens); b: 7 rows, its `yy`, `zz` and added `<t2>` past them, its
    plain tokens `f`, `e` in that id order; c: no tokenizer (a's vocabulary, as mergekit assumes);
    d, e: 2 rows, a plain and an added token at id 2."""
    root = tmp_path_factory.mktemp("vocab")
    return {"a": _model_dir(root / "a", ["<s>", "</s>", "a", "b", "c", "d", "yy"], ["<s>", "</s>"], size=9),
            "b": _model_dir(root / "b", ["<s>", "</s>", "c", "a", "f", "e", "<t1>", "yy", "zz"],
                            ["<s>", "</s>", "<t1>", "<t2>"], size=7),
            "c": _model_dir(root / "c", [], tokenizer=False, size=9),
            "d": _model_dir(root / "d", ["<s>", "</s>", "h"], ["<s>", "</s>"], size=2),  # `h` just past its rows
            "e": _model_dir(root / "e", ["<s>", "</s>"], ["<s>", "</s>", "<t3>"], size=2)}  # and an added token


def _vocab_recipe(case: str, d: dict[str, str]) -> dict:
    a, b, c = d["a"], d["b"], d["c"]
    extra = [{"model": d[m], "parameters": {"weight": 1.0}} for m in "de"]
    tokens = {"<new>": {"source": {"kind": "zero"}},
              "c": {"source": b, "force": True},
              "<t1>": {"source": {"kind": "model_token", "model": a, "token": "a"}},
              "e": {"source": {"kind": "model_token", "model": b, "token_id": 0}}}
    models = [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b, c)]
    return {"union_base": {"base_model": a, "models": models + extra, "tokenizer_source": "union"},
            "union_tokens_padded": {"models": models, "tokenizer": {"source": "union", "tokens": tokens,
                                                                    "pad_to_multiple_of": 8}},
            "base": {"base_model": a, "models": models[:2], "tokenizer_source": "base"},
            "one_model_onto_another": {"models": models[:1], "tokenizer_source": b}}[case] | {"merge_method": "linear"}


def _their_vocabulary(recipe: dict, tensors: dict[str, torch.Tensor]):
    """mergekit's output tokenizer info and aligned tensors for `recipe` (as its MergePlanner builds
    them), the models in `tensors`' order (mergekit's is a set's: its "first model" is arbitrary)."""
    from mergekit.common import ImmutableMap
    from mergekit.config import MergeConfiguration
    from mergekit.tokenizer.build import build_tokenizer
    from mergekit.tokenizer.embed import PermutedVocabulary

    config = MergeConfiguration.model_validate(recipe)
    block = config.tokenizer
    tokens = (block.tokens or {}) if block else {}
    refs = {str(r.model.path): r for r in config.referenced_models()}
    info = build_tokenizer(config.base_model, [refs[m] for m in tensors],
                           block.source if block else config.tokenizer_source, False, add_tokens=tuple(tokens))
    for p in info.permutations.values():  # an id past a model's vocab_size: mergekit leaves the entry out
        for i in info.tokenizer.get_vocab().values():
            p.setdefault(i, -1)
    aligned = PermutedVocabulary.model_construct(
        tokens=ImmutableMap(tokens), pad_to_multiple_of=block.pad_to_multiple_of if block else None,
        base_model=config.base_model, vocabulary_axis=0).execute(info, {refs[m]: t for m, t in tensors.items()})
    return info, {str(r.model.path): t for r, t in aligned.items()}


@pytest.mark.parametrize("case", ["union_base", "union_tokens_padded", "base", "one_model_onto_another"])
def test_vocabulary_and_aligned_rows_equal_mergekits(vocab_dirs, case):
    recipe = _vocab_recipe(case, vocab_dirs)
    ours = _vocabulary(recipe)
    g = torch.Generator().manual_seed(0)
    tensors = {m: torch.randn(ours.sizes[m], 3, generator=g) for m in ours.rows}
    info, theirs = _their_vocabulary(recipe, tensors)
    their_vocab = info.tokenizer.get_vocab()
    assert sorted(ours.order) == sorted(their_vocab)
    assert ours.size == next(iter(theirs.values())).shape[0]
    for m, rows in ours.rows.items():  # each model's row of each output token (-1: it lacks it)
        assert rows == [info.permutations[ref][their_vocab[t]] for ref in info.permutations
                        if str(ref.model.path) == m for t in ours.order], m
    assert {t.content: repr(t) for t in ours.tok.inner.get_added_tokens_decoder().values()} == \
        {t.content: repr(t) for t in info.tokenizer.added_tokens_decoder.values()}
    n = len(ours.order)
    index = torch.tensor([their_vocab[t] for t in ours.order])
    for m, aligned in zip(tensors, ours.align(list(tensors.items()))):
        torch.testing.assert_close(aligned[:n], theirs[m][index], rtol=0, atol=1e-6, msg=m)
        torch.testing.assert_close(aligned[n:], theirs[m][n:], rtol=0, atol=1e-6, msg=m)
    if case.startswith("union"):  # the new tokens numbered in model order, then id order (mergekit: hash order)
        assert ours.order[7:] == ["f", "e", "<t1>"] + (["<new>"] if case == "union_tokens_padded" else [])


@pytest.mark.parametrize("tokens, message", [
    ({"<t1>": {"source": "a"}}, "tokenizer.tokens['<t1>']: a has no token '<t1>'"),
    ({"e": {"source": {"kind": "model_token", "model": "a", "token": "qq"}}}, "tokenizer.tokens['e']: a has no token 'qq'"),
    ({"e": {"source": {"kind": "model_token", "model": "b", "token": "yy"}}}, "b has no token 'yy'"),  # past b's rows
    ({"e": {"source": {"kind": "model_token", "model": "b", "token_id": 7}}}, "tokenizer.tokens['e']: b has no token id 7"),
])
def test_token_sources_a_model_cannot_give_are_refused(vocab_dirs, tokens, message):
    """mergekit asserts the same (`Token ... not found in model`, `Token ID ... out of range`)."""
    from llmctl.errors import ConfigError

    tokens = {t: {**e, "source": vocab_dirs.get(e["source"], e["source"]) if isinstance(e["source"], str)
                  else {**e["source"], "model": vocab_dirs[e["source"]["model"]]}} for t, e in tokens.items()}
    vocab = _vocabulary({"merge_method": "linear", "models": [vocab_dirs["a"], vocab_dirs["b"]],
                         "tokenizer": {"source": "union", "tokens": tokens}})
    tensors = [(m, torch.zeros(vocab.sizes[m], 2)) for m in vocab.rows]
    with pytest.raises(ConfigError, match=re.escape(message.replace(" a ", f" {vocab_dirs['a']} ")
                                                    .replace(" b ", f" {vocab_dirs['b']} "))):
        vocab.align(tensors)


def test_a_token_source_outside_a_tensors_inputs_is_refused(vocab_dirs):
    from llmctl.errors import ConfigError

    a, b = vocab_dirs["a"], vocab_dirs["b"]
    vocab = _vocabulary({"merge_method": "linear", "models": [a, b],
                         "tokenizer": {"source": "union", "tokens": {"<new>": {"source": b}}}})
    with pytest.raises(ConfigError, match=re.escape(f"tokenizer.tokens['<new>']: {b} is not an input of every "
                                                    "vocabulary tensor")):
        vocab.align([(a, torch.zeros(9, 2))])


@pytest.mark.parametrize("base, message", [
    ("c", "tokenizer_source: the base model {c} has no tokenizer.json"),
    ("b", "tokenizer_source: {b}'s tokenizer has 3 token(s) beyond its vocab_size 7 (e.g. 'yy'); not supported"),
])
def test_a_base_without_a_usable_tokenizer_is_refused(vocab_dirs, base, message):
    from llmctl.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message.format(**vocab_dirs))):
        _vocabulary({"merge_method": "linear", "base_model": vocab_dirs[base], "tokenizer_source": "union",
                     "models": [vocab_dirs[m] for m in "abc"]})


def test_rows_without_vocab_size_and_a_source_opened_elsewhere(vocab_dirs, tmp_path):
    """A config without `vocab_size`: the model's own tokenizer's size, else the base's. A
    `tokenizer_source` naming an input by reference (an adapter merged into a scratch directory)
    reads that input's directory."""
    b = _model_dir(tmp_path / "b", ["<s>", "</s>", "c", "g"], ["<s>", "</s>", "<t1>"])
    c = _model_dir(tmp_path / "c", [], tokenizer=False)
    vocab = _vocabulary({"merge_method": "linear", "models": ["a", "b+lora", "c"], "tokenizer_source": "b+lora"},
                        {"a": vocab_dirs["a"], "b+lora": b, "c": c})
    assert vocab.sizes == {"a": 9, "b+lora": 5, "c": 7}
    assert vocab.order == ["<s>", "</s>", "c", "g", "<t1>"]
    assert vocab.rows == {"a": [0, 1, 4, -1, -1], "b+lora": [0, 1, 2, 3, 4], "c": [0, 1, 4, -1, -1]}


# ------------------------------------------------------------------ the plan (plan.py)
# Each recipe planned by llmctl and by mergekit's own MergePlanner (tasks built, none run): the
# same output tensors, each from the same input tensors of the same models, with the same base
# and the same resolved parameters (filters, gradients across a slice, per-model over slice over
# recipe settings).

@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """Four-layer llamas (hidden size 8): p, q, r; `s` with float16 weights."""
    import transformers

    root = tmp_path_factory.mktemp("plan")
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    paths = {}
    for i, name in enumerate("pqrs"):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(config)
        model.to(torch.float16 if name == "s" else torch.float32).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _their_plan(recipe: dict) -> dict:
    """{output tensor: (inputs [(model, tensor)], base model, shared parameters, per-input parameters)}."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config, options = MergeConfiguration.model_validate(recipe), MergeOptions(quiet=True)
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    planner = MergePlanner(config, arch, options, _model_out_config(config, arch))
    planner._plan()
    path = lambda ref: str(ref.model.path) if ref is not None else None  # noqa: E731
    return {w.name: ([(path(m), i.name) for m, i in task.gather_tensors.weight_info.items()], path(task.base_model),
                     dict(task.parameters), {path(m): dict(p) for m, p in task.input_parameters.items()})
            for w, task in planner._tensors}


def _plan_recipe(case: str, d: dict[str, str]) -> dict:
    p, q, r = d["p"], d["q"], d["r"]
    t = [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]}, {"value": 0.3}]
    return {
        "slices": {"merge_method": "ties", "base_model": p,
                   "parameters": {"weight": 0.5, "density": t, "normalize": False},
                   "slices": [{"sources": [{"model": p, "layer_range": [0, 3]},
                                           {"model": q, "layer_range": [1, 4], "parameters": {"weight": [2.0, 1.0]}},
                                           {"model": r, "layer_range": [0, 3]}],
                               "parameters": {"density": {"filter": "down_proj", "value": 0.8}}},
                              {"sources": [{"model": q, "layer_range": [3, 4]},  # one layer: t = 1
                                           {"model": r, "layer_range": [2, 3], "parameters": {"density": [0.2, 0.4]}}],
                               "base_model": q}]},
        "models_base_added": {"merge_method": "task_arithmetic", "base_model": r, "parameters": {"lambda": [1.0, 2.0]},
                              "models": [{"model": p, "parameters": {"weight": t}}, {"model": q, "parameters": {"weight": 0.7}}]},
        "slerp_gradient": {"merge_method": "slerp", "base_model": q, "parameters": {"t": [0.0, 0.25, 1.0]},
                           "slices": [{"sources": [{"model": p, "layer_range": [0, 4]}, {"model": q, "layer_range": [0, 4]}]}]},
        "passthrough_stack": {"merge_method": "passthrough",
                              "slices": [{"sources": [{"model": p, "layer_range": [0, 2]}]},
                                         {"sources": [{"model": q, "layer_range": [1, 4]}]}]},
    }[case]


@pytest.mark.parametrize("case", ["slices", "models_base_added", "slerp_gradient", "passthrough_stack"])
def test_plan_equals_mergekits(llamas, case):
    from llmctl.core.merge import parse_recipe, plan

    recipe = _plan_recipe(case, llamas)
    theirs = _their_plan(recipe)
    ours = plan(parse_recipe(recipe))
    assert sorted(j.name for j in ours.jobs) == sorted(theirs)
    for job in ours.jobs:
        inputs, base, shared, per_input = theirs[job.name]
        assert job.inputs == inputs, job.name
        assert (inputs[job.base][0] if job.base is not None else None) == base, job.name
        declared = {p.name: p for p in ours.method.params}
        assert {k: v for k, v in job.params.items() if not declared[k].per_model} == \
            {k: v for k, v in shared.items() if k in declared}, job.name
        others = [m for i, (m, _) in enumerate(inputs) if i != job.base]
        for k, values in job.params.items():
            if declared[k].per_model:
                assert values == pytest.approx([per_input[m][k] for m in others]), (job.name, k)


def _stack(layers: int = 4, dtype: str = "float32", **extra) -> dict:
    """A llama-like checkpoint's tensor shapes: embeddings, `layers` blocks, a final norm and head."""
    shapes = {"model.embed_tokens.weight": ((16, 8), dtype), "model.norm.weight": ((8,), dtype),
              "lm_head.weight": ((16, 8), dtype)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.mlp.weight": ((8, 8), dtype), f"model.layers.{i}.norm.weight": ((8,), dtype)}
    return shapes | extra


def _plan(recipe: dict, **shapes):
    from llmctl.core.merge import parse_recipe, plan

    return plan(parse_recipe(recipe), opened={m: _Ck(m, {}, s) for m, s in shapes.items()})


def _src(model: str, start: int, end: int, **params) -> dict:
    return {"model": model, "layer_range": [start, end]} | ({"parameters": params} if params else {})


@pytest.mark.parametrize("recipe, shapes, message", [
    ({"merge_method": "linear", "slices": [{"sources": [_src("p", 0, 2), _src("q", 0, 3)]}]}, {},
     "slices[0]: all sources must span the same number of layers, found [2, 3]"),
    ({"merge_method": "passthrough", "slices": [{"sources": [_src("p", 0, 2)]}, {"sources": [_src("q", 3, 5)]}]}, {},
     "slices[1]: layer_range [3, 5] of q goes past its 4 layers"),
    ({"merge_method": "ties", "base_model": "r", "parameters": {"weight": 1},
      "slices": [{"sources": [_src("p", 0, 4), _src("q", 0, 4)]}]}, {},
     "slices[0]: merge method 'ties' needs a base_model among its input models"),
    ({"merge_method": "slerp", "base_model": "p", "models": ["p", "q", "r"], "parameters": {"t": 0.5}}, {},
     "slices[0]: merge method 'slerp' takes exactly 2 input models (base included), got 3"),
    ({"merge_method": "model_stock", "base_model": "p", "models": ["p", "q"]}, {},
     "slices[0]: merge method 'model_stock' takes at least 3 input models (base included), got 2"),
    ({"merge_method": "nuslerp", "models": ["p", "q", "r", "s"], "parameters": {"weight": 1}}, {},
     "slices[0]: merge method 'nuslerp' takes 2 to 3 input models (base included), got 4"),
    ({"merge_method": "nuslerp", "models": ["p"], "parameters": {"weight": 1}}, {},
     "slices[0]: merge method 'nuslerp' takes 2 to 3 input models (base included), got 1"),
    ({"merge_method": "linear", "parameters": {"weight": 1},
      "slices": [{"sources": [_src("p", 0, 2), _src("q", 1, 3)]}]}, {"q": {k: v for k, v in _stack().items() if k != "model.layers.2.mlp.weight"}},
     "q: no tensor 'model.layers.2.mlp.weight' (needed for the merged 'model.layers.1.mlp.weight')"),
    ({"merge_method": "linear", "models": ["p", "q"], "parameters": {"weight": 1}},
     {"q": _stack(**{"model.norm.weight": ((9,), "float32")})},
     "cannot merge 'model.norm.weight': p has model.norm.weight of shape [8], q has model.norm.weight of shape [9]"),
    ({"merge_method": "linear", "parameters": {"weight": 1},
      "slices": [{"sources": [_src("p", 0, 2), _src("q", 1, 3)]}]}, {"q": _stack(**{"model.layers.1.mlp.weight": ((8, 9), "float32")})},
     "cannot merge 'model.layers.0.mlp.weight': p has model.layers.0.mlp.weight of shape [8, 8], "
     "q has model.layers.1.mlp.weight of shape [8, 9]"),
    ({"merge_method": "slerp", "base_model": "p", "models": ["p", "q"]}, {},
     "merge: missing required parameter 't' for model.embed_tokens.weight"),
    ({"merge_method": "linear", "slices": [{"sources": [_src("p", 0, 2, weight=1), _src("q", 1, 3)]}]}, {},
     "merge: missing required parameter 'weight' for q: model.embed_tokens.weight"),
    ({"merge_method": "linear", "models": ["p"], "parameters": {"weight": "heavy"}}, {},
     "parameter 'weight': expected float, found 'heavy'"),
    # weights that cancel under normalize: mergekit writes NaNs; refused, naming the first tensor they reach
    ({"merge_method": "linear", "models": [{"model": "p", "parameters": {"weight": [1, 1]}},
                                           {"model": "q", "parameters": {"weight": [2, -1]}}]}, {},
     "cannot merge 'model.layers.3.mlp.weight': the weights [1.0, -1.0] sum to 0, so normalize cannot divide "
     "by them; give weights with a non-zero sum, or normalize: false"),
])
def test_plan_refusals_name_the_slice_model_and_tensor(recipe, shapes, message):
    from llmctl.errors import CheckpointError, ConfigError

    shapes = {m: _stack() for m in "pqrs"} | shapes
    with pytest.raises((CheckpointError, ConfigError), match=re.escape(message)):
        _plan(recipe, **shapes)


@pytest.mark.parametrize("dtype, out_dtype, expected", [
    (None, None, {"model.embed_tokens.weight": "float32", "model.layers.0.mlp.weight": "float16",
                  "model.norm.weight": "float32", "lm_head.weight": "bfloat16", "model.position_ids": "int64"}),
    ("bfloat16", None, {"model.embed_tokens.weight": "bfloat16", "model.layers.0.mlp.weight": "bfloat16",
                        "model.norm.weight": "bfloat16", "lm_head.weight": "bfloat16", "model.position_ids": "int64"}),
    ("bfloat16", "float64", {"model.embed_tokens.weight": "float64", "model.layers.0.mlp.weight": "float64",
                             "model.norm.weight": "float64", "lm_head.weight": "float64", "model.position_ids": "int64"}),
])
def test_output_dtypes_promote_as_torch(dtype, out_dtype, expected):
    """Inputs of different dtypes give torch's promotion (float16 with bfloat16: float32); the
    recipe's `dtype`, then `out_dtype`, override it for floating tensors only."""
    p = _stack(1, "float16") | {"model.norm.weight": ((8,), "float32"), "lm_head.weight": ((16, 8), "bfloat16"),
                                "model.position_ids": ((1, 8), "int64")}
    q = p | {"model.embed_tokens.weight": ((16, 8), "bfloat16"), "model.norm.weight": ((8,), "float16")}
    recipe = {"merge_method": "linear", "models": ["p", "q"], "parameters": {"weight": 1.0}, "dtype": dtype,
              "out_dtype": out_dtype}
    jobs = _plan(recipe, p=p, q=q).jobs
    assert {j.name: j.dtype for j in jobs if "layers.0.norm" not in j.name} == expected
    assert {j.name: j.input_dtypes for j in jobs}["model.embed_tokens.weight"] == ("float16", "bfloat16")
    every = {m: {"w": ((2,), d)} for m, d in zip("pqrs", ["float16", "bfloat16", "float32", "float64"])}
    out = _plan({"merge_method": "linear", "models": list("pqrs"), "parameters": {"weight": 1}}, **every)
    assert ([j.dtype for j in out.jobs], out.layers) == (["float64"], [])  # no layers: none in the output
    for a, b in [("float16", "float32"), ("bfloat16", "float64"), ("float16", "bfloat16")]:
        assert promote([a, b]) == str(torch.promote_types(getattr(torch, a), getattr(torch, b))).removeprefix("torch.")


def test_layers_found_by_name_renumbered_and_ordered():
    """The first numbered stack is the layers (a `.N.` deeper in the name stays in the suffix); a
    second stack, and every other tensor, is copied whole: embeddings before the layers, the rest
    after; the config comes from the base model, else the first."""
    extra = {"model.layers.0.experts.3.weight": ((2, 2), "float32"), "vision.layers.0.weight": ((2,), "float32"),
             "model.wpe.weight": ((4, 8), "float32")}
    p, q = _stack(3, **extra), _stack(3, **extra)
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [_src("q", 2, 3)]}, {"sources": [_src("p", 0, 2)]}]}
    out = _plan(recipe, p=p, q=q)
    names = [j.name for j in out.jobs]
    assert names[:2] == ["model.embed_tokens.weight", "model.wpe.weight"]
    assert set(names[-3:]) == {"model.norm.weight", "lm_head.weight", "vision.layers.0.weight"}
    assert out.layers == [("q", 2), ("p", 0), ("p", 1)]
    by_name = {j.name: j.inputs for j in out.jobs}
    assert by_name["model.layers.0.mlp.weight"] == [("q", "model.layers.2.mlp.weight")]
    assert by_name["model.layers.1.experts.3.weight"] == [("p", "model.layers.0.experts.3.weight")]
    assert by_name["model.norm.weight"] == [("p", "model.norm.weight")]  # the last slice's model
    assert by_name["model.wpe.weight"] == [("q", "model.wpe.weight")]  # the first slice's
    assert out.config_source == "q"
    assert _plan({"merge_method": "linear", "base_model": "q", "models": ["p", "q"], "parameters": {"weight": 1}},
                 p=p, q=q).config_source == "q"


def test_vocabulary_tensors_are_those_with_a_row_per_token(vocab_dirs, tmp_path):
    """With `tokenizer_source`, a non-layer tensor with a row per token of every input (`vocab_size`
    rows, whatever the tokenizer's size) is aligned to the output vocabulary; a layer's tensor or a
    position table never is, whatever its size."""
    from llmctl.core.merge import parse_recipe, plan
    from llmctl.errors import CheckpointError

    a, b = vocab_dirs["a"], vocab_dirs["b"]
    recipe = parse_recipe({"merge_method": "linear", "models": [a, b], "parameters": {"weight": 1.0},
                           "tokenizer_source": "union"})

    def opened(name: str = "model.layers.0.w", shape=None):
        return {m: _Ck(m, {"vocab_size": n}, {"model.embed_tokens.weight": ((n, 4), "float32"),
                                              "lm_head.weight": ((n, 4), "float32"), "lm_head.bias": ((n,), "float32"),
                                              name: (shape or (n, 4), "float32")})
                for m, n in ((a, 9), (b, 7))}

    with pytest.raises(CheckpointError, match=re.escape(f"cannot merge 'model.layers.0.w': {a} has model.layers.0.w "
                                                        f"of shape [9, 4], {b} has model.layers.0.w of shape [7, 4]")):
        plan(recipe, opened=opened())
    with pytest.raises(CheckpointError, match="cannot merge 'model.position_embeddings.weight'"):
        plan(recipe, opened=opened("model.position_embeddings.weight"))
    jobs = plan(recipe, opened=opened("model.layers.0.w", (4,))).jobs
    assert {j.name: (j.vocabulary, j.shape) for j in jobs if "layers" not in j.name} == {
        "model.embed_tokens.weight": (True, (10, 4)), "lm_head.weight": (True, (10, 4)), "lm_head.bias": (True, (10,))}
    same = {m: _model_dir(tmp_path / m, ["<s>", "a", "b"], ["<s>"], size=3) for m in "xy"}  # one vocabulary
    recipe = parse_recipe({"merge_method": "linear", "models": list(same.values()), "parameters": {"weight": 1.0},
                           "tokenizer_source": "union"})
    shapes = {"model.embed_tokens.weight": ((3, 4), "float32")}
    assert plan(recipe, opened={p: _Ck(p, {"vocab_size": 3}, shapes) for p in same.values()}).vocabulary is None
    other = parse_recipe({"merge_method": "linear", "models": [a, b], "parameters": {"weight": 1.0}})
    with pytest.raises(CheckpointError, match="cannot merge 'model.embed_tokens.weight'"):  # no tokenizer_source
        plan(other, opened=opened("model.layers.0.w", (4,)))


# ------------------------------------------------------------------ recipes (recipe.py)

SETTINGS = [0.5, 2, True, False, "0.25", "1e-3", "true", "False", [0.0, 1.0], [1, 0.5, 0], [0.2], [], [0, 3, 4],
            [1, 2, 4, 8], ["1e-3", "2e-3"], [False, True, True], [True, False],
            {"filter": "mlp", "value": 0.7}, {"value": [0, 1]}, {"filter": "*", "value": 2},
            [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.4}],
            [{"filter": "self_attn", "value": 0.1}, {"value": 0.3}],
            [{"filter": "lm_head", "value": True}, {"filter": "mlp", "value": [False, True]}],
            {"filter": "mlp", "value": "x"}, [0.5, "x"], [{"filter": "lm_head", "value": [1, "x"]}]]


@pytest.mark.parametrize("setting", SETTINGS, ids=[repr(s) for s in SETTINGS])
def test_parameter_values_equal_mergekits(setting):
    """A scalar, a gradient (interpolated across the slice, or stepped for booleans) or filtered
    conditions, for float and bool parameters, at five points of a slice, for three tensors:
    mergekit's `evaluate_setting`. mergekit's pydantic also reads a bool as a float (1.0) and a
    number as a bool; llmctl refuses both, the only difference."""
    from mergekit.config import ParameterSetting, evaluate_setting
    from pydantic import TypeAdapter, ValidationError

    from llmctl.core.merge.recipe import evaluate
    from llmctl.errors import ConfigError

    parsed = TypeAdapter(ParameterSetting).validate_python(setting)
    for kind in (float, bool):
        for tensor in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
            for t in (0, 0.2, 0.5, 0.75, 1):
                try:
                    theirs = evaluate_setting(tensor, parsed, t, validate=TypeAdapter(kind).validate_python)
                except ValidationError:
                    with pytest.raises(ConfigError, match=f"^p: expected {kind.__name__}, found "):
                        evaluate(setting, tensor, t, kind, "p")
                    continue
                try:
                    ours = evaluate(setting, tensor, t, kind, "p")
                except ConfigError:  # the one difference: a bool for a float, a number for a bool
                    assert any(isinstance(v, bool) != (kind is bool) and not isinstance(v, str)
                               for v in _scalars(setting)), (tensor, t, kind)
                    continue
                assert ours == pytest.approx(theirs) and type(ours) is type(theirs), (tensor, t, kind, ours, theirs)


@pytest.mark.parametrize("setting, t", [("3", 0.0), (2.0, 0.0), ([0, 4], 0.5), ([0, 1, 2], 1.0), ([1, 2], 0.0)])
def test_int_parameter_values_equal_mergekits(setting, t):
    """No built-in method takes an int; a plugin's does (values that mergekit accepts)."""
    from mergekit.config import ParameterSetting, evaluate_setting
    from pydantic import TypeAdapter

    from llmctl.core.merge.recipe import evaluate
    from llmctl.errors import ConfigError

    theirs = evaluate_setting("w", TypeAdapter(ParameterSetting).validate_python(setting), t,
                              validate=TypeAdapter(int).validate_python)
    ours = evaluate(setting, "w", t, int, "p")
    assert ours == theirs and type(ours) is int
    with pytest.raises(ConfigError, match="^p: expected int, found True$"):
        evaluate(True, "w", t, int, "p")
    assert evaluate("1e3", "w", t, int, "p") == 1000  # YAML reads 1e3 as a string; mergekit refuses it


def _scalars(setting) -> list:
    if isinstance(setting, dict):
        return _scalars(setting["value"])
    return [v for s in setting for v in _scalars(s)] if isinstance(setting, list) else [setting]


_LINEAR = {"merge_method": "linear", "models": ["p"]}
_TOKENS = {**_LINEAR, "tokenizer": {"tokens": {"<x>": {"source": "p"}}}}


@pytest.mark.parametrize("data, message", [
    ([], "recipe: expected a mapping of merge settings, found list"),
    ({**_LINEAR, "model": "p"}, "recipe: unknown key 'model' (did you mean 'models'?)"),
    ({**_LINEAR, "modules": {"text": {}}}, "recipe: modules: multi-module recipes are not supported"),
    ({**_LINEAR, "chat_template": "chatml"},
     "recipe: chat_template: not supported here; set it after merging with `llmctl tokenize set-template`"),
    ({"models": ["p"]}, "recipe: missing key 'merge_method'"),
    ({"merge_method": "linear"}, "recipe: give exactly one of 'models' or 'slices'"),
    ({**_LINEAR, "slices": [{"sources": [{"model": "p", "layer_range": [0, 1]}]}]},
     "recipe: give exactly one of 'models' or 'slices'"),
    ({"merge_method": "linear", "models": []}, "recipe: models: expected a non-empty list"),
    ({"merge_method": "linear", "slices": {"sources": []}}, "recipe: slices: expected a non-empty list"),
    ({"merge_method": "linear", "slices": ["p"]}, "recipe: slices[0]: expected a mapping, found str"),
    ({"merge_method": "linear", "slices": [{"source": []}]}, "recipe: slices[0]: unknown key 'source' (did you mean 'sources'?)"),
    ({"merge_method": "linear", "slices": [{"sources": []}]}, "recipe: slices[0].sources: expected a non-empty list"),
    ({"merge_method": "linear", "slices": [{"sources": ["p"]}]}, "recipe: slices[0].sources[0]: expected a mapping, found str"),
    ({"merge_method": "linear", "models": [{"model": "p", "layer_range": [0, 1]}]},
     "recipe: models[0]: unknown key 'layer_range'"),
    ({"merge_method": "linear", "models": [{"parameters": {}}]}, "recipe: models[0]: missing key 'model'"),
    ({"merge_method": "linear", "models": [{"model": "p", "parameters": [1]}]},
     "recipe: models[0]: parameters: expected a mapping, found list"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "p", "layer_range": [0, 1]}], "parameters": 2}]},
     "recipe: slices[0]: parameters: expected a mapping, found int"),
    ({**_LINEAR, "parameters": "weight"}, "recipe: parameters: expected a mapping, found str"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "p", "layer_range": [0, 1], "parameters": 1}]}]},
     "recipe: slices[0].sources[0]: parameters: expected a mapping, found int"),
    ({"merge_method": "linear", "models": [3]}, "recipe: models[0]: expected a mapping, found int"),
    ({"merge_method": "linear", "models": [{"model": ""}]}, "recipe: a model must be a checkpoint path, found ''"),
    ({**_LINEAR, "base_model": 3}, "recipe: a model must be a checkpoint path, found 3"),
    ({**_LINEAR, "dtype": "int8"}, "recipe: dtype: expected one of float32, float16, bfloat16, float64, found 'int8'"),
    ({**_LINEAR, "out_dtype": "fp8"}, "recipe: out_dtype: expected one of float32, float16, bfloat16, float64, found 'fp8'"),
    ({**_LINEAR, "tokenizer_source": "union", "tokenizer": {}}, "recipe: give tokenizer_source or tokenizer, not both"),
    ({**_LINEAR, "tokenizer": {"sources": "union"}}, "recipe: tokenizer: unknown key 'sources' (did you mean 'source'?)"),
    ({**_LINEAR, "tokenizer": {"pad_to_multiple_of": 0}},
     "recipe: tokenizer.pad_to_multiple_of: expected a positive integer, found 0"),
    ({**_LINEAR, "tokenizer": {"pad_to_multiple_of": True}},
     "recipe: tokenizer.pad_to_multiple_of: expected a positive integer, found True"),
    ({**_LINEAR, "tokenizer": {"pad_to_multiple_of": "8"}},
     "recipe: tokenizer.pad_to_multiple_of: expected a positive integer, found '8'"),
    ({**_LINEAR, "tokenizer": {"tokens": {"<x>": {"sauce": "p"}}}},
     "recipe: tokenizer.tokens['<x>']: unknown key 'sauce' (did you mean 'source'?)"),
    ({**_LINEAR, "tokenizer": {"tokens": {"<x>": {"force": True}}}},
     "recipe: tokenizer.tokens['<x>']: missing key 'source' (a model, or kind zero / model_token)"),
    ({**_LINEAR, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "zero", "modle": "p"}}}}},
     "recipe: tokenizer.tokens['<x>'].source: unknown key 'modle' (did you mean 'model'?)"),
    *[({**_LINEAR, "tokenizer": {"tokens": {"<x>": {"source": source}}}},
       "recipe: tokenizer.tokens['<x>'].source: expected kind zero, or kind model_token with a model and one of "
       "token / token_id")
      for source in ({"kind": "ones"}, {"kind": "model_token", "model": "p"},
                     {"kind": "model_token", "model": "p", "token": "a", "token_id": 1})],
])
def test_recipe_refusals_name_the_key(data, message):
    from llmctl.core.merge.recipe import parse_recipe
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_recipe(data)


@pytest.mark.parametrize("layers", [[1, 1], [2, 1], [-1, 2], [0], [0, 1, 2], [0, 1.5], "0-2", None])
def test_layer_ranges_are_start_end_with_0_le_start_lt_end(layers):
    from llmctl.core.merge.recipe import parse_recipe
    from llmctl.errors import ConfigError

    source = {"model": "p"} | ({"layer_range": layers} if layers is not None else {})
    with pytest.raises(ConfigError, match=re.escape(f"recipe: slices[0].sources[0].layer_range: expected [start, end) "
                                                    f"with 0 <= start < end, found {layers!r}")):
        parse_recipe({"merge_method": "linear", "slices": [{"sources": [source]}]})


def test_a_recipe_is_read_into_its_fields(tmp_path):
    from llmctl.core.merge.recipe import Slice, Source, TokenSource, load_recipe, parse_recipe
    from llmctl.errors import ConfigError

    (tmp_path / "p").mkdir()
    (tmp_path / "r.yaml").write_text(
        "merge_method: ties\nbase_model: {model: p}\ndtype: bf16\nout_dtype: half\nparameters: {normalize: true}\n"
        "slices:\n  - sources: [{model: p, layer_range: [0, 2], parameters: {weight: 0.5}}, {model: q, layer_range: [1, 3]}]\n"
        "    base_model: q\n    parameters: {density: 0.5}\n    residual_weight: 0.1\n"
        "tokenizer:\n  pad_to_multiple_of: 8\n  tokens:\n    <x>: {source: p, force: true}\n"
        "    <y>: {source: {kind: zero}}\n    7: {source: {kind: model_token, model: q, token_id: 3}}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    p = str(tmp_path / "p")  # found beside the recipe; q is not, so it stays as written
    assert (recipe.merge_method, recipe.base_model, recipe.dtype, recipe.out_dtype) == ("ties", p, "bfloat16", "float16")
    assert recipe.slices == [Slice([Source(p, (0, 2), {"weight": 0.5}), Source("q", (1, 3))], "q", {"density": 0.5})]
    assert (recipe.parameters, recipe.tokenizer_source, recipe.pad_to_multiple_of, recipe.from_models) == \
        ({"normalize": True}, "union", 8, False)
    assert recipe.tokens == {"<x>": TokenSource(p, force=True), "<y>": TokenSource(None),
                             "7": TokenSource("q", None, 3)}
    assert recipe.models() == [p, "q"]
    models = parse_recipe({"merge_method": "linear", "models": ["q", {"model": "p"}], "base_model": "p",
                           "dtype": "fp32", "out_dtype": "float", "tokenizer_source": "q"})
    assert (models.slices, models.from_models, models.models()) == ([Slice([Source("q"), Source("p")])], True, ["p", "q"])
    assert (models.dtype, models.out_dtype, models.tokenizer_source, models.tokens) == ("float32", "float32", "q", {})
    assert parse_recipe({**_LINEAR, "dtype": "fp16", "tokenizer_source": "base"}).dtype == "float16"
    for name in ("base", "union"):  # directories of those names beside the recipe: the keywords still win
        (tmp_path / name).mkdir()
    for source, expected in [("tokenizer_source: p", p), ("tokenizer: {source: p}", p), ("tokenizer_source: base", "base"),
                             ("tokenizer_source: union", "union"), ("tokenizer: {source: base}", "base"),
                             ("tokenizer: {source: union, pad_to_multiple_of: 1}", "union")]:
        (tmp_path / "s.yaml").write_text(f"merge_method: linear\nmodels: [p]\n{source}\n")
        assert load_recipe(tmp_path / "s.yaml").tokenizer_source == expected, source
    assert load_recipe(tmp_path / "s.yaml").pad_to_multiple_of == 1
    data = {**_LINEAR, "parameters": {"weight": 1}}
    assert parse_recipe(data).raw is data  # written beside the output as mergekit_config.yml
    (tmp_path / "bad.yaml").write_text("merge_method: linear\nmodels: [{model: p, weight: 1}]\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'bad.yaml'))}: models\\[0\\]: unknown key 'weight'"):
        load_recipe(tmp_path / "bad.yaml")


def test_a_missing_or_invalid_recipe_file_is_one_line(tmp_path):
    from llmctl.core.merge.recipe import load_recipe
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^merge recipe {re.escape(str(tmp_path / 'no.yaml'))} does not exist$"):
        load_recipe(tmp_path / "no.yaml")
    (tmp_path / "bad.yaml").write_text("merge_method: [linear\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'bad.yaml'))}: invalid YAML \\(while parsing"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("models, method, kw, expected", [
    (["a", "b", "c"], "ties", {"weights": [0.3, 0.7], "params": {"density": 0.5}, "per_model": {"density": 0.4}},
     {"merge_method": "ties", "base_model": "a", "parameters": {"density": 0.5},
      "models": [{"model": "a"}, {"model": "b", "parameters": {"density": 0.4, "weight": 0.3}},
                 {"model": "c", "parameters": {"density": 0.4, "weight": 0.7}}]}),
    (["a", "b", "c"], "linear", {"weights": [2.0], "base": "b"},
     {"merge_method": "linear", "base_model": "b", "parameters": {},
      "models": [{"model": "b"}, {"model": "a", "parameters": {"weight": 2.0}}, {"model": "c", "parameters": {"weight": 2.0}}]}),
    (["a", "b"], "linear", {}, {"merge_method": "linear", "parameters": {},
                                "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]}),
    (["a", "b"], "slerp", {"params": {"t": 0.4}},
     {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.4}, "models": [{"model": "a"}, {"model": "b"}]}),
])
def test_short_form_recipes(models, method, kw, expected):
    """`llmctl merge A B --method M …`: the base (given, or the first model when the method needs one),
    `--weight` once for all or once per other model (only where the method takes weights)."""
    from llmctl.core.merge.recipe import short_recipe
    from llmctl.errors import ConfigError

    assert short_recipe(models, method, **kw) == expected
    if "weights" in kw:
        with pytest.raises(ConfigError, match=re.escape(f"--weight: give one value or one per non-base model "
                                                        f"({len(models) - 1}), got 3")):
            short_recipe(models, method, **{**kw, "weights": [1.0, 2.0, 3.0]})


def test_a_model_reference_with_a_lora_is_base_plus_adapter(tmp_path):
    """mergekit's `{model: BASE, lora: ADAPTER}` is its `BASE+ADAPTER` (the adapter was dropped); each
    part found beside the recipe as a plain path is."""
    from mergekit.common import ModelReference

    from llmctl.core.merge.recipe import load_recipe, parse_recipe
    from llmctl.errors import ConfigError

    reference = {"model": "base", "lora": "adapter"}
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": reference}], "base_model": {"model": "base"}})
    assert recipe.models() == ["base", str(ModelReference.model_validate(reference))] == ["base", "base+adapter"]
    for name in ("base", "adapter"):
        (tmp_path / name).mkdir()
    (tmp_path / "r.yaml").write_text("merge_method: linear\nmodels:\n  - model: {model: base, lora: adapter}\n")
    assert load_recipe(tmp_path / "r.yaml").models() == [f"{tmp_path / 'base'}+{tmp_path / 'adapter'}"]
    with pytest.raises(ConfigError, match=re.escape("recipe: a model must be a checkpoint path, found None")):
        parse_recipe({"merge_method": "linear", "models": [{"model": {"lora": "adapter"}}]})
