"""The pruner registry and interface.

    @PRUNERS.register("my_method")
    class MyMethod(Pruner):
        calibrated = True                         # wants calibration tokens
        def prune(self, model, tokens, report):   # change `model` in place, or consume it and
                                                  # return a new (smaller) one
            ...
            return model

A plugin adds one through the `llmctl.pruners` entry-point group.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from llmctl.core.prune.config import PruneConfig
from llmctl.core.registry import Registry
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError

DEFAULT_SPARSITY = 0.5


class Pruner:
    """One pruning method; `settings` is the resolved recipe."""

    calibrated: ClassVar[bool] = False  # needs calibration tokens (`tokens` [N, T])
    structured: ClassVar[bool] = False  # changes shapes (the output is a smaller model)
    summary: dict  # what `prune` found (sizes kept, layers removed…), for the lineage and the report

    def __init__(self, settings: PruneConfig):
        self.settings = settings
        self.summary = {}
        self.check()

    def check(self) -> None:
        """UsageError for settings this method cannot use (before anything is loaded)."""
        if self.settings.sparsity is None:
            self.settings.sparsity = DEFAULT_SPARSITY
        if not 0 <= self.settings.sparsity < 1:
            raise UsageError(f"--sparsity must be in [0, 1), got {self.settings.sparsity}")
        if self.settings.pattern is not None:
            raise UsageError(f"--pattern is for unstructured methods, not {PRUNERS.name_of(type(self))}")

    def check_model(self, model: nn.Module) -> None:
        """UsageError for a model this method cannot prune."""
        if getattr(model, "transforms", None):
            names = ", ".join(t.name for t in model.transforms)
            raise UsageError(f"the model has module transforms ({names}); prune a dense checkpoint")

    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        raise NotImplementedError


PRUNERS: Registry[type["Pruner"]] = Registry("pruning method", "llmctl.pruners", base=Pruner)
