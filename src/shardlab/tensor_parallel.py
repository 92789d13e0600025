"""Tensor parallelism: column- and row-parallel linear layers, and the blocks built from them.

A linear layer ``Y = X W^T`` (``W`` stored as PyTorch does, ``out x in``) splits two ways
over the ``p`` ranks of a tensor-parallel *group* (Shoeybi et al. 2019, "Megatron-LM"):

* **column-parallel**: rank r keeps rows r of p of ``W`` (a slice of the *output* features).
  The input is replicated, the output is sharded, and the forward pass needs no
  communication. The input enters through ``f`` (identity forward, all-reduce backward),
  because each rank's input gradient is only its shard's contribution.
* **row-parallel**: rank r keeps columns r of p of ``W`` (a slice of the *input* features).
  The input is sharded, each rank computes a partial sum of the full output, and ``g``
  (all-reduce forward, identity backward) adds them. The bias is added once, after it.

Column then row needs no communication in between: the column layer's sharded output is
exactly the row layer's sharded input. So an MLP block or an attention block (heads split
over ranks) costs one all-reduce forward (``g``) and one backward (``f``).

The reference modules (`MLP`, `SwiGLUMLP`, `Attention`, `TransformerBlock`) are plain
single-device PyTorch; every parallel block is built with ``from_reference(module, group)``,
so every rank slices the same weights and the result can be compared with the reference.
Shapes: ``x_BSH`` is (batch, sequence, hidden).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import comm

__all__ = [
    "divisors", "HeadLayout", "head_layout", "column_shard", "row_shard", "tp_group",
    "MLP", "SwiGLUMLP", "Attention", "RMSNorm", "TransformerBlock", "causal_attention",
    "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelSwiGLUMLP",
    "ParallelAttention", "ParallelTransformerBlock", "from_reference",
]


# --------------------------------------------------------------------------- plain arithmetic

def divisors(n: int) -> list[int]:
    """The degrees that split ``n`` evenly: 1, ..., n."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(n: int) -> str:
    ds = divisors(n)
    return ", ".join(map(str, ds[:4])) + (", ..." if len(ds) > 4 else "")


def _check_divides(tp: int, n: int, what: str) -> None:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"the tensor-parallel degree must be a positive int, got {tp!r}")
    if n % tp:
        raise ValueError(f"tp={tp} does not divide {n} {what}: choose a tp that divides it "
                         f"({_choices(n)})")


