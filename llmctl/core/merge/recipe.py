"""Merge recipes: mergekit's YAML schema, read into plain dataclasses.

    merge_method: slerp                        # a name of METHODS
    base_model: ./a                            # checkpoint directories (llmctl or Hugging Face)
    slices:                                    # or `models:` [{model, parameters}]
      - sources: [{model: ./a, layer_range: [0, 4]}, {model: ./b, layer_range: [0, 4]}]
    parameters:
      t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]   # filters and gradients
    dtype: float32                             # inputs converted to it; out_dtype: the output's
    tokenizer_source: union                    # base | a model | union (or the `tokenizer:` block:
                                               #   source, tokens: {TOKEN: {source, force}}, pad_to_multiple_of)

A parameter is a scalar, a gradient (a list interpolated across a slice's layers) or a list of
`{filter, value}` conditions (the first whose filter is a substring of the tensor name wins).
Per-model settings override the slice's, which override the recipe's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmctl.errors import ConfigError

TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "chat_template", "tokenizer", "modules")
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


@dataclass
class Source:
    """One input model of a slice; `layer_range` None means all of its layers."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSource:
    """Where a `tokenizer.tokens` entry's embedding row comes from: `model`'s row of the same
    token, of `token`/`token_id` in its own vocabulary (mergekit's `kind: model_token`), or
    zeros (`model` None); `force` uses it even in the models that have the token."""

    model: str | None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class Recipe:
    merge_method: str
    slices: list[Slice]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    from_models: bool = False  # written as `models:` (each model's whole stack)
    raw: dict = field(default_factory=dict)

    def models(self) -> list[str]:
        """Every referenced model, base first, each once."""
        names = [self.base_model] + [s.base_model for s in self.slices] + \
            [src.model for s in self.slices for src in s.sources]
        return list(dict.fromkeys(n for n in names if n is not None))


def parse_recipe(data: Any, where: str = "recipe", relative_to: str | os.PathLike | None = None) -> Recipe:
    """A Recipe from a mergekit YAML mapping; ConfigError naming the key otherwise. Model paths
    are taken relative to `relative_to` when they do not exist as given."""
    from llmctl.core.registry import did_you_mean

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of merge settings, found {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(key, TOP_KEYS)}")
    for key, why in (("modules", "multi-module recipes are not supported"),
                     ("chat_template", "not supported here; set it after merging with `llmctl tokenize set-template`")):
        if data.get(key) is not None:
            raise ConfigError(f"{where}: {key}: {why}")
    if "merge_method" not in data:
        raise ConfigError(f"{where}: missing key 'merge_method'")
    model = model_resolver(where, relative_to)
    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(f"{where}: give exactly one of 'models' or 'slices'")
    if has_models:
        slices = [Slice([_source(m, f"{where}: models[{i}]", model, slice_=False)
                         for i, m in enumerate(_list(data["models"], f"{where}: models"))])]
    else:
        slices = []
        for i, s in enumerate(_list(data["slices"], f"{where}: slices")):
            at = f"{where}: slices[{i}]"
            _mapping(s, at, ("sources", "base_model", "parameters", "residual_weight"))
            sources = [_source(src, f"{at}.sources[{j}]", model, slice_=True)
                       for j, src in enumerate(_list(s.get("sources"), f"{at}.sources"))]
            slices.append(Slice(sources, model(s.get("base_model")), _parameters(s.get("parameters"), at)))
    source, tokens, pad = _tokenizer(data, where, model)
    return Recipe(
        merge_method=str(data["merge_method"]),
        slices=slices,
        base_model=model(data.get("base_model")),
        parameters=_parameters(data.get("parameters"), where),
        dtype=_dtype(data.get("dtype"), f"{where}: dtype"),
        out_dtype=_dtype(data.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=source,
        tokens=tokens,
        pad_to_multiple_of=pad,
        from_models=has_models,
        raw=data,
    )


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe YAML file (model paths relative to the working directory, else to the file)."""
    return parse_recipe(read_yaml(path), str(path), relative_to=Path(path).parent)


def read_yaml(path: str | os.PathLike) -> Any:
    """A recipe or search file's YAML; ConfigError when missing or invalid."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None


def model_resolver(where: str, relative_to=None) -> Callable[[Any], str | None]:
    """A function from a recipe's model reference to a path (relative to `relative_to` when it
    does not exist as given)."""
    def model(value):
        if value is None:
            return None
        if isinstance(value, dict):  # mergekit's {model: …, lora: …} reference form; with a lora, BASE+ADAPTER
            lora, value = value.get("lora"), value.get("model")
            if lora is not None and value is not None:
                return f"{model(value)}+{model(lora)}"
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: a model must be a checkpoint path, found {value!r}")
        if relative_to is not None and not Path(value).exists() and (Path(relative_to) / value).exists():
            return str(Path(relative_to) / value)
        return value
    return model


def _list(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list")
    return value


def _mapping(value, where: str, keys) -> None:
    from llmctl.core.registry import did_you_mean

    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__}")
    for key in value:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(key, keys)}")


