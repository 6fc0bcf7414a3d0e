"""Edges of pruning that mutation testing showed untested (docs/testing.md): the recipe's
bounds and messages, `exclude_modules`, Wanda's statistics and its fallback for an expert no
calibration token reaches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import recording_reporter, unrouted_moe  # noqa: E402

from llmctl.core.prune import PRUNERS, PruneConfig  # noqa: E402
from llmctl.core.prune.unstructured import InputNorms  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402


def _pruner(**settings):
    return PRUNERS.get(settings.get("method", "magnitude"))(PruneConfig(**settings))


def _tiny(seed: int = 0):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))


def _row_magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of each row's largest |w| (the k = int(in · sparsity) smallest dropped), by sorting."""
    k = int(weight.shape[1] * sparsity)
    drop = weight.abs().argsort(dim=1, stable=True)[:, :k]
    return torch.ones_like(weight, dtype=torch.bool).scatter_(1, drop, False)


# ------------------------------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("settings,message", [
    ({"sparsity": 1.0}, "--sparsity must be in [0, 1), got 1.0"),
    ({"sparsity": -0.1}, "--sparsity must be in [0, 1), got -0.1"),
    ({"method": "wanda", "scope": "global"}, "scope=global is not a choice of wanda (it has: layer)"),
    ({"scope": "row"}, "scope=row is not a choice of magnitude (it has: layer, global)"),
    ({"scope": "global", "pattern": "2:4"}, "scope=global does not combine with an N:M --pattern"),
    ({"method": "sparsegpt", "pattern": "2:4", "block_size": 6},
     "block_size=6 must be a multiple of the pattern's M=4"),
])
def test_unstructured_recipes_refused_with_their_message(settings, message):
    with pytest.raises(UsageError) as e:
        _pruner(**settings)
    assert str(e.value) == message


def test_sparsity_zero_keeps_every_weight():
    """0 is in range (a no-op prune), 1 is not (nothing would be left)."""
    model = _tiny()
    before = {n: p.clone() for n, p in model.named_parameters()}
    _pruner(sparsity=0.0).prune(model, None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_exclude_modules_are_left_dense():
    model = _tiny()
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    _pruner(exclude_modules=["down_proj", "q_proj"], sparsity=0.5).prune(model, None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            excluded = name.endswith(("down_proj", "q_proj"))
            assert float((module.weight == 0).float().mean()) == (0.0 if excluded else 0.5), name
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    with pytest.raises(UsageError) as e:
        _pruner(target_modules=["nothing"]).prune(model, None)
    assert str(e.value) == "target_modules=['nothing'] selects no Linear module"


def test_input_norms_sum_squares_over_every_batch():
    """Wanda's ‖X_j‖² is over every calibration token, however the inputs arrive, and the count
    is the number of tokens (0 for an expert reached by none)."""
    stats = InputNorms(nn.Linear(6, 3))
    a, b = torch.randn(2, 5, 6), torch.randn(7, 6)
    stats.add(a)
    stats.add(torch.zeros(0, 6))
    stats.add(b)
    want = torch.cat([a.reshape(-1, 6), b]).square().sum(0)
    torch.testing.assert_close(stats.sq, want)
    assert stats.sq.dtype == torch.float32 and stats.count == 17
    empty = InputNorms(nn.Linear(6, 3))
    empty.add(torch.zeros(0, 6))
    assert empty.count == 0


def test_wanda_prunes_an_unreached_expert_by_magnitude_per_row():
    """Wanda's score of an expert no token reaches is all zeros (ties); it falls back to each row's
    largest |w|, as the reached expert's mask is |w|·‖x‖ per row."""
    model, report = unrouted_moe(), recording_reporter()
    experts = model.model.layers[0].mlp.experts
    want = {(e, n): _row_magnitude_mask(getattr(experts[e], n).weight, 0.5)
            for e in range(1, 4) for n in ("gate_proj", "up_proj", "down_proj")}
    _pruner(method="wanda", sparsity=0.5).prune(model, torch.randint(0, 50, (4, 16)), report)
    for (e, n), keep in want.items():
        assert torch.equal(getattr(experts[e], n).weight != 0, keep), (e, n)
    assert len(report.seen) == 9 and all("saw no calibration tokens: pruned by magnitude" in m for m in report.seen)
    assert "experts.0" not in " ".join(report.seen)