def column_shard(weight: torch.Tensor, degree: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a column-parallel weight (``out x in``): rows r of p.

    A bias (1-D) is sliced the same way. Raises if ``degree`` does not divide the rows.
    """
    _check_divides(degree, weight.shape[0], "output features")
    n = weight.shape[0] // degree
    return weight[rank * n:(rank + 1) * n]


def row_shard(weight: torch.Tensor, degree: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a row-parallel weight (``out x in``): columns r of p."""
    _check_divides(degree, weight.shape[1], "input features")
    n = weight.shape[1] // degree
    return weight[:, rank * n:(rank + 1) * n]


@dataclass(frozen=True)
class HeadLayout:
    """Which attention heads each of ``tp`` ranks holds (grouped-query attention aware).

    Query heads split evenly: rank r holds heads ``[r * q, (r + 1) * q)`` with ``q = heads / tp``.
    KV heads split evenly while ``tp <= kv_heads``; beyond that each KV head is replicated on
    ``kv_replicas`` adjacent ranks, so that every rank has the one KV head its query heads use.
    """

    tp: int
    heads: int
    kv_heads: int
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_replicas: int  # ranks holding a copy of each KV head (1: no replication)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (heads / kv_heads)."""
        return self.heads // self.kv_heads

    def query_heads(self, rank: int) -> range:
        return range(rank * self.heads_per_rank, (rank + 1) * self.heads_per_rank)

    def kv_heads_of(self, rank: int) -> range:
        first = self.query_heads(rank).start // self.group_size
        return range(first, first + self.kv_heads_per_rank)


def head_layout(heads: int, kv_heads: int, tp: int) -> HeadLayout:
    """Split ``heads`` query heads and ``kv_heads`` KV heads over ``tp`` ranks, or say why not.

    >>> head_layout(64, 8, 16).kv_replicas   # Llama-3-70B at TP=16: each KV head on 2 ranks
    2
    """
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    _check_divides(tp, heads, "heads")
    if tp <= kv_heads:
        if kv_heads % tp:
            raise ValueError(f"tp={tp} does not divide {kv_heads} KV heads: choose a tp that "
                             f"divides it ({_choices(kv_heads)}) or a multiple of {kv_heads} "
                             f"that divides {heads} heads")
        return HeadLayout(tp, heads, kv_heads, heads // tp, kv_heads // tp, 1)
    if tp % kv_heads:
        raise ValueError(f"tp={tp} exceeds the {kv_heads} KV heads but is not a multiple of "
                         f"them: a rank's query heads would need two KV heads; choose a tp "
                         f"among {[d for d in divisors(heads) if d % kv_heads == 0]}")
    return HeadLayout(tp, heads, kv_heads, heads // tp, 1, tp // kv_heads)


# --------------------------------------------------------------------------- groups

_TP_GROUPS: dict[tuple[int, int], object] = {}


def tp_group(degree: int | None = None):
    """This rank's tensor-parallel group: ``degree`` adjacent ranks (0..d-1, d..2d-1, ...).

    Every rank must call it (creating groups is collective); the groups are made once per
    process and cached, so calling it again in a later ``cluster.run`` is free.
    ``degree=None`` means the whole world.
    """
    if not dist.is_initialized():
        raise RuntimeError("tp_group() needs a process group: call it inside a rank function "
                           "(shardlab.launch / Cluster.run)")
    world = dist.get_world_size()
    degree = world if degree is None else degree
    if not isinstance(degree, int) or degree < 1 or world % degree:
        raise ValueError(f"tp degree {degree!r} must divide the world size {world}: choose one "
                         f"of {divisors(world)}")
    key = (world, degree)
    if key not in _TP_GROUPS:
        mine = None
        for start in range(0, world, degree):
            ranks = list(range(start, start + degree))
            g = comm.new_group(ranks, name=f"tp{degree}" if degree < world else "tp")
            if dist.get_rank() in ranks:
                mine = g
        _TP_GROUPS[key] = mine
    return _TP_GROUPS[key]


def _degree_and_rank(group) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("a tensor-parallel layer needs a process group: build it inside a "
                           "rank function (shardlab.launch / Cluster.run)")
    return comm.group_size(group), comm.group_rank(group)


# --------------------------------------------------------------------------- reference modules

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with a causal mask over (batch, heads, seq, head_dim) tensors.

    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention): query head h
    uses KV head ``h // (q_heads / kv_heads)``. Written out (no fused kernel) so that the
    sharded and the reference model run the very same arithmetic per head.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class MLP(nn.Module):
    """GPT-style MLP: ``fc2(gelu(fc1(x)))`` (two matrices, with biases)."""

    def __init__(self, hidden: int, ffn: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BSH)))


class SwiGLUMLP(nn.Module):
    """Llama-style MLP: ``down(silu(gate(x)) * up(x))`` (three matrices, no biases)."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=bias)
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.down = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x_BSH)) * self.up(x_BSH))


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query attention (``kv_heads <= heads``).

    The forward pass infers the number of heads from the projections' output widths, so the
    same code runs on a rank's shard of the weights (PyTorch's own TP relies on that too).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None, bias: bool = False):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def _heads(self, t_BSX: torch.Tensor) -> torch.Tensor:
        b, s, _ = t_BSX.shape
        return t_BSX.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, heads, S, head_dim)

    def attend(self, x_BSH: torch.Tensor) -> torch.Tensor:
        """Everything before the output projection: (B, S, local heads x head_dim)."""
        q, k, v = self._heads(self.q(x_BSH)), self._heads(self.k(x_BSH)), self._heads(self.v(x_BSH))
        out = causal_attention(q, k, v)
        b, _, s, _ = out.shape
        return out.transpose(1, 2).reshape(b, s, -1)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.o(self.attend(x_BSH))


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TransformerBlock(nn.Module):
    """A pre-norm decoder layer: ``x + attn(norm(x))``, then ``+ mlp(norm(.))`` (SwiGLU)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads)
        self.mlp = SwiGLUMLP(hidden, ffn)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        h = x_BSH + self.attn(self.attn_norm(x_BSH))
        return h + self.mlp(self.mlp_norm(h))


