"""Collectives that keep a log of what moved, and the conjugate autograd pairs built on them.

Every collective here is a thin call into `torch.distributed` that also appends a
`CommRecord` (operation, group, payload bytes, bytes this rank sends) to the rank's log,
so that a notebook can show exactly what a layer communicated:

    with comm.record() as log:
        y = layer(x)
    comm.summary(log)          # {"all_reduce": {"calls": 1, "bytes": ...}}

The second half defines the operators of Megatron-LM's tensor parallelism as autograd
functions whose backward is the conjugate of the forward (Shoeybi et al. 2019, section 3):

    forward             backward            name here
    identity            all-reduce          copy_to_parallel_region      ("f")
    all-reduce          identity            reduce_from_parallel_region  ("g")
    split (keep mine)   all-gather          scatter_to_parallel_region
    all-gather          split               gather_from_parallel_region
    reduce-scatter      all-gather          reduce_scatter_to_sequence_region
    all-gather          reduce-scatter      gather_from_sequence_region
    all-to-all          inverse all-to-all  all_to_all
"""

from __future__ import annotations

import contextlib
import math
import dataclasses
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from . import cost

__all__ = [
    "CommRecord", "record", "summary", "in_flight", "completed_count", "reset_counters",
    "new_group", "group_name", "group_size", "group_rank",
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "exchange_counts",
    "broadcast", "send", "recv", "isend", "irecv", "barrier",
    "copy_to_parallel_region", "reduce_from_parallel_region", "scatter_to_parallel_region",
    "gather_from_parallel_region", "reduce_scatter_to_sequence_region",
    "gather_from_sequence_region", "all_to_all_autograd",
]

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names
# now emit a FutureWarning from every rank); torch 2.11-2.12 only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT}


# --------------------------------------------------------------------------- the log

