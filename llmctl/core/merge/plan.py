"""A recipe resolved against its input checkpoints: one `Job` per output tensor.

Everything that can be wrong is found here, before any tensor is read: unknown methods,
missing parameters, input counts, layer ranges, and tensors missing or shaped differently
(the first mismatch named). Layers are found by name (the first `.N.` component, as in
`model.layers.N.`); an output layer's tensors are renumbered from their source layer.
Non-layer tensors go before the layers when they are embeddings, after them otherwise, and
take their inputs from the first or the last slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmctl.core.checkpoint import Checkpoint, open_checkpoint
from llmctl.core.merge.methods import METHODS, Method
from llmctl.core.merge.recipe import Recipe, Slice, Source, evaluate
from llmctl.core.merge.vocab import Vocabulary, build_vocabulary
from llmctl.errors import CheckpointError, ConfigError

_LAYER = re.compile(r"^(.*?\.)(\d+)\.(.+)$")
_EMBEDDING = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class Job:
    """One output tensor: its inputs (model, tensor name) in recipe order, which of them is
    the base (index or None), the resolved parameters, and the output shape and dtype."""

    name: str
    inputs: list[tuple[str, str]]
    base: int | None
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    vocabulary: bool = False  # rows are tokens: aligned to the output vocabulary before merging
    input_dtypes: tuple[str, ...] = ()


@dataclass
class Plan:
    method: Method
    jobs: list[Job]
    checkpoints: dict[str, Checkpoint]
    config_source: str  # the model whose config.json (and generation config) the output takes
    layers: list[tuple[str, int]]  # each output layer's (model, layer index)
    vocabulary: Vocabulary | None = None  # the output vocabulary, when inputs' rows must be aligned to it


def _split(names) -> tuple[list[str], dict[int, list[str]], str | None]:
    """(non-layer names, {layer index: suffixes}, layer prefix) of a checkpoint's tensor names."""
    plain, layers, prefix = [], {}, None
    for name in names:
        match = _LAYER.match(name)
        if match is None or (prefix is not None and match.group(1) != prefix):
            plain.append(name)
            continue
        prefix = match.group(1)
        layers.setdefault(int(match.group(2)), []).append(match.group(3))
    return plain, layers, prefix


class _Model:
    def __init__(self, ck: Checkpoint):
        self.shapes = ck.tensor_shapes()
        self.plain, self.layers, self.prefix = _split(self.shapes)
        self.num_layers = max(self.layers) + 1 if self.layers else 0


def plan(recipe: Recipe, *, opened: dict[str, Checkpoint] | None = None) -> Plan:
    """Resolve `recipe` into jobs; CheckpointError / ConfigError on the first problem."""
    method = METHODS.get(recipe.merge_method)
    opened = opened or {}
    checkpoints = {name: opened.get(name) or open_checkpoint(name) for name in recipe.models()}
    models = {name: _Model(ck) for name, ck in checkpoints.items()}
    slices = _normalise(recipe, models, method)
    vocab = build_vocabulary(recipe, checkpoints)
    vocab = None if vocab is None or vocab.identity else vocab
    jobs: list[Job] = []
    out_layers: list[tuple[str, int]] = []
    first, last = slices[0], slices[-1]
    lead = models[first.sources[0].model]
    pre = [n for n in lead.plain if _EMBEDDING.search(n)]
    post = [n for n in lead.plain if not _EMBEDDING.search(n)]
    for name in pre:
        jobs.append(_job(recipe, method, first, models, name, [name] * len(first.sources), 0.0, vocab))
    for s in slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            src = s.sources[0]
            layer = src.layer_range[0] + offset
            out_index = len(out_layers)
            out_layers.append((src.model, layer))
            for suffix in models[src.model].layers.get(layer, []):
                names = [f"{models[x.model].prefix}{x.layer_range[0] + offset}.{suffix}" for x in s.sources]
                out = f"{lead.prefix}{out_index}.{suffix}"
                jobs.append(_job(recipe, method, s, models, out, names, t))
    for name in post:
        jobs.append(_job(recipe, method, last, models, name, [name] * len(last.sources), 0.0, vocab))
    config_source = recipe.base_model or recipe.models()[0]
    return Plan(method, jobs, checkpoints, config_source, out_layers, vocab)