# --------------------------------------------------------------------------- parallel layers

def _shard_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


class ColumnParallelLinear(nn.Module):
    """``Y = X W^T + b`` with ``W``'s rows (output features) split over the group.

    Rank r holds ``.weight`` = rows r of p of the full weight, and the matching slice of the
    bias. Forward: ``f`` on the input (identity; its backward all-reduces the input gradient),
    a local matmul, and, only if ``gather_output``, an all-gather of the output shards.

    ``copy_input=False`` skips ``f``: a block whose several column layers read the same
    input (SwiGLU's gate and up, attention's Q, K and V) applies ``f`` once for all of them,
    so that their partial input gradients are summed locally and all-reduced once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 gather_output: bool = False, group=None, copy_input: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.group = group
        self.degree, self.rank = _degree_and_rank(group)
        _check_divides(self.degree, out_features, "output features")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.copy_input = gather_output, copy_input
        local = out_features // self.degree
        self.out_slice = slice(self.rank * local, (self.rank + 1) * local)  # rows of the full W
        # Fresh layers draw each shard like nn.Linear draws the whole (bound 1/sqrt(in));
        # use from_linear to reproduce a given single-device layer exactly.
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype)
                                   .uniform_(-bound, bound))
        self.bias = (nn.Parameter(torch.empty(local, device=device, dtype=dtype).uniform_(-bound, bound))
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gather_output: bool = False, group=None, *,
                    copy_input: bool = True) -> "ColumnParallelLinear":
        """This rank's column shard of ``linear`` (same device and dtype)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    gather_output=gather_output, group=group, copy_input=copy_input,
                    device="meta")
        layer.weight = _shard_param(column_shard(w, layer.degree, layer.rank))
        if linear.bias is not None:
            layer.bias = _shard_param(column_shard(linear.bias, layer.degree, layer.rank))
        return layer

    @classmethod
    def _from_rows(cls, linear: nn.Linear, rows: slice, group, **kwargs) -> "ColumnParallelLinear":
        """A column layer holding an arbitrary block of rows (replicated KV heads)."""
        n_rows = len(range(linear.out_features)[rows])
        degree, _ = _degree_and_rank(group)
        layer = cls(linear.in_features, n_rows * degree, linear.bias is not None,
                    group=group, device="meta", **kwargs)
        layer.out_features = linear.out_features
        layer.out_slice = rows
        layer.weight = _shard_param(linear.weight[rows])
        if linear.bias is not None:
            layer.bias = _shard_param(linear.bias[rows])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input and self.degree > 1:
            x = comm.copy_to_parallel_region(x, self.group)  # f
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.degree > 1:
            y = comm.gather_from_parallel_region(y, self.group, dim=-1)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.weight.shape[0]}), rank={self.rank} of {self.degree}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``Y = X W^T + b`` with ``W``'s columns (input features) split over the group.

    Rank r holds ``.weight`` = columns r of p of the full weight; the bias is kept whole
    on every rank and added once, after ``g`` (all-reduce forward, identity backward) has
    summed the partial products. With ``input_is_parallel=False`` the layer first keeps
    its own slice of a replicated input (and all-gathers the gradient backward).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 input_is_parallel: bool = True, group=None, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.degree, self.rank = _degree_and_rank(group)
        _check_divides(self.degree, in_features, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        local = in_features // self.degree
        self.in_slice = slice(self.rank * local, (self.rank + 1) * local)  # columns of the full W
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.degree,
                                               device=device, dtype=dtype).uniform_(-bound, bound))
        # Replicated: it must be equal on every rank, so a fresh one starts at zero.
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_is_parallel: bool = True,
                    group=None) -> "RowParallelLinear":
        """This rank's row shard of ``linear`` (same device and dtype)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    input_is_parallel=input_is_parallel, group=group, device="meta")
        layer.weight = _shard_param(row_shard(linear.weight, layer.degree, layer.rank))
        if linear.bias is not None:
            layer.bias = _shard_param(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.degree > 1:
            x = comm.scatter_to_parallel_region(x, self.group, dim=-1)
        y = F.linear(x, self.weight)  # a partial sum of the full output
        if self.degree > 1:
            y = comm.reduce_from_parallel_region(y, self.group)  # g
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.weight.shape[1]}), "
                f"out_features={self.out_features}, rank={self.rank} of {self.degree}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


# --------------------------------------------------------------------------- parallel blocks

class ParallelMLP(nn.Module):
    """`MLP` split over a group: fc1 column-parallel, GeLU local, fc2 row-parallel.

    One all-reduce forward (``g`` after fc2) and one backward (``f`` before fc1).
    """

    def __init__(self, fc1: ColumnParallelLinear, fc2: RowParallelLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    @classmethod
    def from_reference(cls, mlp: MLP, group=None) -> "ParallelMLP":
        return cls(ColumnParallelLinear.from_linear(mlp.fc1, group=group),
                   RowParallelLinear.from_linear(mlp.fc2, group=group))

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BSH)))


class ParallelSwiGLUMLP(nn.Module):
    """`SwiGLUMLP` split over a group: gate and up column-parallel, down row-parallel.

    The input enters the parallel region once (one ``f`` for gate and up), so the block
    still costs exactly one all-reduce forward and one backward.
    """

    def __init__(self, gate: ColumnParallelLinear, up: ColumnParallelLinear,
                 down: RowParallelLinear):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.group, self.degree = down.group, down.degree

    @classmethod
    def from_reference(cls, mlp: SwiGLUMLP, group=None) -> "ParallelSwiGLUMLP":
        col = dict(group=group, copy_input=False)
        return cls(ColumnParallelLinear.from_linear(mlp.gate, **col),
                   ColumnParallelLinear.from_linear(mlp.up, **col),
                   RowParallelLinear.from_linear(mlp.down, group=group))

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        if self.degree > 1:
            x_BSH = comm.copy_to_parallel_region(x_BSH, self.group)  # f, once for gate and up
        return self.down(F.silu(self.gate(x_BSH)) * self.up(x_BSH))


class ParallelAttention(nn.Module):
    """`Attention` with its heads split over a group (see `head_layout`).

    Q, K and V are column-parallel (rank r computes its own heads, no communication),
    attention runs locally per head, the output projection is row-parallel: one all-reduce
    forward, one backward. When the degree exceeds the KV heads, each rank holds a copy of
    the one KV head its query heads need; in training, the gradients of such a replicated
    KV head are partial on each copy and must be summed over its ``kv_replicas`` ranks.
    """

    def __init__(self, q: ColumnParallelLinear, k: ColumnParallelLinear,
                 v: ColumnParallelLinear, o: RowParallelLinear, layout: HeadLayout, head_dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.layout, self.head_dim = layout, head_dim
        self.group, self.degree = o.group, o.degree

    @classmethod
    def from_reference(cls, attn: Attention, group=None) -> "ParallelAttention":
        degree, rank = _degree_and_rank(group)
        layout = head_layout(attn.heads, attn.kv_heads, degree)
        d = attn.head_dim
        col = dict(group=group, copy_input=False)
        q = ColumnParallelLinear.from_linear(attn.q, **col)
        kv = layout.kv_heads_of(rank)
        rows = slice(kv.start * d, kv.stop * d)
        # Plain column shards while tp <= kv_heads; otherwise this rank's (replicated) KV head.
        k = ColumnParallelLinear._from_rows(attn.k, rows, **col)
        v = ColumnParallelLinear._from_rows(attn.v, rows, **col)
        o = RowParallelLinear.from_linear(attn.o, group=group)
        return cls(q, k, v, o, layout, d)

    _heads = Attention._heads

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        if self.degree > 1:
            x_BSH = comm.copy_to_parallel_region(x_BSH, self.group)  # f, once for Q, K and V
        q, k, v = self._heads(self.q(x_BSH)), self._heads(self.k(x_BSH)), self._heads(self.v(x_BSH))
        out = causal_attention(q, k, v)  # this rank's heads only
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class ParallelTransformerBlock(nn.Module):
    """`TransformerBlock` with attention and MLP tensor-parallel; norms and residuals are
    replicated. Two all-reduces forward (one per block), two backward."""

    def __init__(self, ref: TransformerBlock, group=None):
        super().__init__()
        # Replicated: a copy on every rank, on the reference's device and in its dtype.
        self.attn_norm, self.mlp_norm = copy.deepcopy(ref.attn_norm), copy.deepcopy(ref.mlp_norm)
        self.attn = ParallelAttention.from_reference(ref.attn, group)
        self.mlp = ParallelSwiGLUMLP.from_reference(ref.mlp, group)

    @classmethod
    def from_reference(cls, block: TransformerBlock, group=None) -> "ParallelTransformerBlock":
        return cls(block, group)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        h = x_BSH + self.attn(self.attn_norm(x_BSH))
        return h + self.mlp(self.mlp_norm(h))


_PARALLEL = {MLP: ParallelMLP, SwiGLUMLP: ParallelSwiGLUMLP, Attention: ParallelAttention,
             TransformerBlock: ParallelTransformerBlock}


def from_reference(module: nn.Module, group=None) -> nn.Module:
    """The tensor-parallel version of a reference block (`MLP`, `SwiGLUMLP`, `Attention`,
    `TransformerBlock`) holding this rank's shards of its weights."""
    try:
        parallel = _PARALLEL[type(module)]
    except KeyError:
        raise ValueError(f"no tensor-parallel version of {type(module).__name__}: use one of "
                         f"{', '.join(t.__name__ for t in _PARALLEL)}") from None
    return parallel.from_reference(module, group)