def _source(value, where: str, model, *, slice_: bool) -> Source:
    if isinstance(value, str) and not slice_:
        return Source(model(value))
    _mapping(value, where, ("model", "parameters", "layer_range") if slice_ else ("model", "parameters"))
    if "model" not in value:
        raise ConfigError(f"{where}: missing key 'model'")
    layers = value.get("layer_range")
    if slice_:
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(i, int) for i in layers)
                and 0 <= layers[0] < layers[1]):
            raise ConfigError(f"{where}.layer_range: expected [start, end) with 0 <= start < end, found {layers!r}")
        layers = tuple(layers)
    return Source(model(value["model"]), layers, _parameters(value.get("parameters"), where))


def _tokenizer(data: dict, where: str, model) -> tuple[str | None, dict[str, TokenSource], int | None]:
    """`tokenizer_source`, or mergekit's `tokenizer:` block (source, tokens, pad_to_multiple_of)."""
    block = data.get("tokenizer")
    if block is not None and data.get("tokenizer_source") is not None:
        raise ConfigError(f"{where}: give tokenizer_source or tokenizer, not both")
    if block is None:
        source = data.get("tokenizer_source")
        return (source if source in (None, "base", "union") else model(source)), {}, None
    at = f"{where}: tokenizer"
    _mapping(block, at, ("source", "tokens", "pad_to_multiple_of"))
    source = block.get("source", "union")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"{at}.pad_to_multiple_of: expected a positive integer, found {pad!r}")
    tokens = {}
    for token, entry in (block.get("tokens") or {}).items():
        here = f"{at}.tokens[{token!r}]"
        _mapping(entry, here, ("source", "force"))
        spec = entry.get("source")
        if isinstance(spec, dict):
            _mapping(spec, f"{here}.source", ("kind", "model", "token", "token_id"))
            kind = spec.get("kind")
            if kind == "zero":
                spec = TokenSource(None)
            elif kind == "model_token" and (spec.get("token") is None) != (spec.get("token_id") is None):
                spec = TokenSource(model(spec.get("model")), spec.get("token"), spec.get("token_id"))
            else:
                raise ConfigError(f"{here}.source: expected kind zero, or kind model_token with a model and "
                                  f"one of token / token_id")
        elif spec is not None:
            spec = TokenSource(model(spec))
        else:
            raise ConfigError(f"{here}: missing key 'source' (a model, or kind zero / model_token)")
        tokens[str(token)] = TokenSource(spec.model, spec.token, spec.token_id, bool(entry.get("force", False)))
    return (source if source in ("base", "union") else model(source)), tokens, pad


def _parameters(value, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: parameters: expected a mapping, found {type(value).__name__}")
    return dict(value)


def _dtype(value, where: str) -> str | None:
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPES:
        raise ConfigError(f"{where}: expected one of {', '.join(DTYPES)}, found {value!r}")
    return name


# ------------------------------------------------------------------------------- parameter values


def evaluate(setting: Any, tensor: str, t: float, kind: type, where: str) -> Any:
    """A setting's value for `tensor` at gradient position `t` (None: no condition matched)."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        for cond in setting:
            pattern = cond.get("filter")
            if pattern in (None, "*") or str(pattern) in tensor:
                return evaluate(cond.get("value"), tensor, t, kind, where)
        return None
    if isinstance(setting, list):
        values = [_scalar(v, kind, where) for v in setting]
        if not values:
            return None
        if kind is bool or not all(isinstance(v, (int, float)) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i = int(scaled)
        j, frac = min(len(values) - 1, i + 1), scaled - i
        return _scalar((1 - frac) * values[i] + frac * values[j], kind, where)
    return _scalar(setting, kind, where)


def _scalar(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, (bool, int)) or value not in (0, 1):  # mergekit's (pydantic's) rule
                raise ValueError
            return bool(value)
        if isinstance(value, bool):
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, found {value!r}") from None


def short_recipe(models: list[str], method: str, *, base: str | None = None, weights: list[float] = (),
                 params: dict[str, Any] | None = None, per_model: dict[str, Any] | None = None) -> dict:
    """The recipe of `llmctl merge A B --method M …`: the base (given, or the first model when
    the method needs one) and every other model, each with `weights` (one for all or one per
    model; default 1) and `per_model` settings; `params` are the recipe's parameters."""
    from llmctl.core.merge.methods import METHODS

    spec = METHODS.get(method)
    if base is None and spec.base == "required":
        base = models[0]
    others = [m for m in models if m != base]
    if weights and len(weights) not in (1, len(others)):
        raise ConfigError(f"--weight: give one value or one per non-base model ({len(others)}), got {len(weights)}")
    declared = {p.name for p in spec.params if p.per_model}
    entries = []
    for i, model in enumerate(others):
        settings = dict(per_model or {})
        if "weight" in declared:
            settings["weight"] = weights[i if len(weights) > 1 else 0] if weights else 1.0
        entries.append({"model": model, "parameters": settings} if settings else {"model": model})
    if base is not None:
        entries.insert(0, {"model": base})
    recipe = {"merge_method": method, "models": entries, "parameters": dict(params or {})}
    if base is not None:
        recipe["base_model"] = base
    return recipe
