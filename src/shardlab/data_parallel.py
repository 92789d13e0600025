"""Data parallelism as plain functions: replicas, data shards and a gradient all-reduce.

Every rank holds a full replica of the model. One training step:

1. (once, before the first step) broadcast the parameters from rank 0, so replicas start equal;
2. each rank runs forward and backward on its own shard of the global batch;
3. the gradients are all-reduced and divided by the number of ranks (`allreduce_gradients`):
   every rank now holds the gradient of the mean loss over the *whole* batch;
4. each rank takes the same optimizer step on the same gradient, so the replicas stay
   bit-identical without ever exchanging parameters again.

With equal shards, step 3 gives exactly the full-batch gradient: the mean of the shards' mean
losses is the mean loss of the batch. So a data-parallel run equals a single device trained
on the whole batch (`train_reference`), up to floating-point summation order.

What it costs: one all-reduce of every gradient per step, 2(p-1)/p x (gradient bytes) sent
by each rank (`shardlab.cost.allreduce_bytes`), whatever the batch size. What it does not do:
shrink any rank's memory. Every rank keeps all the parameters, gradients and optimizer state.

`allreduce_gradients(..., bucket_bytes=...)` packs gradients into flat buckets so that a
step makes a few large all-reduces instead of one per tensor (each collective pays a fixed
latency); PyTorch's DistributedDataParallel does the same, overlapped with the backward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import comm
from .memory import ModelSpec, get_model

__all__ = [
    "shard_batch", "broadcast_parameters", "bucket_parameters", "allreduce_gradients",
    "dp_train_step", "parameter_digest", "parameter_checksum", "max_replica_difference",
    "gradient_bytes", "optimizer_state_bytes", "make_optimizer",
    "train_data_parallel", "train_reference", "DPStepEstimate", "dp_step_estimate",
]


# --------------------------------------------------------------------------- data shards

def shard_batch(batch, rank: int | None = None, world: int | None = None, dim: int = 0):
    """This rank's contiguous shard of a batch (a tensor or a tuple/list of tensors).

    Rank r of p gets rows [r*n/p, (r+1)*n/p) along `dim`; `n` must divide evenly, so that
    every shard's mean loss carries the same weight in the average.
    """
    if rank is None or world is None:
        from .runtime import rank as _rank, world_size as _world

        rank = _rank() if rank is None else rank
        world = _world() if world is None else world
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(t, rank, world, dim) for t in batch)
    n = batch.shape[dim]
    if n % world:
        raise ValueError(f"a batch of {n} does not split evenly over {world} ranks: use a global "
                         f"batch that is a multiple of {world}")
    return batch.chunk(world, dim=dim)[rank]


# --------------------------------------------------------------------------- replicas

@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer from rank `src` to all ranks (in place)."""
    for t in list(model.parameters()) + list(model.buffers()):
        comm.broadcast(t.data, src=src, group=group)


def bucket_parameters(params: Sequence[torch.Tensor], bucket_bytes: float | None) -> list[list]:
    """Group parameters into buckets of at most `bucket_bytes` (one tensor larger than that
    gets a bucket of its own); `None` means one bucket per parameter.

    Parameters are taken in reverse order, the order in which backward produces their
    gradients (as DistributedDataParallel does), and a bucket never mixes dtypes.
    """
    params = list(params)
    if bucket_bytes is None:
        return [[p] for p in reversed(params)]
    if not bucket_bytes > 0:
        raise ValueError(f"bucket_bytes must be positive (or None for one bucket per tensor), "
                         f"got {bucket_bytes!r}")
    buckets: list[list] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if buckets and size + nbytes <= bucket_bytes and buckets[-1][0].dtype == p.dtype:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


@torch.no_grad()
def allreduce_gradients(model: nn.Module | Sequence[nn.Parameter], group=None,
                        bucket_bytes: float | None = None, average: bool = True) -> int:
    """All-reduce every parameter's gradient over the group and divide by its size.

    Afterwards every rank holds the average of the ranks' gradients. A parameter without a
    gradient contributes zeros (every rank must call the same collectives). With
    `bucket_bytes`, gradients are packed into flat buffers of up to that size, one
    all-reduce per buffer. Returns the number of all-reduces issued.
    """
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model)
              if p.requires_grad]
    p_ranks = comm.group_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets = bucket_parameters(params, bucket_bytes)
    for bucket in buckets:
        if len(bucket) == 1:
            flat = bucket[0].grad
            comm.all_reduce(flat, group=group)
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            comm.all_reduce(flat, group=group)
        if average:
            flat.div_(p_ranks)
        if len(bucket) > 1:
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
    return len(buckets)


def dp_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, local_batch,
                  loss_fn: Callable, group=None, bucket_bytes: float | None = None) -> float:
    """One data-parallel step on this rank's shard: forward, backward, gradient all-reduce
    (averaging), optimizer step. Returns this rank's loss on its shard (before the step)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, local_batch)
    loss.backward()
    allreduce_gradients(model, group=group, bucket_bytes=bucket_bytes)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- inspection

def parameter_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's bytes: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def parameter_checksum(model: nn.Module) -> float:
    """Sum of all parameter values in float64: a number to print next to the digest."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def max_replica_difference(states: Sequence[dict]) -> float:
    """Largest |difference| between any replica's tensors and replica 0's (state dicts)."""
    first = states[0]
    worst = 0.0
    for other in states[1:]:
        for name, t in first.items():
            worst = max(worst, float((other[name].double() - t.double()).abs().max()))
    return worst