# --------------------------------------------------------------------------- verification

KINDS = ("mlp", "swiglu", "attention", "block")


def random_case(kind: str, seed: int = 0, max_degree: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """A reference block of random (seeded) shape and weights, and an input ``x_BSH``.

    Split dimensions are multiples of ``max_degree`` (a power of two), so one case is valid
    at every degree 1, 2, 4, ... up to it; the others (batch, sequence, and the hidden size
    of an MLP) are arbitrary. The same seed gives the same case on every rank.
    """
    import random

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if max_degree < 1 or max_degree & (max_degree - 1):
        raise ValueError(f"max_degree must be a power of two, got {max_degree!r}")
    rng = random.Random(f"{kind}-{seed}")
    torch.manual_seed(rng.randrange(2**31))
    batch, seq = rng.randint(1, 3), rng.randint(1, 6)
    heads = max_degree * rng.choice((1, 2))
    kv_heads = rng.choice([d for d in divisors(heads) if d & (d - 1) == 0])  # 1, 2, 4, ...
    head_dim = rng.randint(2, 5)
    ffn = max_degree * rng.randint(1, 6)
    bias = rng.random() < 0.5
    if kind == "mlp":
        hidden = rng.randint(3, 24)
        module: nn.Module = MLP(hidden, ffn, bias=True)
    elif kind == "swiglu":
        hidden = rng.randint(3, 24)
        module = SwiGLUMLP(hidden, ffn, bias=bias)
    elif kind == "attention":
        hidden = heads * head_dim
        module = Attention(hidden, heads, kv_heads, bias=bias)
    else:
        hidden = heads * head_dim
        module = TransformerBlock(hidden, heads, kv_heads, ffn)
        with torch.no_grad():  # norms start at ones; make them count in the test
            for norm in (module.attn_norm, module.mlp_norm):
                norm.weight.add_(0.1 * torch.randn(hidden))
    return module, torch.randn(batch, seq, hidden)


def _assert_close(actual, expected, what: str, **tol) -> float:
    from torch.testing import assert_close

    actual, expected = actual.detach(), expected.detach()
    assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)
    return float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0


