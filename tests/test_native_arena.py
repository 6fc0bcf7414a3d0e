"""The decode plan's weights packed into one huge-page buffer (`llmctl/core/native/arena.py`):
the same values and Parameter objects, one copy, packed once, and a model that still trains."""

import pytest
import torch
from test_native_decode import build, decode_both, needs

from llmctl.core.native import arena
from llmctl.core.native.decode import _linears, native_step


def _streamed(model):
    """The float weights a step reads, in its order."""
    return [m.weight for layer in model.model.layers for _, m in _linears(layer)] + [model.lm_head.weight]


def test_pack_rebinds_every_slot_to_one_aligned_buffer_in_order():
    a, b = torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))
    holder = torch.nn.Module()
    values = [a.detach().clone(), b.detach().clone()]
    arena.pack(holder, [(a, "data"), (b, "data")])
    assert a.data_ptr() % arena.PAGE == 0 and b.data_ptr() == a.data_ptr() + 64  # 60 bytes, then a cache line
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert torch.equal(a, values[0]) and torch.equal(b, values[1]) and b.dtype == torch.bfloat16
    assert a.requires_grad and holder._llmctl_packed == [a.data_ptr(), b.data_ptr()]
    first = a.data_ptr()
    arena.pack(holder, [(a, "data"), (b, "data")])  # packed already: nothing moves
    assert a.data_ptr() == first
    a.data = a.data.clone()  # the weights changed: packed again
    arena.pack(holder, [(a, "data"), (b, "data")])
    assert a.data_ptr() % arena.PAGE == 0 and a.data_ptr() != first


def test_a_huge_buffer_is_page_aligned_and_advised(monkeypatch):
    calls = []
    monkeypatch.setattr(arena, "_madvise", lambda: lambda addr, size, advice: calls.append((addr.value, size.value,
                                                                                          advice)))
    buffer = arena.huge_buffer(3 << 20)
    assert buffer.numel() == 3 << 20 and buffer.data_ptr() % arena.PAGE == 0
    assert calls == [(buffer.data_ptr(), 4 << 20, arena.MADV_HUGEPAGE)]  # whole pages, inside the allocation
    assert buffer.untyped_storage().nbytes() >= (buffer.data_ptr() - buffer.untyped_storage().data_ptr()) + (4 << 20)
    monkeypatch.setattr(arena, "_madvise", lambda: None)  # no libc: a plain aligned buffer
    assert arena.huge_buffer(100).data_ptr() % arena.PAGE == 0


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_streams_the_models_own_weights_from_one_buffer(dtype):
    model = build({}, dtype)
    params = _streamed(model)
    before = [p.detach().clone() for p in params]
    eager, ours, *_ = decode_both(model)  # builds the plan: packs
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert [p.data_ptr() for p in params] == sorted(p.data_ptr() for p in params)  # reading order
    assert all(q is p for q, p in zip(_streamed(model), params))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=3e-2 * eager.abs().max().item())
    pointers = [p.data_ptr() for p in params]
    native_step(model)  # a second generation: no copy
    assert [p.data_ptr() for p in params] == pointers


@needs
def test_a_model_packed_under_inference_mode_still_trains():
    model = build({})
    with torch.inference_mode():
        native_step(model)
    model.train()
    loss = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@needs
def test_quantized_layouts_are_packed_too():
    model = build({}, bits=8)
    native_step(model)
    layouts = [kernel for m in model.modules() if hasattr(m, "kernels") for _, kernel in m.kernels.values()]
    assert len(layouts) == 14 and len({t.weight.untyped_storage().data_ptr() for t in layouts}) == 1
    assert model.lm_head.weight.untyped_storage().data_ptr() == layouts[0].weight.untyped_storage().data_ptr()
