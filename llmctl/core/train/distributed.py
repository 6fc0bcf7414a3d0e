"""Data parallelism under torchrun: DDP or FSDP2 (`fully_shard`), and rank helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything is a single process.
Multi-node: run the same command on every node with
`torchrun --nnodes=M --node_rank=I --nproc_per_node=N --rdzv_endpoint=HOST:PORT -m llmctl train …`
(OUTDIR must be on a filesystem every node sees, since all ranks read the resume checkpoint).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str, device: torch.device) -> Dist:
    """Join the torchrun process group if launched by torchrun; a single-process Dist otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def settle(d: Dist) -> None:
    """Wait for every rank, then free what still holds the process group (DDP's reducer sits in
    reference cycles) while gloo's worker threads are idle. Freed at interpreter exit instead,
    the group's destructor can wait on a worker that waits for the GIL: the process never exits."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        gc.collect()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, d: Dist, device: torch.device,
         param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model as trained: itself (single process), DDP, or FSDP2 sharded per block. Under
    FSDP a 16-bit `param_dtype` gathers and computes with 16-bit parameters and reduces
    gradients in float32 (FSDP2's `MixedPrecisionPolicy`); the sharded master weights and the
    optimizer stay float32."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mixed = param_dtype in (torch.bfloat16, torch.float16)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if mixed else None
        kwargs = {"mp_policy": policy} if policy else {}
        for block in shard_units(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the root: embeddings, final norm, head
        if callable(getattr(model, "head", None)):  # the head run apart from forward (chunked log-probs) gathers too
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, "head")
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every FSDP unit's parameters gathered inside the block (a no-op unsharded), so
    methods other than `forward` can run it, e.g. sampling; resharded on exit."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: every transformer block (multi-token heads too), so
    only one block's parameters are gathered at a time."""
    from llmctl.core.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model (DDP keeps it in `.module`; FSDP2 shards in place)."""
    return getattr(model, "module", model)


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP2)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = enabled


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum floats across ranks (identity in a single process)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor across ranks in place, without a host sync (identity in a single process)."""
    if d.enabled:
        dist.all_reduce(t)
    return t


def gather_tensors(tensors: dict[str, torch.Tensor], d: Dist, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's `tensors` on CPU, in rank order (the same keys and dimensions on every rank,
    shapes may differ); a collective (tensors padded to the largest shape for `all_gather`)."""
    if not d.enabled:
        return [{k: v.detach().cpu().clone() for k, v in tensors.items()}]  # own storage each (safetensors)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(d.world)]
    for key in sorted(tensors):
        t = tensors[key].detach().to(device)
        shape = torch.tensor(t.shape, dtype=torch.int64, device=device)
        shapes = [torch.empty_like(shape) for _ in range(d.world)]
        dist.all_gather(shapes, shape)
        padded = t.new_zeros(torch.stack(shapes).amax(0).tolist())
        padded[tuple(slice(0, n) for n in t.shape)] = t
        parts = [torch.empty_like(padded) for _ in range(d.world)]
        dist.all_gather(parts, padded)
        for rank, (part, size) in enumerate(zip(parts, shapes)):
            out[rank][key] = part[tuple(slice(0, n) for n in size.tolist())].cpu()
    return out


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True if `flag` is set on any rank (so every rank takes the same branch)."""
    return bool(all_reduce_sum([float(flag)], d, device)[0]) if d.enabled else flag


def fewest(count: int, d: Dist, device: torch.device) -> int:
    """The smallest `count` over the ranks (so every rank runs as many collective steps)."""
    if not d.enabled:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded, CPU, FQN-keyed (model, optimizer) state dicts; a collective under DDP/FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full FQN-keyed optimizer state dict (sharded as needed under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