def verify_against_reference(kind: str, tp: int | None = None, seed: int = 0, *,
                             dtype: str = "float32", atol: float | None = None,
                             rtol: float | None = None, max_degree: int = 4) -> dict:
    """Rank function: build `random_case(kind, seed)` and its tensor-parallel version over
    ``tp`` adjacent ranks; check forward output, input gradient, weight shards and weight
    gradients against the single-device reference (``torch.testing.assert_close``).

    Raises on a mismatch. Returns what this rank saw: the comm summaries of the forward and
    the backward pass, the shapes, and the largest absolute difference.

    >>> cluster.run(verify_against_reference, "swiglu", 4)   # doctest: +SKIP
    """
    from .runtime import device

    group = tp_group(tp)
    degree, rank = _degree_and_rank(group)
    dt = getattr(torch, dtype)
    ref, x = random_case(kind, seed, max_degree)
    gy = torch.randn(x.shape[:-1] + (x.shape[-1],))
    ref, x, gy = ref.to(device(), dt), x.to(device(), dt), gy.to(device(), dt)
    par = from_reference(ref, group)
    tol = {} if atol is None and rtol is None else {"atol": atol or 0.0, "rtol": rtol or 0.0}

    x_ref = x.clone().requires_grad_()
    ref(x_ref).backward(gy)
    x_par = x.clone().requires_grad_()
    with comm.record() as fwd:
        y = par(x_par)
    with comm.record() as bwd:
        y.backward(gy)

    with torch.no_grad():
        y_ref = ref(x)
    err = [_assert_close(y, y_ref, "forward output", **tol),
           _assert_close(x_par.grad, x_ref.grad, "input gradient", **tol)]
    ref_params = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        owner = par.get_submodule(name.rpartition(".")[0])
        full = ref_params[name]
        if isinstance(owner, ColumnParallelLinear):
            where = (owner.out_slice,)
        elif isinstance(owner, RowParallelLinear) and name.endswith("weight"):
            where = (slice(None), owner.in_slice)
        else:  # replicated: a row-parallel bias, a norm
            where = (slice(None),)
        _assert_close(p, full[where], f"{name} shard")
        grad = p.grad
        parts = name.split(".")
        parent = par.get_submodule(".".join(parts[:-2]))
        if (isinstance(parent, ParallelAttention) and parts[-2] in ("k", "v")
                and parent.layout.kv_replicas > 1):
            # Each copy of a replicated KV head holds a partial gradient: sum the copies.
            placed = torch.zeros_like(full.grad)
            placed[where] = grad
            grad = comm.all_reduce(placed, group=group)[where]
        err.append(_assert_close(grad, full.grad[where], f"gradient of {name}", **tol))
    return {"rank": rank, "degree": degree, "kind": kind, "x_shape": tuple(x.shape),
            "params": {n: tuple(p.shape) for n, p in par.named_parameters()},
            "forward": comm.summary(fwd), "backward": comm.summary(bwd),
            "max_abs_err": max(err)}


