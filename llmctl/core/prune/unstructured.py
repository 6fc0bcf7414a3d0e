"""Unstructured and N:M pruning of Linear weights: magnitude, Wanda, SparseGPT (on the OBS
solver GPTQ shares, `core/quant/obs.py`). The model keeps its shapes; pruned weights become
exact zeros.

A method scores every weight of a module (`score`), and the lowest scores are zeroed in the
method's comparison group: the whole module (magnitude), each output row (Wanda), or every M
consecutive inputs of a row for an N:M pattern. SparseGPT instead chooses its mask block by
block as the solver walks the columns, and updates the weights it keeps to make up for the
ones it removes. Calibrated methods see each block's Linear
inputs with the blocks before it already pruned (`for_each_block`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmctl.core.model.layerwise import capture_inputs
from llmctl.core.model.transforms import select_modules
from llmctl.core.prune.base import DEFAULT_SPARSITY, PRUNERS, Pruner
from llmctl.core.prune.calibration import for_each_block
from llmctl.core.prune.masks import nm_mask, parse_pattern, topk_mask
from llmctl.core.quant.obs import ColumnRule, Hessian, solve
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError


def target_linears(model: nn.Module, settings) -> list[str]:
    """Paths of the nn.Linear modules the recipe's target_modules / exclude_modules select."""
    paths = [p for p in select_modules(model, settings.target_modules, settings.exclude_modules)
             if isinstance(model.get_submodule(p), nn.Linear)]
    if not paths:
        raise UsageError(f"target_modules={settings.target_modules!r} selects no Linear module")
    return paths


class InputNorms:
    """Σ x_j² over every token, per input feature j (Wanda's activation statistic)."""

    def __init__(self, linear: nn.Linear):
        self.sq = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.sq += x.float().square().sum(0)
        self.count += x.shape[0]


class Unstructured(Pruner):
    """Zero the lowest-scoring weights of every selected Linear."""

    row_groups = False  # compare weights within each output row (else within the module)
    Stats: type | None = None  # the per-module input statistic a calibrated method accumulates
    scopes = ("layer",)  # the `scope` values the method has

    def check(self) -> None:
        s = self.settings
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        if self.nm is not None:  # the pattern sets the sparsity; a different one is a contradiction, not ignored
            n, m = self.nm
            if s.sparsity is not None and not math.isclose(s.sparsity, (m - n) / m):
                raise UsageError(f"--pattern {s.pattern} removes {(m - n) / m:g} of the weights by itself; "
                                 f"drop --sparsity {s.sparsity:g}")
            s.sparsity = (m - n) / m
        if s.sparsity is None:
            s.sparsity = DEFAULT_SPARSITY
        if not 0 <= s.sparsity < 1:
            raise UsageError(f"--sparsity must be in [0, 1), got {s.sparsity}")
        if s.scope not in self.scopes:
            raise UsageError(f"scope={s.scope} is not a choice of {PRUNERS.name_of(type(self))} "
                             f"(it has: {', '.join(self.scopes)})")

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if self.nm is None:
            return
        m = self.nm[1]
        for path in target_linears(model, self.settings):
            width = model.get_submodule(path).in_features
            if width % m:  # found before calibration starts, not at the first such module
                raise UsageError(f"--pattern {self.settings.pattern} needs input widths divisible by {m}; "
                                 f"{path} takes {width}")

    def score(self, linear: nn.Linear, stats) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.nm is not None:
            return nm_mask(scores, *self.nm)
        return topk_mask(scores, self.settings.sparsity, dim=-1 if self.row_groups else None)

    def prune_linear(self, linear: nn.Linear, stats) -> None:
        linear.weight.data.mul_(self.mask(self.score(linear, stats)))

    @torch.no_grad()
    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        paths = target_linears(model, self.settings)
        if not self.calibrated:
            with report.progress("prune", total=len(paths), unit="module") as bar:
                for path in paths:
                    self.prune_linear(model.get_submodule(path), None)
                    bar.advance()
            return model
        outside = [p for p in paths if not p.startswith("model.layers.")]
        if outside:
            raise UsageError(f"{PRUNERS.name_of(type(self))} prunes the blocks' modules only, not {outside[0]}")

        def visit(i: int, block: nn.Module, inputs: torch.Tensor, ctx) -> None:
            prefix = f"model.layers.{i}."
            mine = [p.removeprefix(prefix) for p in paths if p.startswith(prefix)]
            stats = {p: self.Stats(block.get_submodule(p)) for p in mine}
            with capture_inputs(block, lambda p, x: stats[p].add(x) if p in stats else None):
                block(inputs, ctx)
            for p in mine:
                linear, seen = block.get_submodule(p), stats.pop(p)
                if seen.count:
                    self.prune_linear(linear, seen)
                else:  # an expert no calibration token reached: nothing to weigh its weights by
                    report.warn(f"{prefix}{p} saw no calibration tokens: pruned by magnitude")
                    linear.weight.data.mul_(self.mask(linear.weight.abs()))

        for_each_block(model, tokens, visit, report, description="prune")
        return model


