"""The Optimal Brain Surgeon column solver shared by GPTQ (round to a grid) and SparseGPT (apply a mask).

    h = Hessian(linear.in_features)
    with capture_inputs(block, lambda path, x: h.add(x)): run.step()
    new_weight, loss = solve(linear.weight, h.matrix, rule, block_size=128, damp=0.01, act_order=True)

Both methods walk a weight's input columns in order, set each column to a constrained value
(`rule.column`) and spread its error over the columns not yet visited, weighted by the inverse
Hessian of the layer's reconstruction loss ‖WX − ŴX‖² (H = 2XXᵀ/N). Updates are lazy: within a
block of columns they are applied column by column, to the rest of the matrix once per block,
through the upper Cholesky factor of H⁻¹ (Frantar et al., GPTQ, 2022; SparseGPT, 2023).

A rule sees each block before its columns are visited (`begin`: the block's current weights,
its rows of the Cholesky factor, the original indices of its columns), so SparseGPT can choose
the block's mask there and GPTQ can fit a group's scales on the up-to-date weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.errors import LlmctlError


class Hessian:
    """H = 2/N Σ xxᵀ over every row x seen by `add` (float32, a running mean, on the inputs' device)."""

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs `x` of shape [..., columns]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        if self.count == 0:
            self.matrix = self.matrix.to(x.device)
        self.matrix *= self.count / (self.count + n)
        self.count += n
        x = x * (2 / self.count) ** 0.5
        self.matrix.addmm_(x.T, x)


@dataclass
class Block:
    """The columns a rule is about to see: `weight` [rows, width] (updated in place as columns
    are visited), `hinv` the block's rows of the inverse Hessian's upper Cholesky factor
    [width, width], `columns` the original index of each column (act-order permutes them)."""

    start: int
    weight: torch.Tensor
    hinv: torch.Tensor
    columns: torch.Tensor


class ColumnRule:
    """What a column becomes: GPTQ rounds it to its quantization grid, SparseGPT zeroes the
    pruned entries. `begin` is called once per block before its columns."""

    def begin(self, block: Block) -> None:
        pass

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """The new value of column `i` of the current block, given its current value `w` [rows]."""
        raise NotImplementedError


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01, tries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp × mean(diag H); λ grows tenfold on
    failure (a nearly singular H from too little calibration data)."""
    mean = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(tries):
        try:
            lower = torch.linalg.cholesky(hessian + eye * (damp * 10**attempt * mean))
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise LlmctlError("the calibration Hessian is not positive definite even with damping; "
                      "use more calibration samples or a larger damping")


def solve(weight: torch.Tensor, hessian: torch.Tensor, rule: ColumnRule, *, block_size: int = 128,
          damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit `weight`'s columns (in order, or by decreasing Hessian diagonal with `act_order`),
    set each to `rule.column`'s value and compensate its error on the columns left.

    Returns (the new weight [rows, columns] float32 in the original column order, the loss per
    row Σ (w − q)² / [H⁻¹]ᵢᵢ / 2). Inputs are not modified. Columns no input ever reached
    (zero on H's diagonal) are set to zero, as in the reference implementations.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(H.shape)} does not match a weight of {cols} columns")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    Hinv = inverse_cholesky(H, damp)
    losses = torch.zeros(rows, device=W.device)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        rule.begin(Block(start, W1, Hinv1, order[start:end]))
        for i in range(end - start):
            w, d = W1[:, i], Hinv1[i, i]
            q = rule.column(i, w)
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]

    return W[:, torch.argsort(order)], losses
