"""Quantization methods (registered strategies) and the block-by-block driver.

    model, _ = load_model(ckpt)
    report = quantize_model(model, cfg, calibration_ids, reporter)   # model now holds PackedLinears
    save_model(model, out, lineage={"quantization": report, …})

The integer methods write the `pack-quantized` transform and differ in how the integers are
chosen; `nf4` writes QLoRA's NF4 (`core/quant/nf4.py`). Round-to-nearest (`int8`, `int4`) needs no data. Calibrated methods (`gptq`, `awq`)
run the model one block at a time (`LayerwiseRun`): a block's linears are quantized from the
inputs the already-quantized blocks before it produce, then the block is run again to make
the next block's input. The windows go through a block `micro_batch` at a time, so peak memory
is the model, every window's hidden states (twice) and one micro-batch's block activations.

A method is a class in QUANTIZERS (plugins: entry-point group `llmctl.quantizers`) with
`calibrated` and `block(block, linears, forward, put)` (a `Method` subclass): `linears` are the
paths (relative to the block) to quantize, `forward()` runs the block on its calibration input,
`put(path, solution, hessian)` replaces the linear at `path` by its quantized form and measures its error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
from torch import nn

from llmctl.core.model.layerwise import LayerwiseRun, capture_inputs
from llmctl.core.model.transforms import Transform, replace_module
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.quant.gptq import gptq
from llmctl.core.quant.linear import PackedLinear, PackQuantized, check_names, router_patterns
from llmctl.core.quant.obs import Hessian
from llmctl.core.registry import Registry
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError

Put = Callable[[str, tuple, "torch.Tensor | None"], None]


class Method:
    """A way to choose the integers of the `pack-quantized` transform (override `transform` and
    `replace` for another format)."""

    calibrated = False

    def __init__(self, cfg: QuantizeConfig):
        self.cfg = self.settle(cfg)
        self.recorded = self.transform()

    @classmethod
    def settle(cls, cfg: QuantizeConfig) -> QuantizeConfig:
        """`cfg` as this method applies it (what the lineage records): the grid of a method with a fixed one."""
        return cfg

    def transform(self) -> Transform:
        """The transform the checkpoint records (its `select` picks the linears to quantize)."""
        cfg = self.cfg
        return PackQuantized(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, ignore=list(cfg.ignore))

    @property
    def scheme(self):
        return self.recorded.scheme

    def check(self, linear: nn.Module) -> None:
        """Fail before any work on a linear this method cannot take (a group size that does not divide)."""
        self.scheme.groups(linear.in_features)

    def replace(self, path: str, linear: nn.Linear, solution: tuple | None) -> nn.Module:
        """The quantized module for `linear`: round-to-nearest, or a calibrated method's solution."""
        return PackedLinear.from_linear(linear, self.scheme, solution)

    def block(self, block: nn.Module, linears: list[str], forward: Callable[[], None], put: Put) -> None:
        raise NotImplementedError


QUANTIZERS: Registry[type] = Registry("quantization method", "llmctl.quantizers", base=Method)


@QUANTIZERS.register("int8")
@QUANTIZERS.register("int4")
class RoundToNearest(Method):
    """Each weight to its nearest grid point; no calibration."""


@QUANTIZERS.register("nf4")
class NormalFloat4(Method):
    """QLoRA's NF4 (core/quant/nf4.py): blocks of 64 on the 16 NormalFloat levels, absmax
    double-quantized; an llmctl format (transformers refuses it) that `finetune --method qlora` builds on."""

    GRID = {"bits": 4, "group_size": 64, "symmetric": True}  # 16 NormalFloat levels, absmax per 64 weights

    @classmethod
    def settle(cls, cfg: QuantizeConfig) -> QuantizeConfig:
        return dataclasses.replace(cfg, **cls.GRID)  # the grid NF4 applies, whatever else was asked

    def transform(self) -> Transform:
        from llmctl.core.quant.nf4 import NF4

        return NF4(exclude_modules=nf4_exclusions([p for p in self.cfg.ignore if p != "lm_head"]))

    def check(self, linear: nn.Module) -> None:
        pass

    def replace(self, path, linear, solution):
        return self.recorded.replace(path, linear)


@QUANTIZERS.register("gptq")
class GPTQ(Method):
    """GPTQ (core/quant/gptq.py) on each linear's input Hessian. With `true_sequential`, the
    linears that share an input (q/k/v, gate/up) are quantized together, in execution order,
    the block re-run in between so each group sees the ones before it quantized."""

    calibrated = True

    def block(self, block, linears, forward, put):
        opts = self.cfg.gptq
        for group in (_groups(block, linears, forward) if opts.true_sequential else [linears]):
            hessians = {p: Hessian(block.get_submodule(p).in_features) for p in group}
            with capture_inputs(block, lambda p, x: p in hessians and hessians[p].add(x)):
                forward()
            for p in group:
                w = block.get_submodule(p).weight
                solution = gptq(w, hessians[p].matrix, self.scheme, block_size=opts.block_size, damp=opts.damp,
                                act_order=opts.act_order, keep_zeros=opts.keep_zeros)
                put(p, solution, hessians[p].matrix)


@QUANTIZERS.register("awq")
class AWQ(Method):
    """Activation-aware scaling (core/quant/awq.py), then round-to-nearest."""

    calibrated = True

    def block(self, block, linears, forward, put):
        from llmctl.core.quant.awq import awq_block

        awq_block(block, linears, forward, put, self.scheme, self.cfg.awq)