@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective as this rank saw it."""

    index: int  # sequence number of the call on this rank, from 1
    op: str  # "all_reduce", "all_gather", ...
    group: str  # "world", or the name given to new_group
    group_size: int
    nbytes: int  # payload: the full logical tensor the collective acts on
    sent_bytes: int  # what this rank puts on the wire (ring algorithms, see shardlab.cost)
    shape: tuple
    dtype: str

    def __str__(self) -> str:
        return (f"#{self.index} {self.op} on {self.group} (p={self.group_size}): "
                f"{_fmt_bytes(self.nbytes)} payload, {_fmt_bytes(self.sent_bytes)} sent")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_recorders: list[list[CommRecord]] = []
# While a collective runs: (op, group, nbytes, sent, tensor, p, index). A plain tuple, turned
# into a CommRecord only when someone asks (a recorder, a hang diagnosis): building the record
# on every call (group name, dtype string, byte model) costs microseconds, which at small
# sizes is a visible share of the collective itself (benchmarks/collectives.py measures it).
_in_flight: tuple | None = None
_completed = 0
_group_names: dict[int, str] = {}


@contextlib.contextmanager
def record() -> Iterator[list[CommRecord]]:
    """Collect every collective this rank calls inside the block (nesting is fine)."""
    log: list[CommRecord] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def summary(log: Sequence[CommRecord]) -> dict[str, dict[str, int]]:
    """Calls, payload bytes and sent bytes per operation, in first-seen order."""
    out: dict[str, dict[str, int]] = OrderedDict()
    for rec in log:
        s = out.setdefault(rec.op, {"calls": 0, "bytes": 0, "sent_bytes": 0})
        s["calls"] += 1
        s["bytes"] += rec.nbytes
        s["sent_bytes"] += rec.sent_bytes
    return dict(out)


def _make_record(pending: tuple) -> CommRecord:
    op, group, nbytes, sent, t, p, index = pending
    if p is None:  # point-to-point calls skip the group-size lookup
        p = group_size(group)
    if isinstance(sent, str):  # a collective's name: the ring byte model of shardlab.cost
        sent = cost.bytes_sent(sent, nbytes, p)
    return CommRecord(index, op, group_name(group), p, int(nbytes), int(round(sent)),
                      tuple(t.shape), str(t.dtype).replace("torch.", ""))


def in_flight_record() -> CommRecord | None:
    """The collective this rank is inside right now, as a CommRecord (or None)."""
    return _make_record(_in_flight) if _in_flight is not None else None


def in_flight() -> dict | None:
    """The collective this rank is inside right now (used to diagnose hangs)."""
    rec = in_flight_record()
    return dataclasses.asdict(rec) if rec is not None else None


def completed_count() -> int:
    return _completed


def reset_counters() -> None:
    global _completed, _in_flight
    _completed, _in_flight = 0, None


def _begin(op: str, group, nbytes: int, sent, t: torch.Tensor, p: int | None) -> None:
    """Mark a collective as in flight. `sent` is bytes, or a collective name for cost's model.

    No try/finally around the call: a collective that raises stays "in flight", which is
    what a diagnosis of the failure wants to see; the next call overwrites it.
    """
    global _in_flight
    _in_flight = (op, group, nbytes, sent, t, p, _completed + 1)


def _end() -> None:
    global _in_flight, _completed
    pending, _in_flight = _in_flight, None
    _completed += 1
    if _recorders:
        rec = _make_record(pending)
        for log in _recorders:
            log.append(rec)


# --------------------------------------------------------------------------- groups

def new_group(ranks: Sequence[int], name: str):
    """`dist.new_group` that remembers a name for the log. Every rank must call it."""
    group = dist.new_group(list(ranks))
    if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
        _group_names[id(group)] = name
    return group


def group_name(group=None) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return _group_names.get(id(group), f"group{list(dist.get_process_group_ranks(group))}")


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


# --------------------------------------------------------------------------- collectives

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _op(op: str):
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduce op {op!r}: use one of {sorted(_OPS)}") from None


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `x` over the group, in place; every rank ends with the result. Returns `x`."""
    p = dist.get_world_size(group)
    _begin("all_reduce", group, x.numel() * x.element_size(), "allreduce", x, p)
    if p > 1:
        dist.all_reduce(x, op=_op(op), group=group)
    _end()
    return x


def _output(out: torch.Tensor | None, shape: tuple, like: torch.Tensor, op: str) -> torch.Tensor:
    """The caller's preallocated `out` (checked), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {like.dtype} tensor of shape "
                         f"{tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    return out


def all_gather(x: torch.Tensor, dim: int = 0, group=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order.

    Returns a new tensor, or fills `out` (dim 0 only: a reused buffer saves an allocation
    per call, as in a training loop that gathers the same shapes every step).
    """
    p = dist.get_world_size(group)
    if out is not None and dim != 0:
        raise ValueError("all_gather: out= works along dim 0; gather into a new tensor for other dims")
    x0 = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
    res = _output(out, (p * x0.shape[0], *x0.shape[1:]), x, "all_gather")
    _begin("all_gather", group, _nbytes(x) * p, "allgather", x, p)
    if p == 1:
        res.copy_(x0)
    else:
        _all_gather_single(res, x0, group=group)
    _end()
    return res.movedim(0, dim) if dim else res


