"""Edges of the integer grids and the sparsity masks that mutation testing showed untested
(docs/testing.md): groups of one sign or all zeros, group size 1, N:M boundaries and messages."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmctl.core.prune.masks import nm_mask, parse_pattern  # noqa: E402
from llmctl.core.quant.scheme import Scheme  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_group_of_one_sign_still_holds_zero(symmetric):
    """The range is widened to hold 0: a positive group's zero-point maps 0 to an integer."""
    scheme = Scheme(bits=4, group_size=4, symmetric=symmetric)
    w = torch.tensor([[0.25, 0.5, 0.75, 1.0, -0.2, -0.4, -0.8, 0.0]])
    scale, zero = scheme.params(w)
    back = scheme.dequantize(scheme.quantize(w, scale, zero), scale, zero, torch.float32)
    assert back[0, 7] == 0
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-7
    if not symmetric:  # lo = 0 for the positive group: its zero-point is qmin
        assert zero[0, 0] == scheme.qmin and scale[0, 0] == pytest.approx(1.0 / 15)


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_all_zero_group_quantizes_to_zeros(symmetric):
    scheme = Scheme(bits=8, group_size=4, symmetric=symmetric)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, 0.25]])
    scale, zero = scheme.params(w)
    back = scheme.dequantize(scheme.quantize(w, scale, zero), scale, zero, torch.float32)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(back[0, :4], torch.zeros(4))


def test_group_size_one_is_a_grid_per_weight():
    scheme = Scheme(bits=4, group_size=1)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    scale, zero = scheme.params(w)
    assert scale.shape == (3, 5)
    back = scheme.dequantize(scheme.quantize(w, scale, zero), scale, zero, torch.float32)
    assert torch.allclose(back.abs(), w.abs(), rtol=1 / 7 + 1e-6)  # |w| is the group's range: exact up to rounding of 7/7
    with pytest.raises(UsageError, match="--group-size must be positive, not 0"):
        Scheme(bits=4, group_size=0)


def test_nm_patterns_take_every_n_below_m():
    assert parse_pattern("1:4") == (1, 4) and parse_pattern("2:4") == (2, 4) and parse_pattern(" 3:8") == (3, 8)
    for bad in ("4:4", "0:4", "5:4"):
        with pytest.raises(UsageError, match=rf"--pattern '{bad}': expected 0 < N < M"):
            parse_pattern(bad)
    with pytest.raises(UsageError, match=r"expected N:M, e\.g\. 2:4 \(in YAML or key=value, quote it"):
        parse_pattern(24)  # YAML read 2:4 unquoted as a number
    with pytest.raises(UsageError, match=r"expected N:M, e\.g\. 2:4$"):
        parse_pattern("two:four")


def test_nm_mask_on_a_batch_of_matrices_and_the_width_message():
    scores = torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, 2, 4)
    assert mask.shape == scores.shape and (mask.view(2, 3, 2, 4).sum(-1) == 2).all()
    for b in range(2):  # each matrix as on its own
        assert torch.equal(mask[b], nm_mask(scores[b], 2, 4))
    with pytest.raises(UsageError, match="M=4 needs input sizes divisible by 4, got 6"):
        nm_mask(torch.rand(2, 4, 6), 2, 4)


def test_storage_dtypes_of_the_grid():
    """Integers are int8; dequantization and the stored scale follow the requested dtype."""
    scheme = Scheme(bits=4, group_size=8, symmetric=False)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    scale, zero, q = scheme.nearest(w, torch.bfloat16)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # rounded to what the checkpoint stores
    assert not torch.equal(scale, scheme.params(w)[0])
    assert scheme.dequantize(q, scale, zero, torch.bfloat16).dtype == torch.bfloat16