def _collective_name(op) -> str:
    name = str(op).split(".")[-1].rstrip("_")
    return {"allreduce": "all_reduce", "allgather": "all_gather",
            "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
            "_allgather_base": "all_gather", "_reduce_scatter_base": "reduce_scatter"}.get(name, name)


def _counts(mode) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        out[_collective_name(op)] = out.get(_collective_name(op), 0) + n
    return out


def pytorch_plan(kind: str, entry: str = "block") -> dict:
    """PyTorch's own TP plan for a reference block: ColwiseParallel on the first projections,
    RowwiseParallel on the last. ``entry="block"`` makes the input enter the parallel region
    once at the block (PrepareModuleInput), ``"layer"`` once per column-parallel layer."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel)

    cols, rows = {"mlp": (("fc1",), "fc2"), "swiglu": (("gate", "up"), "down"),
                  "attention": (("q", "k", "v"), "o")}[kind]
    if entry not in ("block", "layer"):
        raise ValueError(f"entry must be 'block' or 'layer', got {entry!r}")
    plan: dict = {rows: RowwiseParallel()}
    if entry == "layer":
        plan.update({c: ColwiseParallel() for c in cols})
    else:
        plan.update({c: ColwiseParallel(input_layouts=Replicate()) for c in cols})
        plan[""] = PrepareModuleInput(input_layouts=(Replicate(),),
                                      desired_input_layouts=(Replicate(),), use_local_output=False)
    return plan


def compare_with_pytorch(kind: str, tp: int | None = None, seed: int = 0, *,
                         entry: str = "block", atol: float | None = None,
                         rtol: float | None = None) -> dict:
    """Rank function: the same reference block split by shardlab and by PyTorch's
    ``torch.distributed.tensor.parallel`` (on a DeviceMesh over the same process group).

    Checks that outputs, input gradients, and every weight shard and its gradient agree
    (PyTorch's Shard(0) / Shard(1) are our column / row shards), and counts both sides'
    collectives with PyTorch's ``CommDebugMode``. Returns the counts per pass.
    ``atol``/``rtol`` loosen the comparison (e.g. on GPUs, whose kernels may differ).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from .runtime import device

    if kind not in ("mlp", "swiglu", "attention"):
        raise ValueError(f"compare_with_pytorch supports 'mlp', 'swiglu' and 'attention', got {kind!r}")
    group = tp_group(tp)
    degree, _ = _degree_and_rank(group)
    ref, x = random_case(kind, seed)
    if kind == "attention" and degree > ref.kv_heads:
        raise ValueError(f"PyTorch's ColwiseParallel cannot split {ref.kv_heads} KV heads over "
                         f"tp={degree} ranks (shardlab replicates them: see head_layout); "
                         f"choose tp <= {ref.kv_heads}")
    ref, x = ref.to(device()), x.to(device())
    gy = torch.randn_like(ref(x))
    ours = from_reference(ref, group)
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD,
                                 device().type)
    plan = pytorch_plan(kind, entry)
    theirs = copy.deepcopy(ref)
    if "" in plan:
        theirs = parallelize_module(theirs, mesh, plan.pop(""))
    theirs = parallelize_module(theirs, mesh, plan)

    tol = {} if atol is None and rtol is None else {"atol": atol or 0.0, "rtol": rtol or 0.0}
    result, outputs = {}, {}
    for label, model in (("shardlab", ours), ("pytorch", theirs)):
        xi = x.clone().requires_grad_()
        with CommDebugMode() as fwd:
            y = model(xi)
        with CommDebugMode() as bwd:
            y.backward(gy)
        result[label] = {"forward": _counts(fwd), "backward": _counts(bwd)}
        outputs[label] = (y.detach(), xi.grad)
    _assert_close(outputs["shardlab"][0], outputs["pytorch"][0], "forward output", **tol)
    _assert_close(outputs["shardlab"][1], outputs["pytorch"][1], "input gradient", **tol)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs_params[name]
        local = q.to_local() if isinstance(q, DTensor) else q
        qgrad = q.grad.to_local() if isinstance(q.grad, DTensor) else q.grad
        _assert_close(p, local, f"{name} shard")
        _assert_close(p.grad, qgrad, f"gradient of {name}", **tol)
    result["params_checked"] = len(theirs_params)
    return result