@PRUNERS.register("magnitude")
class Magnitude(Unstructured):
    """|W|: per module, or one threshold over every selected module (`scope=global`)."""

    scopes = ("layer", "global")

    def check(self) -> None:
        super().check()
        if self.settings.scope == "global" and self.nm is not None:
            raise UsageError("scope=global does not combine with an N:M --pattern")

    def score(self, linear: nn.Linear, stats) -> torch.Tensor:
        return linear.weight.abs()

    @torch.no_grad()
    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        if self.settings.scope == "layer":
            return super().prune(model, tokens, report)
        weights = [model.get_submodule(p).weight for p in target_linears(model, self.settings)]
        keep = topk_mask(torch.cat([w.detach().abs().flatten().float() for w in weights]), self.settings.sparsity)
        for w, part in zip(weights, keep.split([w.numel() for w in weights])):
            w.data.mul_(part.view_as(w))
        return model


@PRUNERS.register("wanda")
class Wanda(Unstructured):
    """|W_ij| · ‖X_j‖₂ compared within each output row (Sun et al., 2023)."""

    calibrated = True
    row_groups = True
    Stats = InputNorms

    def score(self, linear: nn.Linear, stats: InputNorms) -> torch.Tensor:
        return linear.weight.abs().float() * stats.sq.sqrt()


class MaskColumns(ColumnRule):
    """SparseGPT's column rule for the OBS solver: a mask chosen on the up-to-date weights by
    w² / [H⁻¹]ᵢᵢ² — per block of columns, or per M columns for N:M — and applied column by column."""

    def __init__(self, sparsity: float, nm: tuple[int, int] | None):
        self.sparsity, self.nm = sparsity, nm

    def begin(self, block) -> None:
        self.block = block
        if self.nm is None:
            self.keep = topk_mask(self._scores(0, block.weight.shape[1]), self.sparsity)

    def _scores(self, start: int, end: int) -> torch.Tensor:
        b = self.block
        return b.weight[:, start:end].square() / b.hinv.diagonal()[start:end].square()

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        if self.nm is not None and i % self.nm[1] == 0:
            n, m = self.nm
            self.keep_nm = nm_mask(self._scores(i, i + m), n, m)
        keep = self.keep[:, i] if self.nm is None else self.keep_nm[:, i % self.nm[1]]
        return w * keep


@PRUNERS.register("sparsegpt")
class SparseGPT(Unstructured):
    """Block-wise OBS updates with masks (Frantar & Alistarh, 2023): `block_size`, `damp`."""

    calibrated = True

    Stats = staticmethod(lambda linear: Hessian(linear.in_features, device=linear.weight.device))

    def check(self) -> None:
        super().check()
        s = self.settings
        if self.nm is not None and s.block_size % self.nm[1]:
            raise UsageError(f"block_size={s.block_size} must be a multiple of the pattern's M={self.nm[1]}")

    def prune_linear(self, linear: nn.Linear, stats: Hessian) -> None:
        s = self.settings
        rule = MaskColumns(s.sparsity, self.nm)
        weight, _ = solve(linear.weight, stats.matrix, rule, block_size=s.block_size, damp=s.damp)
        linear.weight.data.copy_(weight.to(linear.weight.dtype))
