"""The batch-1 decode back end: matrix-vector products rewritten as streaming reductions (the
native kernels, which take them first where they are built, are tested in test_native.py)."""

import pytest
import torch
import torch.nn.functional as F

from llmctl.core import native
from llmctl.core.generate import matvec


@pytest.fixture(autouse=True)
def without_native_kernels(monkeypatch):
    monkeypatch.setattr(native, "has", lambda capability: False)


def test_rewrites_only_single_row_float32_products():
    w = torch.randn(6, 5)
    x = torch.randn(1, 5)
    torch.testing.assert_close(matvec.mm(x, w.t()), x @ w.t())
    torch.testing.assert_close(matvec.addmm(torch.ones(6), x, w.t()), 1 + x @ w.t())
    assert matvec.mm(torch.randn(2, 5), w.t()) is NotImplemented  # a batch: aten's GEMM reads W once
    assert matvec.mm(x.bfloat16(), w.t().bfloat16()) is NotImplemented  # oneDNN's bf16 kernels are faster
    assert matvec.addmm(torch.ones(6), x, w.t(), beta=2) is NotImplemented


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_linear_streams_and_equals_aten(monkeypatch, bias):
    calls = []
    rows_dot = matvec._rows_dot
    monkeypatch.setattr(matvec, "_rows_dot", lambda *a: calls.append(a[1].shape) or rows_dot(*a))
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48) if bias else None
    f = torch.compile(lambda x: F.linear(torch.tanh(x), w, b), backend=matvec.backend, dynamic=False)
    x = torch.randn(1, 32)
    torch.testing.assert_close(f(x), F.linear(torch.tanh(x), w, b), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([32, 48])]  # traced once, through the rewrite
    calls.clear()
    x4 = torch.randn(4, 32)
    torch.testing.assert_close(f(x4), F.linear(torch.tanh(x4), w, b), rtol=1e-5, atol=1e-5)
    assert calls == []  # four rows: aten's mm
