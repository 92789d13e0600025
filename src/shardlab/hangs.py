"""Planted bugs: rank functions that hang (or crash) because their ranks disagree.

Each is a small, realistic mistake from sharded training or inference code, written for two
ranks. Run one with a short timeout and read the diagnosis:

    >>> shardlab.launch(hangs.logged_on_rank_zero, 2, timeout=2)      # doctest: +SKIP
    RankTimeout: ranks [0, 1] did not finish within 2 s ...
      rank 0 waits in all_reduce #1 on world (4 B), after 0 completed; at ...
      rank 1 waits in broadcast #1 on world (16 B), after 0 completed; at ...
    Verdict: the ranks disagree on call #1 on world: ...

Some use `shardlab.comm`, some call `torch.distributed` directly: the runtime's diagnosis
sees both. `FIXED` maps each to a corrected version, which the tests run to prove that the
fix is the one the diagnosis points at.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm
from .runtime import device, rank

__all__ = [
    "logged_on_rank_zero", "gradients_then_parameters", "guessed_output_splits",
    "forgotten_recv", "group_on_some_ranks", "BUGS", "FIXED", "source",
]


def source(fn) -> str:
    """A rank function's code without its docstring, for notebooks to print."""
    import ast
    import inspect
    import textwrap

    code = textwrap.dedent(inspect.getsource(fn))
    lines = code.splitlines()
    body = ast.parse(code).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        del lines[body[0].lineno - 1:body[0].end_lineno]
    return "\n".join(lines)


def logged_on_rank_zero() -> float:
    """A collective inside `if rank == 0`: only rank 0 all-reduces the loss to log it.

    Rank 1 goes straight on to the broadcast, so rank 0's all-reduce and rank 1's broadcast
    meet as "collective #1": they wait for each other forever.
    """
    x = torch.ones(4, device=device())
    loss = x.sum().reshape(1)
    if rank() == 0:
        comm.all_reduce(loss)  # BUG: rank 0 alone calls it (only rank 0 logs)
    comm.broadcast(x, src=0)
    return float(x.sum())


def gradients_then_parameters() -> float:
    """Two ranks call the same collectives in different orders (raw torch.distributed).

    Rank 0 all-reduces its gradients and then all-gathers the updated parameter shards; rank 1,
    whose backward pass finished early, prefetches the parameters first.
    """
    grad = torch.ones(4, device=device())
    shard = torch.full((2,), float(rank()), device=device())
    params = [torch.empty(2, device=device()) for _ in range(dist.get_world_size())]
    if rank() == 0:
        dist.all_reduce(grad)
        dist.all_gather(params, shard)
    else:  # BUG: the same two calls, the other way round
        dist.all_gather(params, shard)
        dist.all_reduce(grad)
    return float(grad.sum() + sum(p.sum() for p in params))


def _routes() -> list[int]:
    """How many of this rank's 4 tokens go to the expert on rank 0 and on rank 1."""
    return [3, 1] if rank() == 0 else [2, 2]


def guessed_output_splits() -> list[float]:
    """All-to-all with split sizes that do not agree (an MoE dispatch).

    Each rank knows how many tokens it sends to each peer, and assumes it receives as many
    from each peer as it sends to it. Rank 0 sends 1 token to rank 1, which expects 2; rank 1
    sends 2 to rank 0, which expects 1. On gloo the rank that receives more bytes than it
    expected is killed by a C++ abort; on NCCL the ranks hang.
    """
    tokens = torch.arange(4.0, device=device()).reshape(4, 1) + 10 * rank()
    splits = _routes()
    out = comm.all_to_all(tokens, input_split_sizes=splits,
                          output_split_sizes=splits)  # BUG: guessed, not exchanged
    return out.flatten().tolist()


def forgotten_recv() -> float:
    """A send without its receive: pipeline stage 0 sends its activations, stage 1 never
    posts the matching `recv` and goes on to the loss all-reduce."""
    act = torch.full((4,), 1.0, device=device())
    loss = torch.zeros(1, device=device())
    if rank() == 0:
        dist.send(act, dst=1)
    else:
        # BUG: forgot `dist.recv(act, src=0)`; uses its own stale activations
        loss += act.sum()
    dist.all_reduce(loss)
    return float(loss.item())


def group_on_some_ranks() -> float:
    """A process group created by some ranks only.

    Rank 0 creates a group for itself alone (say, for its logging); rank 1 skips the call
    because it is not a member. But torch numbers groups by the order of `new_group` calls,
    so the two ranks' next group, the tensor-parallel pair, is group 2 on rank 0 and group 1
    on rank 1: they never meet.
    """
    if rank() == 0:
        comm.new_group([0], name="solo")  # BUG: every rank must call new_group
    tp = comm.new_group([0, 1], name="tp")
    x = torch.ones(4, device=device())
    comm.all_reduce(x, group=tp)
    return float(x.sum())


# --------------------------------------------------------------------------- the fixes

def _logged_fixed() -> float:
    x = torch.ones(4, device=device())
    loss = x.sum().reshape(1)
    comm.all_reduce(loss)  # every rank takes part; only rank 0 needs to print it
    comm.broadcast(x, src=0)
    return float(x.sum())


def _orders_fixed() -> float:
    grad = torch.ones(4, device=device())
    shard = torch.full((2,), float(rank()), device=device())
    params = [torch.empty(2, device=device()) for _ in range(dist.get_world_size())]
    dist.all_reduce(grad)  # one order on every rank
    dist.all_gather(params, shard)
    return float(grad.sum() + sum(p.sum() for p in params))


def _splits_fixed() -> list[float]:
    tokens = torch.arange(4.0, device=device()).reshape(4, 1) + 10 * rank()
    out = comm.all_to_all(tokens, input_split_sizes=_routes())  # counts exchanged first
    return out.flatten().tolist()


def _recv_fixed() -> float:
    act = torch.full((4,), 1.0, device=device())
    loss = torch.zeros(1, device=device())
    if rank() == 0:
        dist.send(act, dst=1)
    else:
        dist.recv(act, src=0)
        loss += act.sum()
    dist.all_reduce(loss)
    return float(loss.item())


def _groups_fixed() -> float:
    comm.new_group([0], name="solo")  # every rank calls it, members or not
    tp = comm.new_group([0, 1], name="tp")
    x = torch.ones(4, device=device())
    comm.all_reduce(x, group=tp)
    return float(x.sum())


BUGS = {
    "collective under if rank == 0": logged_on_rank_zero,
    "collectives in different orders": gradients_then_parameters,
    "all-to-all split sizes disagree": guessed_output_splits,
    "send without its receive": forgotten_recv,
    "group created by some ranks only": group_on_some_ranks,
}
FIXED = {
    logged_on_rank_zero: _logged_fixed,
    gradients_then_parameters: _orders_fixed,
    guessed_output_splits: _splits_fixed,
    forgotten_recv: _recv_fixed,
    group_on_some_ranks: _groups_fixed,
}