def nf4_exclusions(ignore: list[str]) -> str | list[str] | None:
    """`ignore` as NF4's `exclude_modules` (PEFT's rule): a list of names (each also matching as a
    `.suffix`, e.g. `down_proj`) while there is no `re:` entry, else one full-match regex with the
    `re:` entries matched from the start of the path, as compressed-tensors matches them."""
    ignore = check_names(ignore, "ignore")
    if not any(n.startswith("re:") for n in ignore):
        return ignore or None
    return "|".join(f"(?:{n[3:]}).*" if n.startswith("re:") else f"(?:.*\\.)?{re.escape(n)}" for n in ignore)


def _groups(block: nn.Module, linears: list[str], forward: Callable[[], None]) -> list[list[str]]:
    """`linears` grouped by shared input tensor, in the order the block calls them."""
    keys: dict[str, tuple] = {}
    held: list[torch.Tensor] = []  # alive until grouped: a freed input's address can be reused by a later one

    def note(p: str, x: torch.Tensor) -> None:
        if p not in keys:  # the first micro-batch's inputs decide (and only they are held)
            keys[p] = (x.data_ptr(), tuple(x.shape))
            held.append(x)

    with capture_inputs(block, note):
        forward()
    groups: dict[tuple, list[str]] = {}
    for p in sorted((p for p in linears if p in keys), key=list(keys).index):
        groups.setdefault(keys[p], []).append(p)
    return list(groups.values()) + [[p] for p in linears if p not in keys]


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² from H ∝ XᵀX, or ‖W − Ŵ‖² / ‖W‖² without inputs."""
    d, w = (w - w_hat).float(), w.float()
    if hessian is None:
        return (d.pow(2).sum() / w.pow(2).sum().clamp(min=1e-30)).item()
    return ((d @ hessian * d).sum() / (w @ hessian * w).sum().clamp(min=1e-30)).item()


def quantize_model(model: nn.Module, cfg: QuantizeConfig, calibration: torch.Tensor | None = None,
                   report: Reporter = SILENT) -> dict:
    """Quantize `model`'s linears in place with `cfg.method`; the errors measured, per linear
    relative weight error and (calibrated methods) relative output error on the calibration data."""
    user_ignore = check_names(cfg.ignore, "ignore")
    cfg = dataclasses.replace(cfg, ignore=[*cfg.ignore, *router_patterns(model, cfg.ignore)])  # routers stay float
    method = QUANTIZERS.get(cfg.method)(cfg)
    paths = method.recorded.select(model)
    if not paths:
        raise UsageError(f"ignore={user_ignore} leaves no linear to quantize")
    for p in paths:
        method.check(model.get_submodule(p))
    errors: dict[str, dict] = {}

    def put(prefix: str, path: str, solution: tuple | None, hessian: torch.Tensor | None) -> None:
        full = f"{prefix}{path}"
        linear = model.get_submodule(full)
        new = method.replace(full, linear, solution)
        w_hat = new.dequantize(torch.float32)
        errors[full] = {"weight": relative_error(linear.weight, w_hat, None)}
        if hessian is not None and not hessian.any():
            report.warn(f"{full} saw no calibration tokens: rounded to nearest")
        elif hessian is not None:
            errors[full]["output"] = relative_error(linear.weight, w_hat, hessian)
        replace_module(model, full, new)

    with torch.no_grad():
        if not method.calibrated:
            with report.progress(f"quantize {cfg.method}", total=len(paths), unit="linear") as bar:
                for p in paths:
                    put("", p, None, None)
                    bar.advance()
        else:
            if calibration is None:
                raise UsageError(f"--method {cfg.method} needs --calibration text")
            _calibrated(model, method, paths, calibration, put, report)
    model.transforms = [*getattr(model, "transforms", []), method.recorded]
    return summarize(errors)


def _calibrated(model, method: Method, paths: list[str], ids: torch.Tensor, put, report: Reporter) -> None:
    """Block by block over micro-batches of the windows: every window's hidden states are kept
    (the block's input and output), but a block's activations only for one micro-batch at a time."""
    device = next(model.parameters()).device
    runs = [LayerwiseRun(model, chunk.to(device)) for chunk in ids.split(method.cfg.micro_batch)]
    blocks = runs[0].blocks
    with report.progress(f"{method.cfg.method} layer by layer", total=len(blocks), unit="layer") as bar:
        for i, block in enumerate(blocks):
            prefix = f"model.layers.{i}."
            linears = [p.removeprefix(prefix) for p in paths if p.startswith(prefix)]
            inputs = [run.hidden for run in runs]

            def forward(i=i, inputs=inputs):
                for run, hidden in zip(runs, inputs):
                    run.index = i
                    run.step(hidden)

            if linears:
                method.block(block, linears, forward, lambda p, s, h, prefix=prefix: put(prefix, p, s, h))
            forward()  # the quantized block's output is the next block's input
            bar.advance()
    for p in paths:  # linears outside the blocks (an untied head someone chose to quantize), or that no
        if isinstance(model.get_submodule(p), nn.Linear):  # token reached (an unrouted expert): nearest
            if p.startswith("model.layers."):
                report.warn(f"{p} saw no calibration tokens: rounded to nearest")
            put("", p, None, None)


def summarize(errors: dict[str, dict]) -> dict:
    """Mean relative errors over the quantized linears, and the worst one."""
    out: dict = {"linears": len(errors)}
    for kind in ("weight", "output"):
        values = {p: e[kind] for p, e in errors.items() if kind in e}
        if values:
            worst = max(values, key=values.get)
            out[f"{kind}_error"] = sum(values.values()) / len(values)
            out[f"worst_{kind}_error"] = {"linear": worst, "error": values[worst]}
    return out