def gradient_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (Adam: momentum and variance)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def make_optimizer(params, name: str = "sgd", lr: float = 0.1) -> torch.optim.Optimizer:
    """'sgd' (plain SGD) or 'adam' (torch.optim.Adam), the two the course uses."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'adam'")


# --------------------------------------------------------------------------- runs

def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_data_parallel(model: str | ModelSpec = "tiny", steps: int = 2, *, global_batch: int = 8,
                        seq_len: int = 16, lr: float = 0.1, optimizer: str = "sgd",
                        seed: int = 0, bucket_bytes: float | None = None,
                        return_state: bool = True) -> dict:
    """Rank function: `steps` data-parallel steps of `TinyTransformer(model)`.

    Each rank initialises its replica with a *different* seed (`seed + rank`), so that the
    broadcast from rank 0 visibly matters. Step k uses `make_batch(seed * 1000 + k,
    global_batch, seq_len)`, of which this rank trains on its shard.

    Returns this rank's `losses` (its shard's loss at each step), `digest_before` /
    `digest` (of its parameters before the broadcast and after training), `checksum`,
    `memory` (parameter, gradient and optimizer-state bytes), `comm_broadcast` and
    `comm_step` (comm summaries of the initial broadcast and of the last step) and, with
    `return_state`, the final `state` dict.
    """
    from .models import TinyTransformer, lm_loss, make_batch, parameter_bytes
    from .runtime import device, device_name, rank, world_size

    spec = get_model(model)
    r, p = rank(), world_size()
    net = TinyTransformer.from_spec(spec, seed=seed + r, device=device())
    digest_before = parameter_digest(net)
    with comm.record() as log:
        broadcast_parameters(net)
    comm_broadcast = comm.summary(log)
    opt = make_optimizer(net.parameters(), optimizer, lr)
    losses = []
    for k in range(steps):
        batch = make_batch(seed * 1000 + k, global_batch, seq_len, spec.vocab)
        local = tuple(t.to(device()) for t in shard_batch(batch, r, p))
        with comm.record() as log:
            losses.append(dp_train_step(net, opt, local, lm_loss, bucket_bytes=bucket_bytes))
    out = {
        "rank": r, "device": device_name(), "world_size": p, "losses": losses,
        "digest_before": digest_before, "digest": parameter_digest(net),
        "checksum": parameter_checksum(net),
        "memory": {"parameters": parameter_bytes(net), "gradients": gradient_bytes(net),
                   "optimizer": optimizer_state_bytes(opt)},
        "comm_broadcast": comm_broadcast, "comm_step": comm.summary(log),
    }
    if return_state:
        out["state"] = _state(net)
    return out


def train_reference(model: str | ModelSpec = "tiny", steps: int = 2, *, global_batch: int = 8,
                    seq_len: int = 16, lr: float = 0.1, optimizer: str = "sgd",
                    seed: int = 0, device: str = "cpu") -> dict:
    """The single-device run that `train_data_parallel` must equal: rank 0's initial weights,
    the whole batch every step, the same optimizer. Returns `losses`, `digest`, `memory`
    (as `train_data_parallel`) and `state`."""
    from .models import TinyTransformer, lm_loss, make_batch, parameter_bytes

    spec = get_model(model)
    net = TinyTransformer.from_spec(spec, seed=seed, device=device)
    opt = make_optimizer(net.parameters(), optimizer, lr)
    losses = []
    for k in range(steps):
        batch = tuple(t.to(device) for t in make_batch(seed * 1000 + k, global_batch, seq_len,
                                                       spec.vocab))
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(net, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "digest": parameter_digest(net),
            "memory": {"parameters": parameter_bytes(net), "gradients": gradient_bytes(net),
                       "optimizer": optimizer_state_bytes(opt)},
            "state": _state(net)}


# --------------------------------------------------------------------------- scaling model

@dataclass(frozen=True)
class DPStepEstimate:
    """Time of one data-parallel training step on `dp` GPUs (alpha-beta and roofline models)."""

    dp: int
    compute_time: float  # s, forward + backward of one GPU's micro-batch
    allreduce_time: float  # s, the gradient all-reduce
    exposed_comm_time: float  # s, the part of it not hidden behind the backward pass
    tokens_per_step: int  # over all replicas

    @property
    def step_time(self) -> float:
        return self.compute_time + self.exposed_comm_time

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_time

    @property
    def scaling_efficiency(self) -> float:
        """Throughput relative to `dp` perfectly independent GPUs."""
        return self.compute_time / self.step_time


def dp_step_estimate(model: str | ModelSpec, gpu: str, dp: int, link: str, *,
                     micro_batch: int = 1, seq_len: int = 4096, mfu: float = 0.4,
                     grad_dtype: str = "bf16", overlap: float = 0.0) -> DPStepEstimate:
    """Estimate a data-parallel training step: compute is 3x the forward FLOPs (backward
    costs twice the forward) at `mfu` of the GPU's dense bf16 peak; communication is a ring
    all-reduce of the gradients (`grad_dtype`) over `dp` ranks on `link`, of which a
    fraction `overlap` hides behind the backward pass (DDP buckets start early)."""
    from .cost import allreduce_time, forward_flops
    from .hardware import get_gpu
    from .memory import dtype_bytes, parameter_count

    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be in [0, 1], got {overlap!r}")
    spec, g = get_model(model), get_gpu(gpu)
    flops = 3 * forward_flops(spec, batch=micro_batch, new_tokens=seq_len)
    compute = flops / (g.bf16_flops * mfu)
    comm_t = float(allreduce_time(parameter_count(spec) * dtype_bytes(grad_dtype), dp, link))
    hidden = min(overlap * comm_t, (2 / 3) * compute)  # backward is 2/3 of the compute
    return DPStepEstimate(dp, compute, comm_t, comm_t - hidden, dp * micro_batch * seq_len)
