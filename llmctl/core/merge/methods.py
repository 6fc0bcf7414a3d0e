"""Merge methods: each a registered tensor function with declared parameters.

    @register("linear", arrays=True)   # METHODS["linear"] = Method(linear, arrays=True)
    def linear(inputs: Inputs, weight: list[float], normalize: bool = True) -> np.ndarray: ...
    METHODS.get("linear").params  # Param("weight", float, per_model=True), Param("normalize", …)

A method sees one tensor name at a time: `Inputs.base` (the base model's tensor, when the
method uses one) and `Inputs.others` (the other models', in recipe order); a per-model
parameter arrives as a list aligned with `others`. Parameters and their defaults are read
from the function's signature (a `list[...]` annotation makes a parameter per-model), so a
method is declared once. TIES, DARE, breadcrumbs and DELLA are one generalised task
arithmetic (task vectors → sparsify → sign consensus → weighted sum), configured per name.
Methods declared `arrays=True` (linear, slerp, passthrough, the task-arithmetic family) compute
on numpy arrays, the others (nuslerp, model_stock) on torch tensors.
Third-party methods register through the `llmctl.merge_methods` entry-point group: the entry
point names a `Method` instance (e.g. `MyMerge = Method(my_fn, base="optional")`).
"""

from __future__ import annotations

import inspect
import keyword
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from llmctl.core.merge.sparsify import sparsify
from llmctl.core.registry import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # float, int or bool
    per_model: bool = False
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _exact(x):
    return x


@dataclass
class Inputs:
    """One tensor name's inputs: `base` (or None) and the `others`, plus a seeded numpy
    generator for randomised methods. They are the method's own copies: it may work in them in
    place. `narrow` rounds an array in place to the merge's precision, for a method that rounds
    each step as mergekit does when it computes in 16 bits (identity at full precision)."""

    base: Tensor | None
    others: list[Tensor]
    generator: np.random.Generator | None = None
    narrow: Callable = _exact

    @property
    def all(self) -> list[Tensor]:
        return ([self.base] if self.base is not None else []) + self.others


@dataclass(frozen=True)
class Method:
    """A merge function and what it accepts: `base` is "required", "optional" or "ignored"
    (an ignored base is an ordinary input); `inputs` bounds the number of input models.
    `arrays`: the function takes and returns numpy arrays, 16-bit inputs widened to float32, on
    either back end, so a merge made of such methods runs without importing torch (`arrays.py`).
    `fixed` binds keyword-only arguments (a family member's choices), `defaults` overrides
    declared defaults; a keyword-only argument left unbound and undeclared is not a parameter.
    `check(params)` returns what is wrong with one tensor's resolved parameters (None: nothing), so
    the plan refuses them before any tensor is read."""

    fn: Callable[..., Tensor]
    base: str = "ignored"
    inputs: tuple[int, int | None] = (1, None)
    random: bool = False
    arrays: bool = False
    fixed: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    check: Callable[[dict], str | None] = lambda params: None
    params: tuple[Param, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self._params()))

    def _params(self):
        for p in list(inspect.signature(self.fn).parameters.values())[1:]:
            name = p.name.removesuffix("_")  # lambda_ is the recipe's `lambda`
            if p.name in self.fixed or (p.kind == p.KEYWORD_ONLY and name not in self.defaults):
                continue
            hint = p.annotation  # evaluated alone: the return annotation may name an unimported module
            hint = eval(hint, self.fn.__globals__) if isinstance(hint, str) else hint  # noqa: S307
            per_model = typing.get_origin(hint) is list
            kind = typing.get_args(hint)[0] if per_model else hint
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None → X
            yield Param(name, kind, per_model, self.defaults.get(name, p.default))

    def __call__(self, inputs: Inputs, **params) -> Tensor:
        args = {(k + "_" if keyword.iskeyword(k) else k): v for k, v in params.items()}
        return self.fn(inputs, **args, **self.fixed)