def reduce_scatter(x: torch.Tensor, dim: int = 0, op: str = "sum", group=None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce `x` over the group and give rank r the r-th of p equal slices along `dim`.

    Returns a new tensor, or fills `out` (dim 0 only).
    """
    p = dist.get_world_size(group)
    if x.shape[dim] % p:
        raise ValueError(f"reduce_scatter: dim {dim} has size {x.shape[dim]}, not divisible by "
                         f"the group size {p}; pad it or choose another dim")
    if out is not None and dim != 0:
        raise ValueError("reduce_scatter: out= works along dim 0; use a new tensor for other dims")
    x0 = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
    res = _output(out, (x0.shape[0] // p, *x0.shape[1:]), x, "reduce_scatter")
    _begin("reduce_scatter", group, _nbytes(x), "reduce_scatter", x, p)
    if p == 1:
        res.copy_(x0)
    else:
        _reduce_scatter_single(res, x0, op=_op(op), group=group)
    _end()
    return res.movedim(0, dim) if dim else res


def exchange_counts(input_split_sizes: Sequence[int], group=None) -> list[int]:
    """The count exchange that precedes an uneven all-to-all: how many rows each peer sends me."""
    p = group_size(group)
    if len(input_split_sizes) != p:
        raise ValueError(f"need one split size per rank ({p}), got {len(input_split_sizes)}")
    dev = _device_for(group)
    send_counts = torch.tensor(list(input_split_sizes), dtype=torch.int64, device=dev)
    recv_counts = torch.empty_like(send_counts)
    _begin("all_to_all", group, _nbytes(send_counts), "alltoall", send_counts, p)
    if p == 1:
        recv_counts.copy_(send_counts)
    else:
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    _end()
    return [int(c) for c in recv_counts.tolist()]


def all_to_all(x: torch.Tensor, input_split_sizes: Sequence[int] | None = None,
               output_split_sizes: Sequence[int] | None = None, group=None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Send rows of `x` (dim 0) to every rank: `input_split_sizes[j]` rows go to rank j.

    With equal splits, pass neither size list: every rank then sends and receives
    x.shape[0] / p rows per peer (all ranks' x must have the same shape), with no count
    exchange. With uneven splits and unknown output sizes, the counts are exchanged first
    (a small all-to-all of its own, logged too). `out` is an optional preallocated result.
    """
    p = dist.get_world_size(group)
    rows = x.shape[0]
    if input_split_sizes is None:
        if rows % p:
            raise ValueError(f"all_to_all: {rows} rows do not split evenly over {p} ranks; "
                             "pass input_split_sizes")
        if output_split_sizes is None:  # the common case, kept short: NCCL's equal-split path
            res = _output(out, tuple(x.shape), x, "all_to_all")
            _begin("all_to_all", group, _nbytes(x), "alltoall", x, p)
            if p == 1:
                res.copy_(x)
            else:
                dist.all_to_all_single(res, x.contiguous(), group=group)
            _end()
            return res
        input_split_sizes = [rows // p] * p
    input_split_sizes = [int(s) for s in input_split_sizes]
    if len(input_split_sizes) != p or sum(input_split_sizes) != rows or min(input_split_sizes) < 0:
        raise ValueError(f"input_split_sizes {input_split_sizes} must have {p} non-negative "
                         f"entries summing to the {rows} rows of x")
    if output_split_sizes is None:
        output_split_sizes = exchange_counts(input_split_sizes, group)
    output_split_sizes = [int(s) for s in output_split_sizes]
    row = math.prod(x.shape[1:]) * x.element_size()
    me = group_rank(group)
    res = _output(out, (sum(output_split_sizes), *x.shape[1:]), x, "all_to_all")
    _begin("all_to_all", group, _nbytes(x), (rows - input_split_sizes[me]) * row, x, p)
    if p == 1:
        res.copy_(x)
    elif (output_split_sizes == input_split_sizes
          and input_split_sizes.count(input_split_sizes[0]) == p):
        dist.all_to_all_single(res, x.contiguous(), group=group)  # NCCL's equal-split path
    else:
        dist.all_to_all_single(res, x.contiguous(), output_split_sizes, input_split_sizes,
                               group=group)
    _end()
    return res


def broadcast(x: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Copy `x` from global rank `src` to every rank of the group, in place."""
    p = group_size(group)
    _begin("broadcast", group, _nbytes(x), _nbytes(x) if dist.get_rank() == src else 0, x, p)
    if p > 1:
        dist.broadcast(x, src=src, group=group)
    _end()
    return x


def send(x: torch.Tensor, dst: int, group=None) -> None:
    """Blocking point-to-point send to global rank `dst`."""
    _begin("send", group, _nbytes(x), "p2p", x, None)
    dist.send(x.contiguous(), dst=dst, group=group)
    _end()


def recv(x: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Blocking receive from global rank `src` into `x`; returns `x`."""
    _begin("recv", group, _nbytes(x), 0, x, None)
    dist.recv(x, src=src, group=group)
    _end()
    return x


def isend(x: torch.Tensor, dst: int, group=None):
    """Non-blocking send; returns the work handle (call `.wait()`)."""
    _begin("isend", group, _nbytes(x), "p2p", x, None)
    work = dist.isend(x.contiguous(), dst=dst, group=group)
    _end()
    return work


def irecv(x: torch.Tensor, src: int, group=None):
    """Non-blocking receive into `x`; returns the work handle."""
    _begin("irecv", group, _nbytes(x), 0, x, None)
    work = dist.irecv(x, src=src, group=group)
    _end()
    return work


def barrier(group=None) -> None:
    t = torch.zeros(1, device=_device_for(group))
    p = group_size(group)
    _begin("barrier", group, 0, 0, t, p)
    if p > 1:
        dist.all_reduce(t, group=group)  # a barrier that also works on NCCL without device_ids
    _end()


def _device_for(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- conjugate pairs

def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p, r = group_size(group), group_rank(group)
    if x.shape[dim] % p:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {p} ranks: "
                         "choose a degree that divides it")
    return x.chunk(p, dim=dim)[r].contiguous()


class _CopyToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), group=ctx.group), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad.contiguous(), dim=ctx.dim, group=ctx.group), None, None


