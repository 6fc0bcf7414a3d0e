"""GPTQ (core/quant/gptq.py) and the OBS solver (core/quant/obs.py) against the reference
`fasterquant`, transcribed; the edges mutation testing found unchecked (docs/testing.md)."""

import pytest
import torch

from llmctl.core.quant.gptq import RoundToGrid, gptq
from llmctl.core.quant.obs import Hessian, inverse_cholesky, solve
from llmctl.core.quant.scheme import Scheme
from llmctl.errors import LlmctlError


def correlated_inputs(n=256, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(n, cols, generator=g) @ mix) * scales


def reference_gptq(weight, hessian, scheme, blocksize, percdamp=0.01, actorder=False):
    """`GPTQ.fasterquant` (IST-DASLab/gptq, gptq.py; AutoGPTQ's with `static_groups=act_order`),
    transcribed; the quantizer's `find_params`/`quantize` are `Scheme`'s grid (the same grid:
    scale (max − min) / maxq, an integer zero point)."""
    W, H = weight.clone().float(), hessian.clone().float()
    columns, groupsize = W.shape[1], scheme.group_size or -1
    static_groups = actorder and groupsize != -1
    params = scheme.params(W) if groupsize == -1 else None  # before the dead columns are zeroed
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [scheme.params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses, Q = torch.zeros_like(W), torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        params = scheme.params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    params = groups[idx // groupsize]
            q = scheme.dequantize(scheme.quantize(w.unsqueeze(1), *params), *params).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q, Losses.sum(1)


def _layer(dead=(5,), rows=24, cols=64, seed=0):
    """A weight of a trained model's scale and its Hessian; the `dead` inputs no token reaches,
    their weights the largest."""
    x = correlated_inputs(cols=cols, seed=seed)
    x[:, list(dead)] = 0
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    w[:, list(dead)] *= 4
    return w, 2 * x.T @ x / len(x)


@pytest.mark.parametrize("scheme, block_size, reference_block, cols", [
    (Scheme(4, None, True), 16, 16, 64),
    (Scheme(4, None, False), 32, 32, 64),
    (Scheme(8, None, True), 64, 64, 64),
    (Scheme(4, 16, True), 16, 16, 64),
    (Scheme(4, 32, False), 16, 32, 64),  # a group spans blocks: the block size is rounded up to it
    (Scheme(4, 48, True), 32, 48, 192),  # and a group never straddles two blocks (not at 128 either)
], ids=["int4", "int4-asym", "int8", "int4-g16", "int4-g32-asym", "int4-g48"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_equals_the_reference(scheme, block_size, reference_block, cols, act_order):
    """The reference fits a dynamic group on the weights its block started with, so the solutions
    agree where groups start blocks: llmctl's block size is a multiple of the group size."""
    w, h = _layer(cols=cols)
    scale, zero, q = gptq(w, h, scheme, block_size=block_size, act_order=act_order)
    want, _ = reference_gptq(w, h, scheme, reference_block, actorder=act_order)
    torch.testing.assert_close(scheme.dequantize(q, scale, zero), want, rtol=0, atol=1e-6)


def test_solver_losses_are_the_references():
    """The per-row loss Σ (w − q)² / [U]ᵢᵢ² / 2 (U the inverse Hessian's Cholesky factor)."""
    w, h = _layer()
    scheme = Scheme(4, None, True)
    _, loss = solve(w, h, RoundToGrid(scheme, w, dynamic=False), block_size=16, act_order=True)
    _, want = reference_gptq(w, h, scheme, 16, actorder=True)
    assert loss.shape == (24,) and loss.min() > 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_gptq_does_not_depend_on_the_inputs_scale():
    """Damping is relative to the Hessian's mean diagonal, so inputs 10⁶ times smaller (H 10¹² times)
    give the same solution, as the reference's (a floor on the mean over-damped tiny Hessians)."""
    w, h = _layer(dead=())
    scheme = Scheme(4, None, True)
    small = h * 1e-12
    scale, zero, q = gptq(w, small, scheme, block_size=16)
    want, _ = reference_gptq(w, small, scheme, 16)
    torch.testing.assert_close(scheme.dequantize(q, scale, zero), want, rtol=0, atol=1e-6)
    assert torch.equal(q, gptq(w, h, scheme, block_size=16)[2])


def _diagonal(last):
    """A Hessian whose last eigenvalue is `last`: mean diagonal (4 + last) / 5."""
    return torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, last]))


def test_damping_grows_tenfold_until_the_factorisation_succeeds():
    """λ = damp·mean(diag H)·10^k for the first k that makes H + λI positive definite."""
    h = _diagonal(-0.05)  # λ = 7.9e-5, 7.9e-4, 7.9e-3 fail; 7.9e-2 succeeds
    u = inverse_cholesky(h, damp=1e-4)
    lam = 1e-4 * 1000 * (4 - 0.05) / 5
    torch.testing.assert_close(u.diagonal(), (h.diagonal() + lam).rsqrt())
    assert torch.equal(u, torch.diag(u.diagonal()))


def test_damping_gives_up_after_four_tries_with_a_clear_message():
    h = _diagonal(-0.5)  # the fifth try (λ = 0.7) would succeed
    message = ("the calibration Hessian is not positive definite even with damping; "
               "use more calibration samples or a larger damping")
    with pytest.raises(LlmctlError) as error:
        inverse_cholesky(h, damp=1e-4)
    assert str(error.value) == message
    assert torch.isfinite(inverse_cholesky(h, damp=1e-4, tries=5)).all()


def test_solver_refuses_a_hessian_of_another_width():
    with pytest.raises(ValueError, match=r"^Hessian \(8, 8\) does not match a weight of 6 columns$"):
        solve(torch.zeros(3, 6), torch.eye(8), RoundToGrid(Scheme(8), torch.zeros(3, 6), dynamic=False))


def test_hessian_ignores_empty_inputs_and_follows_its_inputs_device():
    h = Hessian(8)
    h.add(torch.zeros(0, 8))  # a linear no token reached (an unrouted expert)
    assert h.count == 0 and torch.equal(h.matrix, torch.zeros(8, 8))
    x = torch.randn(3, 5, 8)
    h.add(x)
    h.add(x[:0])
    assert h.count == 15
    torch.testing.assert_close(h.matrix, 2 * x.reshape(15, 8).T @ x.reshape(15, 8) / 15)
    assert Hessian(8, device="meta").matrix.is_meta  # until an input arrives, where it was made
    # GPTQ's Hessians are made without a device: they live where the activations are (a GPU's)
    meta = Hessian(8)
    meta.add(torch.randn(4, 8, device="meta"))
    assert meta.matrix.is_meta and meta.matrix.dtype == torch.float32 and meta.count == 4


@pytest.mark.parametrize("act_order", [False, True])
def test_a_linear_no_input_reached_is_rounded_to_nearest(act_order):
    """An all-zero Hessian made every column dead, so the weight was zeroed whole."""
    w = torch.randn(8, 32)
    scheme = Scheme(4, 16, True)
    scale, zero, q = gptq(w, torch.zeros(32, 32), scheme, block_size=16, act_order=act_order)
    assert torch.equal(scheme.dequantize(q, scale, zero), scheme.fake(w))


def test_gptq_rounds_an_unrouted_expert_to_nearest():
    from conftest import unrouted_moe

    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.methods import quantize_model

    model = unrouted_moe()
    experts = model.model.layers[0].mlp.experts
    dense = {e: experts[e].up_proj.weight.detach().clone() for e in (0, 3)}
    quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=16), torch.randint(0, 50, (4, 16)))
    scheme = Scheme(4, 16, True)
    assert torch.equal(experts[3].up_proj.dequantize(torch.float32), scheme.fake(dense[3]))
    assert not torch.equal(experts[0].up_proj.dequantize(torch.float32), scheme.fake(dense[0]))  # calibrated


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_unrouted_experts_are_reported(method):
    """The run says which linears no calibration token reached (rounded to nearest), as prune does,
    and their empty inputs do not turn the reported output error into NaN (AWQ's did)."""
    from conftest import recording_reporter, unrouted_moe

    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.methods import quantize_model

    report = recording_reporter()
    errors = quantize_model(unrouted_moe(), QuantizeConfig(method=method, bits=4, group_size=16),
                            torch.randint(0, 50, (4, 16)), report)
    assert errors["linears"] == 16 and torch.isfinite(torch.tensor(errors["output_error"]))  # (AWQ's was NaN)
    unrouted = {f"model.layers.0.mlp.experts.{e}.{p}_proj" for e in (1, 2, 3) for p in ("gate", "up", "down")}
    assert set(report.seen) == {f"{p} saw no calibration tokens: rounded to nearest" for p in unrouted}