METHODS: Registry[Method] = Registry("merge method", "llmctl.merge_methods", base=Method)


def register(name: str, **declared) -> Callable:
    def add(fn):
        METHODS.register(name)(Method(fn, **declared))
        return fn
    return add


def _normalizable(params: dict) -> str | None:
    if params["normalize"] and sum(params["weight"]) == 0:
        return (f"the weights {params['weight']} sum to 0, so normalize cannot divide by them; "
                "give weights with a non-zero sum, or normalize: false")
    return None


@register("linear", arrays=True, check=_normalizable)  # mergekit writes NaNs instead
def linear(inputs: Inputs, weight: list[float], normalize: bool = True) -> np.ndarray:
    """Weighted average (model soups); `normalize` divides by the sum of the weights.
    (In place, in the inputs' own buffers: no tensor is allocated.)"""
    out = inputs.others[0]
    out *= weight[0]
    for tensor, w in zip(inputs.others[1:], weight[1:]):
        tensor *= w
        out += tensor
    if normalize:
        out /= sum(weight)
    return out


def slerp_arrays(t: float, a: np.ndarray, b: np.ndarray, dot_threshold: float = 0.9995,
                 eps: float = 1e-8) -> np.ndarray:
    """Spherical interpolation of two arrays as flattened vectors (linear when nearly collinear),
    made in `a`'s buffer: three dot products and two scalings, no temporary."""
    import math

    x, y = a.reshape(-1), b.reshape(-1)
    norm_x, norm_y = math.sqrt(x @ x), math.sqrt(y @ y)
    dot = float(x @ y) / ((norm_x if norm_x > eps else 1) * (norm_y if norm_y > eps else 1))
    if abs(dot) > dot_threshold:  # also |dot| > 1 from rounding: acos never sees it
        s0, s1 = 1 - t, t
    else:
        theta = math.acos(dot)
        s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    x *= s0
    y *= s1
    x += y
    return a


@register("slerp", base="required", inputs=(2, 2), arrays=True)
def slerp(inputs: Inputs, t: float) -> np.ndarray:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    return slerp_arrays(t, inputs.base, inputs.others[0])


def nuslerp_tensors(t: float, a: Tensor, b: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """SLERP along rows, columns or the flattened tensor, each vector on its own sphere."""
    import torch

    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True)
    collinear = (1 - cos.square()) <= eps**2  # also |cos| > 1 from rounding: acos never sees it
    theta = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register("nuslerp", base="optional", inputs=(2, 3))