class _GatherFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x.contiguous(), dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad.contiguous(), dim=ctx.dim, group=ctx.group), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x.contiguous(), dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad.contiguous(), dim=ctx.dim, group=ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, input_splits, output_splits, group):
        ctx.group, ctx.input_splits, ctx.output_splits = group, input_splits, output_splits
        return all_to_all(x, input_splits, output_splits, group=group)

    @staticmethod
    def backward(ctx, grad):
        # The inverse all-to-all: what came from rank j goes back to rank j.
        back = all_to_all(grad.contiguous(), ctx.output_splits, ctx.input_splits, group=ctx.group)
        return back, None, None, None


def copy_to_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """The "f" operator: identity forward, all-reduce of the gradient backward.

    Placed where a replicated input enters a column-parallel layer: each rank's
    gradient w.r.t. the input is partial, and their sum is the true gradient.
    """
    return _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """The "g" operator: all-reduce forward, identity backward (after a row-parallel layer)."""
    return _ReduceFromParallelRegion.apply(x, group)


def scatter_to_parallel_region(x: torch.Tensor, group=None, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice of `dim` forward; all-gather the gradient backward."""
    return _ScatterToParallelRegion.apply(x, group, dim)


def gather_from_parallel_region(x: torch.Tensor, group=None, dim: int = -1) -> torch.Tensor:
    """All-gather the slices along `dim` forward; keep this rank's slice of the gradient backward."""
    return _GatherFromParallelRegion.apply(x, group, dim)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Sequence parallelism's exit from a TP block: reduce-scatter forward, all-gather backward."""
    return _ReduceScatterToSequenceRegion.apply(x, group, dim)


def gather_from_sequence_region(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Sequence parallelism's entry to a TP block: all-gather forward, reduce-scatter backward."""
    return _GatherFromSequenceRegion.apply(x, group, dim)


def all_to_all_autograd(x: torch.Tensor, input_split_sizes: Sequence[int],
                        output_split_sizes: Sequence[int], group=None) -> torch.Tensor:
    """Expert parallelism's dispatch: all-to-all forward, the inverse all-to-all backward."""
    return _AllToAll.apply(x, list(input_split_sizes), list(output_split_sizes), group)
