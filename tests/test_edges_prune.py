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
from conftest import recording_reporter, silence, unrouted_moe  # noqa: E402

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
    # the pattern sets the sparsity: another one is a contradiction (was dropped silently)
    ({"method": "wanda", "pattern": "2:4", "sparsity": 0.3}, "--pattern 2:4 removes 0.5 of the weights by itself; "
                                                             "drop --sparsity 0.3"),
    ({"pattern": "1:4", "sparsity": 0.5}, "--pattern 1:4 removes 0.75 of the weights by itself; drop --sparsity 0.5"),
])
def test_unstructured_recipes_refused_with_their_message(settings, message):
    with pytest.raises(UsageError) as e:
        _pruner(**settings)
    assert str(e.value) == message


@pytest.mark.parametrize("settings, want", [({}, 0.5), ({"pattern": "1:4"}, 0.75), ({"pattern": "2:4", "sparsity": 0.5}, 0.5),
                                             ({"method": "heads"}, 0.5), ({"sparsity": 0.3}, 0.3)])
def test_the_resolved_sparsity_is_the_patterns_or_the_default(settings, want):
    assert _pruner(**settings).settings.sparsity == want


def test_a_pattern_that_does_not_divide_a_width_is_refused_before_calibration():
    """--pattern 2:6 on a model whose widths are multiples of 4 only: refused by check_model, naming
    the first module, before any calibration window is read."""
    pruner = _pruner(method="wanda", pattern="2:6")
    with pytest.raises(UsageError) as e:
        pruner.check_model(_tiny())
    assert str(e.value) == "--pattern 2:6 needs input widths divisible by 6; model.layers.0.self_attn.q_proj takes 32"
    _pruner(method="wanda", pattern="2:4").check_model(_tiny())  # 32 and 64: fine


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


# ------------------------------------------------------------------------------------------ structured


def _model(**overrides):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return build_model(ModelConfig(**{**cfg, **overrides})).eval()


def test_structured_refusals_with_their_messages():
    from llmctl.core.model.transforms import TRANSFORMS

    with pytest.raises(UsageError) as e:
        _pruner(method="heads", unit="queries", uniform=False)
    assert str(e.value) == "unit=queries removes the same share of every group: it needs uniform=true"
    _pruner(method="heads", unit="queries")  # uniform: accepted
    _pruner(method="heads", uniform=False)  # groups: accepted
    quantized = TRANSFORMS.get("nf4")(target_modules=["q_proj"]).apply(_model())
    refused = [("heads", _model(position="alibi"),
                "heads pruning of an ALiBi model is not supported (its slopes follow the head index)"),
               ("layers", _model(num_mtp_heads=1),
                "structured pruning of a model with multi-token-prediction heads is not supported"),
               ("channels", unrouted_moe(), "channels pruning of a mixture-of-experts model is not supported"),
               ("layers", quantized, "the model has module transforms (nf4); prune a dense checkpoint")]
    for method, model, message in refused:
        with pytest.raises(UsageError) as e:
            _pruner(method=method).check_model(model)
        assert str(e.value) == message, method
    for method in ("heads", "channels", "layers"):
        _pruner(method=method).check_model(_model(position="rope"))


def test_a_layer_always_keeps_one_unit():
    """round(n · sparsity) may be all n units (2 · 0.9 → 2): one stays."""
    pruner = _pruner(method="layers", sparsity=0.9)
    assert [pruner.removed(n) for n in (1, 2, 4, 10)] == [0, 1, 3, 9]
    small = pruner.prune(_model(), torch.randint(0, 50, (2, 8)))
    assert small.cfg.num_layers == 1


def test_units_ranked_across_layers_by_their_share_of_the_layer():
    """uniform=false, by hand: shares [.2 .8] and [.1 .4 .5] — a layer's energies need not sum to
    1 (nor be above it) for the shares to compare across layers; the weakest go first, but a layer's
    last unit stays."""
    pruner = _pruner(method="channels", uniform=False, sparsity=0.2)
    kept = pruner.keep([torch.tensor([0.02, 0.08]), torch.tensor([1.0, 4.0, 5.0])])
    assert [k.tolist() for k in kept] == [[0, 1], [1, 2]]
    # shares [.25 .75] and i/55: the nine weakest of layer 1 go, then one of layer 0; 12 were asked for
    pruner = _pruner(method="channels", uniform=False, sparsity=0.99)
    kept = pruner.keep([torch.tensor([1.0, 3.0]), torch.arange(1.0, 11.0)])
    assert [k.tolist() for k in kept] == [[1], [9]]


@torch.no_grad()
def test_biases_of_the_kept_rows_stay_with_them():
    """q/k/v and gate/up biases (Qwen2's, `mlp_bias`) are cut with their rows: silent units
    removed, the logits do not change."""
    model = _model(qkv_bias=True, mlp_bias=True)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    channels = [(i, c) for i in range(2) for c in range(0, 64, 4)]
    silence(model, heads=[(0, 2), (0, 3), (1, 0), (1, 1)], channels=channels)
    ids, tokens = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (4, 16))
    want = model(ids).logits
    q_bias = model.model.layers[0].self_attn.q_proj.bias[:16].clone()
    model = _pruner(method="heads", sparsity=0.5).prune(model, tokens)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.bias, q_bias)
    model = _pruner(method="channels", sparsity=0.25).prune(model, tokens)
    assert model.cfg.intermediate_size == 48 and model.model.layers[0].mlp.up_proj.bias.shape == (48,)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_layers_pruned_from_a_model_with_per_layer_sizes():
    """A model with per-layer heads and widths (uniform=false) loses a layer: the kept one keeps
    its own sizes and the logits stay when the removed layer was silent."""
    model = _model()
    silence(model, heads=[(0, 0), (0, 1)], channels=[(1, c) for c in range(0, 64, 2)])
    tokens = torch.randint(0, 50, (4, 16))
    model = _pruner(method="heads", sparsity=0.25, uniform=False).prune(model, tokens)
    model = _pruner(method="channels", sparsity=0.25, uniform=False).prune(model, tokens)
    assert model.cfg.layer_num_heads == [2, 4] and model.cfg.layer_intermediate_sizes == [64, 32]
    silence(model, layers=[0])
    ids = torch.randint(0, 50, (2, 12))
    want = model(ids).logits
    small = _pruner(method="layers", sparsity=0.5).prune(model, tokens)
    layer = small.cfg.layer(0)
    assert (small.cfg.num_layers, layer.num_heads, layer.num_kv_heads, layer.intermediate_size) == (1, 4, 2, 32)
    torch.testing.assert_close(small(ids).logits, want, rtol=1e-4, atol=1e-4)
