"""Pruning: methods as registered strategies (`PRUNERS`), one recipe (`PruneConfig`).

Modules: `masks` (top-k and N:M sparsity masks), `calibration` (calibration windows and the
block-by-block run), `unstructured` (magnitude, Wanda, SparseGPT: zeros in place),
`structured` (heads, channels, layers: a physically smaller model), `run`
(`prune_checkpoint`, what the command runs).
"""

from llmctl.core.prune import structured, unstructured  # noqa: F401  (register the built-in methods)
from llmctl.core.prune.base import PRUNERS, Pruner
from llmctl.core.prune.config import PruneConfig

__all__ = ["PRUNERS", "PruneConfig", "Pruner"]