def nuslerp(inputs: Inputs, weight: list[float], nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> Tensor:
    """SLERP of two models at t = w₂/(w₁+w₂), of their task vectors when there is a base."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    a, b = inputs.others
    if inputs.base is None:
        return nuslerp_tensors(t, a, b, nuslerp_row_wise, nuslerp_flatten)
    base = inputs.base
    return base + nuslerp_tensors(t, a - base, b - base, nuslerp_row_wise, nuslerp_flatten)


@register("model_stock", base="required", inputs=(3, None))
def model_stock(inputs: Inputs, filter_wise: bool = False) -> Tensor:
    """Model Stock: the average of the fine-tuned models pulled toward the base by the mean
    angle between their task vectors (per row with `filter_wise`)."""
    import torch

    base, others = inputs.base, inputs.others
    shape = base.shape
    if filter_wise:
        base, others = (base.unsqueeze(0), [o.unsqueeze(0) for o in others]) if base.dim() == 1 else (base, others)
    else:
        base, others = base.reshape(-1), [o.reshape(-1) for o in others]
    deltas = [o - base for o in others]
    cos = [(a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
           for i, a in enumerate(deltas) for b in deltas[i + 1:]]
    cos = torch.stack([c.clamp(-1, 1) for c in cos]).mean(0).unsqueeze(-1)
    n = len(others)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    return (t * (sum(others) / n) + (1 - t) * base).reshape(shape)


@register("passthrough", inputs=(1, 1), arrays=True)
def passthrough(inputs: Inputs, scale: list[float | None] = None) -> np.ndarray:
    """The one input unchanged (frankenmerges of layer slices), optionally scaled."""
    tensor, factor = inputs.others[0], scale[0]
    return tensor if factor is None else tensor * factor


RANDOM_SPARSIFIERS = {"random", "della_magprune"}


def task_arithmetic(inputs: Inputs, weight: list[float], density: list[float] = 1.0,
                    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                    lambda_: float = 1.0, *, gamma: list[float] = 0.01, epsilon: list[float] = 0.15,
                    sparsifier: str | None = None, consensus: str | None = None) -> np.ndarray:
    """Generalised task arithmetic: base + λ · Σ wᵢ · sparsify(modelᵢ − base), summed over the
    entries that agree with the majority sign when `consensus` ("sum": the sign of the weighted
    deltas' sum, the only consensus mergekit's table uses), divided by the weights that contributed when `normalize`.
    (`int8_mask` is accepted for mergekit recipes; masks here are boolean.) Each task vector
    is made in its model's own buffer and the sum in the first one; each step is rounded to the
    merge's precision (`Inputs.narrow`), as mergekit computes. Work space: a sparsifier's mask,
    and for consensus over several models a sign array and the divisor."""
    import numpy as np

    base, r = inputs.base, inputs.narrow
    weights = [float(r(np.array(w, dtype=base.dtype))) for w in weight]  # rounded as mergekit's
    deltas = inputs.others
    for i, delta in enumerate(deltas):
        r(np.subtract(delta, base, out=delta))
        if sparsifier is not None:
            extra = {"magnitude_outliers": {"gamma": gamma}, "della_magprune": {"epsilon": epsilon}}.get(sparsifier, {})
            extra = {k: v[i] for k, v in extra.items()}
            if sparsifier in RANDOM_SPARSIFIERS:
                extra["generator"] = inputs.generator
            sparsify(sparsifier, delta, density=density[i], rescale=rescale, narrow=r, **extra)
        r(np.multiply(delta, weights[i], out=delta))
    if consensus is not None and len(deltas) > 1:  # entries against the majority sign (>= 0: positive) dropped
        total = sum(deltas[1:], deltas[0].copy())
        positive = total >= 0
        del total
        divisor = np.zeros(base.shape, dtype=np.float32) if normalize else None  # Σ of the agreeing weights
        for w, delta in zip(weights, deltas):
            np.copyto(delta, 0, where=(delta > 0) != positive)  # a zero stays zero either way
            if divisor is not None:
                np.add(divisor, w, out=divisor, where=delta != 0)
        del positive
        if divisor is not None:
            divisor = r(divisor.astype(base.dtype, copy=False))
            divisor[divisor == 0] = 1
    else:  # no consensus, or one task vector: it agrees with itself wherever it is not zero
        divisor = r(np.array(sum(weights), dtype=base.dtype))
        if divisor == 0 or (consensus is None and abs(divisor) < 1e-8):
            divisor = 1
    mixed = deltas[0]
    for delta in deltas[1:]:
        mixed += delta
    r(mixed)
    if normalize:
        r(np.divide(mixed, divisor, out=mixed))
    if lambda_ != 1:
        r(np.multiply(mixed, lambda_, out=mixed))
    return r(np.add(mixed, base, out=mixed))


# name: (sparsifier, sign consensus, normalize, rescale) — mergekit's table of the family
for _name, (_sparsifier, _consensus, _normalize, _rescale) in {
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}.items():
    _extra = {"magnitude_outliers": {"gamma": 0.01}, "della_magprune": {"epsilon": 0.15}}.get(_sparsifier, {})
    METHODS.register(_name)(Method(
        task_arithmetic, base="required", inputs=(2, None), random=_sparsifier in RANDOM_SPARSIFIERS, arrays=True,
        fixed={"sparsifier": _sparsifier, "consensus": _consensus},
        defaults={"normalize": _normalize, "rescale": _rescale, **_extra}))