def _normalise(recipe: Recipe, models: dict[str, _Model], method: Method) -> list[Slice]:
    """Slices with layer ranges filled in (a `models:` recipe: each whole model, the base
    added when absent) and checked against the models and the method's input contract."""
    slices = recipe.slices
    if recipe.from_models:
        sources = list(slices[0].sources)
        if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
            sources.append(Source(recipe.base_model))
        sources = [Source(s.model, (0, models[s.model].num_layers), s.parameters) for s in sources]
        slices = [Slice(sources)]  # a `models:` recipe has no slice-level base or parameters
    name = recipe.merge_method
    for i, s in enumerate(slices):
        where = f"slices[{i}]"
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) > 1:
            raise ConfigError(f"{where}: all sources must span the same number of layers, found {sorted(lengths)}")
        for src in s.sources:
            have = models[src.model].num_layers
            if src.layer_range[1] > have and not recipe.from_models:
                raise ConfigError(f"{where}: layer_range {list(src.layer_range)} of {src.model} "
                                  f"goes past its {have} layers")
        base = s.base_model or recipe.base_model
        count = len(s.sources)
        in_sources = base in [src.model for src in s.sources]
        if method.base == "required" and not in_sources:
            raise ConfigError(f"{where}: merge method '{name}' needs a base_model among its input models")
        low, high = method.inputs
        if count < low or (high is not None and count > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"{where}: merge method '{name}' takes {want} input models "
                              f"(base included), got {count}")
    return slices


def _job(recipe: Recipe, method: Method, s: Slice, models: dict[str, _Model], out: str,
         names: list[str], t: float, vocab: Vocabulary | None = None) -> Job:
    """One output tensor; with `vocab`, a non-layer tensor whose leading size is each input's
    vocab_size is a vocabulary tensor (only its other sizes must agree)."""
    sources = s.sources
    inputs = [(src.model, n) for src, n in zip(sources, names)]
    for model, name in inputs:
        if name not in models[model].shapes:
            raise CheckpointError(f"{model}: no tensor {name!r} (needed for the merged {out!r})")
    shapes = [models[m].shapes[n] for m, n in inputs]
    shape, dtype = shapes[0]
    vocabulary = vocab is not None and all(
        len(sh) >= 1 and sh[0] == vocab.sizes[m] and "position" not in n for (m, n), (sh, _) in zip(inputs, shapes))
    for (model, name), (other, _) in zip(inputs[1:], shapes[1:]):
        if (tuple(other[1:]) != tuple(shape[1:])) if vocabulary else other != shape:
            raise CheckpointError(f"cannot merge {out!r}: {inputs[0][0]} has {inputs[0][1]} of shape {list(shape)}, "
                                  f"{model} has {name} of shape {list(other)}")
    base_model = s.base_model or recipe.base_model
    base = next((i for i, src in enumerate(sources) if src.model == base_model), None) \
        if method.base != "ignored" else None
    params: dict[str, Any] = {}
    for p in method.params:
        if not p.per_model:
            params[p.name] = _resolve(p, [s.parameters, recipe.parameters], out, t, out)
        else:
            params[p.name] = [_resolve(p, [src.parameters, s.parameters, recipe.parameters], name, t,
                                       f"{src.model}: {name}")
                              for i, (src, name) in enumerate(zip(sources, names)) if i != base]
    dtypes = [d for _, d in shapes]
    floating = set(dtypes) <= set(_RANK)
    problem = method.check(params) if floating else None  # other tensors are copied, not merged
    if problem:
        raise ConfigError(f"cannot merge {out!r}: {problem}")
    out_dtype = (recipe.out_dtype or recipe.dtype or promote(dtypes)) if floating else dtype
    shape = (vocab.size, *shape[1:]) if vocabulary else shape
    return Job(out, inputs, base, params, shape, out_dtype, vocabulary, tuple(dtypes))


def _resolve(param, scopes: list[dict], tensor: str, t: float, where: str) -> Any:
    for scope in scopes:
        if param.name in scope:
            value = evaluate(scope[param.name], tensor, t, param.type, f"parameter '{param.name}'")
            if value is not None:
                return value
    if param.required:
        raise ConfigError(f"merge: missing required parameter '{param.name}' for {where}")
    return param.default


_RANK = {"float16": 0, "bfloat16": 0, "float32": 2, "float64": 3}


def promote(dtypes: list[str]) -> str:
    """torch's promotion of floating dtypes (float16 with bfloat16 gives float32)."""
    if len(set(dtypes)) == 1:
        return dtypes[0]
    best = max(dtypes, key=_RANK.__getitem__)
    return "float32" if _RANK[best] == 0 else best
