"""Merge methods: each a registered tensor function with declared parameters.

    @METHODS.register("linear")
    def linear(inputs: Inputs, weight: list[float], normalize: bool = True) -> Tensor: ...
    METHODS.get("linear").params  # Param("weight", float, per_model=True), Param("normalize", …)

A method sees one tensor name at a time: `Inputs.base` (the base model's tensor, when the
method uses one) and `Inputs.others` (the other models', in recipe order); a per-model
parameter arrives as a list aligned with `others`. Parameters and their defaults are read
from the function's signature (a `list[...]` annotation makes a parameter per-model), so a
method is declared once. TIES, DARE, breadcrumbs and DELLA are one generalised task
arithmetic (task vectors → sparsify → sign consensus → weighted sum), configured per name.
Third-party methods register through the `llmctl.merge_methods` entry-point group.
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


@dataclass
class Inputs:
    """One tensor name's inputs: `base` (or None) and the `others`, plus a seeded generator
    for randomised methods. They are the method's own copies: it may work in them in place."""

    base: Tensor | None
    others: list[Tensor]
    generator: torch.Generator | None = None

    @property
    def all(self) -> list[Tensor]:
        return ([self.base] if self.base is not None else []) + self.others


@dataclass(frozen=True)
class Method:
    """A merge function and what it accepts: `base` is "required", "optional" or "ignored"
    (an ignored base is an ordinary input); `inputs` bounds the number of input models.
    `arrays`: the function uses only the operators numpy arrays and torch tensors share
    (`+ - * /` and their in-place forms), and gets 16-bit inputs as float32, so a merge made of
    such methods runs on numpy without importing torch (`core/merge/arrays.py`).
    `fixed` binds keyword-only arguments (a family member's choices), `defaults` overrides
    declared defaults; a keyword-only argument left unbound and undeclared is not a parameter."""

    fn: Callable[..., Tensor]
    base: str = "ignored"
    inputs: tuple[int, int | None] = (1, None)
    random: bool = False
    arrays: bool = False
    fixed: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
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


METHODS: Registry[Method] = Registry("merge method", "llmctl.merge_methods")


def register(name: str, **declared) -> Callable:
    def add(fn):
        METHODS.register(name)(Method(fn, **declared))
        return fn
    return add


def _work(t: Tensor) -> torch.dtype:
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register("linear", arrays=True)
def linear(inputs: Inputs, weight: list[float], normalize: bool = True) -> Tensor:
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


def slerp_tensors(t: float, a: Tensor, b: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two flattened tensors (linear when nearly collinear)."""
    import torch

    x, y = a.to(_work(a)).reshape(-1), b.to(_work(a)).reshape(-1)
    norm_x, norm_y = x.norm(), y.norm()
    dot = (x / (norm_x if norm_x > eps else 1) * (y / (norm_y if norm_y > eps else 1))).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * x + t * y
    else:
        theta = torch.acos(dot)
        out = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


@register("slerp", base="required", inputs=(2, 2))
def slerp(inputs: Inputs, t: float) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    return slerp_tensors(t, inputs.base, inputs.others[0])


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
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
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
def passthrough(inputs: Inputs, scale: list[float | None] = None) -> Tensor:
    """The one input unchanged (frankenmerges of layer slices), optionally scaled."""
    tensor, factor = inputs.others[0], scale[0]
    return tensor if factor is None else tensor * factor


RANDOM_SPARSIFIERS = {"random", "della_magprune"}


def task_arithmetic(inputs: Inputs, weight: list[float], density: list[float] = 1.0,
                    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                    lambda_: float = 1.0, *, gamma: list[float] = 0.01, epsilon: list[float] = 0.15,
                    sparsifier: str | None = None, consensus: str | None = None) -> Tensor:
    """Generalised task arithmetic: base + λ · Σ wᵢ · sparsify(modelᵢ − base), summed over the
    entries that agree with the majority sign when `consensus` ("sum" of the weighted deltas,
    or "count" of signs), divided by the weights that contributed when `normalize`.
    (`int8_mask` is accepted for mergekit recipes; masks here are boolean.) Memory: the
    weighted task vectors, one tensor each, plus about two tensors of work space."""
    import torch

    base = inputs.base
    weights = torch.tensor(weight, dtype=base.dtype)  # rounded to the deltas' dtype, as mergekit's
    deltas = torch.empty((len(inputs.others), *base.shape), dtype=base.dtype)
    for i, other in enumerate(inputs.others):
        delta = torch.sub(other.to(base.dtype), base, out=deltas[i])
        if sparsifier is not None:
            extra = {"magnitude_outliers": {"gamma": gamma}, "della_magprune": {"epsilon": epsilon}}.get(sparsifier, {})
            extra = {k: v[i] for k, v in extra.items()}
            if sparsifier in RANDOM_SPARSIFIERS:
                extra["generator"] = inputs.generator
            sparsify(sparsifier, delta, density=density[i], rescale=rescale, **extra)
        delta.mul_(weights[i])
    if consensus is not None:  # entries against the majority sign (>= 0: positive) are dropped in place
        positive = (deltas.sum(0) if consensus == "sum" else deltas.sign().sum(0)) >= 0
        divisor = torch.zeros(base.shape) if normalize else None  # Σ of the agreeing weights, in float32
        for w, delta in zip(weights.tolist(), deltas):
            agree = torch.where(positive, delta > 0, delta < 0)
            delta.masked_fill_(~agree, 0)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        del positive, agree
        if divisor is not None:
            divisor = divisor.to(base.dtype)
            divisor[divisor == 0] = 1
    else:
        divisor = weights.sum()
        divisor[divisor.abs() < 1e-8] = 1
    mixed = deltas[0] if len(deltas) == 1 else deltas.sum(0)
    del deltas
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base).to(base.dtype)


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
        task_arithmetic, base="required", inputs=(2, None), random=_sparsifier in RANDOM_SPARSIFIERS,
        fixed={"sparsifier": _sparsifier, "consensus": _consensus},
        defaults={"normalize": _normalize, "rescale": _rescale, **_extra}))
