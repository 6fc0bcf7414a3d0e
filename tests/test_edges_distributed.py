"""Round 10 edges: the rank helpers of `core/train/distributed.py` in a real two-process gloo
group (spawned here, no torchrun): joining the group, gathering tensors of different shapes per
rank, the reductions, wrapping for DDP and FSDP, and leaving the group."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from _ports import free_port

from llmctl.core.train import distributed as D

CPU = torch.device("cpu")


def _plain(value):
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "values": value.flatten().tolist()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _worker(rank: int, world: int, port: int, out: str, wrapping: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    if rank == 0:  # a launcher that sets no LOCAL_RANK: 0
        os.environ["LOCAL_RANK"] = "0"
    else:
        os.environ.pop("LOCAL_RANK", None)
    torch.set_num_threads(1)
    d = D.init("auto", CPU)
    again = D.init("gloo", CPU)  # already in the group: the same answer
    r = {"dist": [d.rank, d.world, d.local_rank, d.enabled, d.is_main], "again": [again.rank, again.world],
         "backend": torch.distributed.get_backend()}
    mine = {"b": torch.arange(rank + 2, dtype=torch.float32) + 10 * rank,
            "a": torch.full((2, rank + 1), float(rank + 1), dtype=torch.float64)}
    r["gather"] = D.gather_tensors(mine, d, CPU)
    r["any"] = [D.any_rank(rank == 1, d, CPU), D.any_rank(False, d, CPU)]
    r["fewest"] = D.fewest(5 - 2 * rank, d, CPU)
    r["sum"] = D.all_reduce_sum([1.0, float(rank), 0.5, 2.0 ** 24 + 1], d, CPU)  # float64: exact beyond 2**24
    t = torch.tensor([float(rank + 1), 2.0])
    r["sum_"] = D.all_reduce_sum_(t, d)
    if wrapping:
        _wrap(r, d, out)
    D.barrier(d)
    D.settle(d)
    D.shutdown(d)
    r["after"] = torch.distributed.is_initialized()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(_plain(r), f)


def _wrap(r: dict, d: D.Dist, out: str) -> None:
    model = torch.nn.Linear(3, 2)
    ddp = D.wrap(model, "ddp", d, CPU)
    r["ddp"] = [type(ddp).__name__, D.unwrap(ddp) is model, ddp.device_ids]
    D.set_grad_sync(ddp, False)
    r["ddp_sync"] = ddp.require_backward_grad_sync
    D.set_grad_sync(ddp, True)
    r["ddp_sync"] = [r["ddp_sync"], ddp.require_backward_grad_sync]
    r["root_bf16"] = _root_in_bf16(d)
    from llmctl.core.model.build import build_model
    from llmctl.core.model.config import ModelConfig

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        m = build_model(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8))
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            plain = m(ids).logits
        shapes = {name: list(p.shape) for name, p in m.named_parameters()}
        sharded = D.wrap(m, "fsdp", d, CPU, dtype)
        with torch.no_grad():
            hidden = torch.randn(1, 2, 16, dtype=dtype)
            head = m.head(hidden)  # before any forward, outside it: gathers its shard too
            logits = sharded(ids).logits
        local = {name: list(p.to_local().shape) for name, p in m.named_parameters() if ".layers." in name}
        with D.gathered(m) as whole:
            inside = {name: list(p.shape) for name, p in whole.named_parameters()}
        r[f"fsdp_{dtype}"] = [sharded is m, str(logits.dtype), float((logits.float() - plain).abs().max()),
                              all(local[n] != shapes[n] for n in local) and len(local) > 4, inside == shapes,
                              list(head.shape)]
        if dtype == torch.float32:
            r["state_dicts"] = _state_dicts(m, d, out)


def _root_in_bf16(d: D.Dist) -> list:
    """A model with no blocks (the root unit alone) under a bf16 FSDP: its weight 1 + 2**-10 computes
    as 1 (bf16), and the ranks' gradients 1 and 2**-8 average to 0.501953125 only if reduced in
    float32 (in bf16 their sum rounds to 1, to even)."""
    lin = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1 + 2 ** -10)
    D.wrap(lin, "fsdp", d, CPU, torch.bfloat16)
    x = torch.full((1, 2), 1.0 if d.rank == 0 else 2 ** -8)
    y = lin(x)
    y.float().sum().backward()
    return [str(y.dtype), y.float().tolist(), lin.weight.grad.full_tensor().unique().tolist()]


def _state_dicts(m, d: D.Dist, out: str) -> dict:
    """One AdamW step on the FSDP model against the same step on an unsharded copy in this process:
    the full state dicts (made on rank 0 only), then the optimizer state, saved by rank 0 and read by
    every rank as a resume does, loaded into a new optimizer."""
    from llmctl.core.model.build import build_model
    from llmctl.core.model.config import ModelConfig

    torch.manual_seed(0)  # the weights `m` was built with
    ref = build_model(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8))
    ids = torch.tensor([[1, 2, 3, 4]])
    opts = [torch.optim.AdamW(model.parameters(), lr=0.1) for model in (m, ref)]
    for model, opt in zip((m, ref), opts):
        model(ids).logits.square().mean().backward()  # the same batch on both ranks: the mean gradient is this one
        opt.step()
    want, ref_state = dict(ref.named_parameters()), opts[1].state

    def check(model_state: dict, optim_state: dict) -> dict:
        moments = {n: optim_state["state"][n]["exp_avg"] for n in want}
        return {"keys": sorted(model_state) == sorted(ref.state_dict()),
                "plain": all(type(v) is torch.Tensor and v.device == CPU
                             for v in [*model_state.values(), *moments.values()]),
                "weights": max(float((model_state[n] - p).abs().max()) for n, p in want.items()),
                "moments": max(float((moments[n] - ref_state[p]["exp_avg"]).abs().max()) for n, p in want.items()),
                "lr": [g["lr"] for g in optim_state["param_groups"]]}

    msd, osd = D.full_state_dicts(m, opts[0])
    r = {"first": check(msd, osd) if d.is_main else [msd, osd]}
    if d.is_main:
        torch.save(osd, os.path.join(out, "optim.pt"))
    D.barrier(d)
    m.zero_grad(set_to_none=True)  # as at a resume: torch builds the new optimizer's state with zero gradients
    fresh = torch.optim.AdamW(m.parameters(), lr=0.5)
    D.load_optimizer_state(m, fresh, torch.load(os.path.join(out, "optim.pt"), weights_only=True))
    msd, again = D.full_state_dicts(m, fresh)
    if d.is_main:
        r["again"] = check(msd, again)
        r["again"]["equal"] = all(torch.equal(again["state"][n][k], osd["state"][n][k])
                                  for n in want for k in ("exp_avg", "exp_avg_sq", "step"))
    ref.zero_grad(set_to_none=True)
    for model, opt in zip((m, ref), (fresh, opts[1])):  # one more step each: the loaded state is the one used
        model(ids).logits.square().mean().backward()
        opt.step()
    msd, _ = D.full_state_dicts(m, fresh)
    if d.is_main:
        r["second"] = max(float((msd[n] - p).abs().max()) for n, p in want.items())
    return r


def _spawn(tmp_path, wrapping: bool) -> tuple[dict, dict]:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), wrapping), nprocs=2, join=True)
    return tuple(json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))


def test_rank_helpers_in_a_two_process_gloo_group(tmp_path):
    r0, r1 = _spawn(tmp_path, wrapping=False)
    assert (r0["dist"], r1["dist"]) == ([0, 2, 0, True, True], [1, 2, 0, True, False])
    assert r0["again"] == [0, 2] and r0["backend"] == "gloo"  # auto on CPU
    a = [{"dtype": "torch.float64", "shape": [2, n], "values": [float(n)] * (2 * n)} for n in (1, 2)]
    b = [{"dtype": "torch.float32", "shape": [2], "values": [0.0, 1.0]},
         {"dtype": "torch.float32", "shape": [3], "values": [10.0, 11.0, 12.0]}]
    expected = [{"a": a[0], "b": b[0]}, {"a": a[1], "b": b[1]}]  # each rank's own shapes, in rank order
    assert r0["gather"] == r1["gather"] == expected
    assert r0["any"] == r1["any"] == [True, False]
    assert r0["fewest"] == r1["fewest"] == 3
    assert r0["sum"] == r1["sum"] == [2.0, 1.0, 1.0, 2.0 ** 25 + 2]
    assert r0["sum_"]["values"] == r1["sum_"]["values"] == [3.0, 4.0]
    assert r0["after"] is False and r1["after"] is False


def test_wrapping_for_ddp_and_fsdp_in_a_two_process_gloo_group(tmp_path):
    r0, r1 = _spawn(tmp_path, wrapping=True)
    assert r0["ddp"] == ["DistributedDataParallel", True, None]  # CPU: no device ids
    assert r0["ddp_sync"] == [False, True]
    assert r0["after"] is False and r1["after"] is False
    same, dtype, err, sharded, whole, head = r0["fsdp_torch.float32"]
    assert same and dtype == "torch.float32" and err < 1e-5 and sharded and whole and head == [1, 2, 32]
    same, dtype, err, sharded, whole, head = r1["fsdp_torch.bfloat16"]  # computed in 16 bits (logits upcast)
    assert same and dtype == "torch.float32" and 1e-5 < err < 0.1 and sharded and whole and head == [1, 2, 32]
    dtype, out, grad = r0["root_bf16"]
    assert dtype == "torch.bfloat16" and out == [[2.0, 2.0]] and grad == [0.501953125]
    s = r0["state_dicts"]  # full, on CPU, FQN-keyed, equal to one process's AdamW step; then the same after a reload
    for check in (s["first"], s["again"]):
        assert check["keys"] and check["plain"] and check["weights"] < 1e-6 and check["moments"] < 1e-6
    assert s["first"]["lr"] == s["again"]["lr"] == [0.1] and s["again"]["equal"] and s["second"] < 1e-6
    assert r1["state_dicts"] == {"first": [{}, {}]}  # a collective, but the copies are made on rank 0 only


def test_a_single_process_is_its_own_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = D.init("nccl", CPU)
    assert (d.rank, d.world, d.local_rank, d.enabled, d.is_main) == (0, 1, 0, False, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init("gloo", CPU) == D.Dist()
    assert not D.torch.distributed.is_initialized()
    assert (D.Dist(rank=1, world=2).is_main, D.Dist(world=2).enabled) == (False, True)
    model = torch.nn.Linear(2, 2)
    assert D.wrap(model, "fsdp", d, CPU) is model and D.unwrap(model) is model
    mine = {"x": torch.ones(2)}
    [gathered] = D.gather_tensors(mine, d, CPU)
    assert torch.equal(gathered["x"], mine["x"]) and gathered["x"].data_ptr() != mine["x"].data_ptr()  # a copy
    assert (D.any_rank(True, d, CPU), D.any_rank(False, d, CPU), D.fewest(4, d, CPU)) == (True, False, 4)
    assert D.all_reduce_sum([1.5], d, CPU) == [1.5]
    t = torch.tensor([2.5])
    assert D.all_reduce_sum_(t, d) is t and t.item() == 2.5
    D.barrier(d), D.settle(d), D.shutdown(d)  # nothing to wait for or leave


def test_grad_sync_switch_on_fsdp_style_and_plain_modules():
    calls = []

    class FSDPLike(torch.nn.Module):
        def set_requires_gradient_sync(self, enabled):
            calls.append(enabled)

    D.set_grad_sync(FSDPLike(), False)
    assert calls == [False]
    plain = torch.nn.Linear(2, 2)
    D.set_grad_sync(plain, False)  # neither DDP nor FSDP: nothing to switch
    assert not hasattr(plain, "require_backward_grad_sync")


def test_shard_units_are_the_transformer_blocks():
    from llmctl.core.model.build import build_model
    from llmctl.core.model.config import ModelConfig
    from llmctl.core.model.transformer import Block

    model = build_model(ModelConfig(vocab_size=32, hidden_size=16, num_layers=3, num_heads=2, max_seq_len=8))
    units = D.shard_units(model)
    assert len(units) == 3 and all(isinstance(u, Block) for u in units)
    assert units == list(model.model.layers)


def test_a_group_of_one_is_left_to_whoever_made_it(tmp_path):
    """A single-process Dist neither waits on nor destroys a process group the caller set up
    (the one-process FSDP checks do that)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        D.settle(D.Dist())
        D.shutdown(D.Dist())
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
