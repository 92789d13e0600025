"""Sequence parallelism: shard the sequence where tensor parallelism leaves activations whole.

In a tensor-parallel transformer layer (Megatron-LM) the attention and MLP blocks are split
over the ``t`` ranks of a TP group, but the pieces between them, the norms, dropout and the
residual additions, run on the *full* activation on every rank: ``t`` identical copies.
Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models") splits those regions along the sequence instead, so each rank keeps
``1/t`` of their activations. The communication changes shape but not size:

    tensor parallel:    norm -> f  -> [column ... row] -> g (all-reduce)       -> dropout, +
    + sequence par.:    norm -> g' -> [column ... row] -> g-bar (reduce-scatter) -> dropout, +
                        (seq shard)   (all-gather)       (seq shard)

``g'`` = :func:`shardlab.comm.gather_from_sequence_region` (all-gather forward, reduce-scatter
backward) and ``g-bar`` = :func:`shardlab.comm.reduce_scatter_to_sequence_region`
(reduce-scatter forward, all-gather backward). A ring all-reduce *is* a reduce-scatter
followed by an all-gather, so every rank sends exactly the same bytes as before.

The norms' weights are replicated but each rank only sees its own tokens: their gradients
are partial sums and must be all-reduced over the TP group
(:meth:`ParallelBlock.allreduce_sequence_parallel_grads`).

:class:`ParallelBlock` shards a :class:`shardlab.models.Block` (the course's Llama-shaped
layer) with :class:`~shardlab.tensor_parallel.ColumnParallelLinear` /
:class:`~shardlab.tensor_parallel.RowParallelLinear`, with ``sequence_parallel`` on or off,
so the two can be compared on the same weights. :class:`SavedActivations` measures the real
bytes autograd keeps for the backward pass, per region, with
``torch.autograd.graph.saved_tensors_hooks``.

Shapes: ``x_BSH`` is (batch, sequence, hidden); the sequence is dim 1 (``SEQ_DIM``).
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import comm, memory
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "SEQ_DIM",
    "region",
    "SavedActivations",
    "dropout_mask",
    "sequence_shard",
    "reference_block_forward",
    "ParallelBlock",
    "allreduce_as_reduce_scatter_all_gather",
    "ActivationSaving",
    "activation_saving",
    "reference_shard",
    "compare_block",
]

SEQ_DIM = 1  # x_BSH


# --------------------------------------------------------------------------------------------
# Measuring what autograd keeps for the backward pass
# --------------------------------------------------------------------------------------------
_REGION: list[str] = ["other"]


@contextlib.contextmanager
def region(name: str):
    """Label the tensors saved for backward inside the block as belonging to ``name``."""
    _REGION.append(name)
    try:
        yield
    finally:
        _REGION.pop()


class SavedActivations:
    """Count the bytes of the tensors autograd saves for backward, per :func:`region`.

    >>> with SavedActivations(exclude=model.parameters()) as saved:   # doctest: +SKIP
    ...     loss = model(x).sum()
    >>> saved.bytes          # {"sequence": ..., "tensor": ...}

    Each storage counts once (views and tensors saved twice share it), parameters never
    (pass them in ``exclude``): what remains is activation memory held until backward.
    """

    def __init__(self, exclude=()):
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.tensors: dict[str, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return t
        if ptr not in self._exclude and ptr not in self._seen and storage.nbytes():
            self._seen.add(ptr)
            where = _REGION[-1]
            self.bytes[where] = self.bytes.get(where, 0) + storage.nbytes()
            self.tensors[where] = self.tensors.get(where, 0) + 1
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


# --------------------------------------------------------------------------------------------
# Dropout that gives the same mask sharded or not
# --------------------------------------------------------------------------------------------
def dropout_mask(shape, p: float, seed: int, device=None) -> torch.Tensor:
    """Keep-mask (bool) of dropout with probability ``p`` for the *full* tensor ``shape``.

    Drawn from a generator seeded with ``seed`` so that a sequence shard can take its slice
    and match the unsharded layer exactly. (A production system draws only its own slice
    from a per-rank random stream: cheaper, and statistically the same.)
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand(tuple(shape), generator=g) >= p).to(device)


def _dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # torch.where saves only the bool mask for backward (1 byte per value).
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def _site_seed(seed: int, call: int, site: int) -> int:
    return zlib.crc32(f"{seed}/{call}/{site}".encode())


def sequence_shard(x: torch.Tensor, degree: int, rank: int, dim: int = SEQ_DIM) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the sequence (a copy: its own storage)."""
    if x.shape[dim] % degree:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the TP degree "
                         f"{degree}: pad the sequence or choose a degree that divides it")
    return x.chunk(degree, dim=dim)[rank].clone()


def reference_block_forward(block: nn.Module, x_BSH: torch.Tensor, dropout: float = 0.0,
                            seed: int = 0, call: int = 0) -> torch.Tensor:
    """A :class:`shardlab.models.Block` on one device, with the dropout :class:`ParallelBlock`
    applies (after attention and after the MLP, before each residual add)."""
    def drop(y, site):
        if dropout == 0:
            return y
        return _dropout(y, dropout_mask(y.shape, dropout, _site_seed(seed, call, site), y.device), dropout)

    h = x_BSH + drop(block.attn(block.input_layernorm(x_BSH)), 0)
    return h + drop(block.mlp(block.post_attention_layernorm(h)), 1)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class _RowParallelPartial(RowParallelLinear):
    """This rank's row shard without the reduction: returns the partial sum ``X_r W_r^T``.

    The caller reduces (all-reduce, or reduce-scatter under sequence parallelism)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ParallelBlock(nn.Module):
    """A :class:`shardlab.models.Block` split over a tensor-parallel group.

    Attention heads and the MLP's FFN columns are split as in Megatron-LM (Q, K, V, gate, up
    column-parallel; o_proj and down_proj row-parallel). With ``sequence_parallel=False``
    the norms, dropout and residuals are replicated and each block ends in an all-reduce;
    with ``sequence_parallel=True`` they run on this rank's slice of the sequence, the
    blocks are entered by an all-gather and left by a reduce-scatter.

    Input and output: the full ``x_BSH`` (TP), or this rank's sequence shard
    ``x_B(S/t)H`` (SP). ``dropout`` is applied after attention and after the MLP.
    """

    def __init__(self, block: nn.Module, group=None, *, sequence_parallel: bool = False,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.group = group
        self.degree, self.rank = comm.group_size(group), comm.group_rank(group)
        self.sequence_parallel, self.dropout, self.seed = sequence_parallel, dropout, seed
        self.calls = 0  # forward passes so far: a fresh dropout mask for each
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        attn, mlp = block.attn, block.mlp
        t = self.degree
        for what, n in (("attention heads", attn.n_heads), ("KV heads", attn.n_kv_heads),
                        ("FFN features", mlp.gate_proj.out_features)):
            if n % t:
                raise ValueError(f"tp={t} does not divide the {n} {what}: choose a TP degree "
                                 f"that divides it")
        self.input_layernorm = copy.deepcopy(block.input_layernorm)
        self.post_attention_layernorm = copy.deepcopy(block.post_attention_layernorm)

        col = dict(group=group, copy_input=False)  # the block's entry does the communication
        self.attn = copy.deepcopy(attn)  # reuse its forward (rope, GQA); swap the projections
        self.attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, **col)
        self.attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, **col)
        self.attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, **col)
        self.attn.o_proj = _RowParallelPartial.from_linear(attn.o_proj, group=group)
        self.attn.n_heads, self.attn.n_kv_heads = attn.n_heads // t, attn.n_kv_heads // t
        self.mlp = copy.deepcopy(mlp)
        self.mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, **col)
        self.mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, **col)
        self.mlp.down_proj = _RowParallelPartial.from_linear(mlp.down_proj, group=group)

    # -- the two places where TP and SP differ
    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            # all-gather (reduce-scatter backward). contiguous(): the gathered tensor comes
            # back as a permuted view, and Q, K, V would each save a private copy of it.
            return comm.gather_from_sequence_region(x, self.group, dim=SEQ_DIM).contiguous()
        return comm.copy_to_parallel_region(x, self.group)  # f: identity (all-reduce backward)

    def _exit(self, partial: torch.Tensor, row: RowParallelLinear) -> torch.Tensor:
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_region(partial, self.group, dim=SEQ_DIM)
        else:
            y = comm.reduce_from_parallel_region(partial, self.group)  # g: all-reduce
        return y + row.bias if row.bias is not None else y

    def _drop(self, y: torch.Tensor, site: int) -> torch.Tensor:
        if self.dropout == 0 or not self.training:
            return y
        full = list(y.shape)
        if self.sequence_parallel:
            full[SEQ_DIM] *= self.degree
        keep = dropout_mask(full, self.dropout, _site_seed(self.seed, self.calls, site), y.device)
        if self.sequence_parallel:
            keep = sequence_shard(keep, self.degree, self.rank)
        return _dropout(y, keep, self.dropout)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        with region("sequence"):
            h = self.input_layernorm(x_BSH)
        with region("tensor"):
            a = self._exit(self.attn(self._enter(h)), self.attn.o_proj)
        with region("sequence"):
            x_BSH = x_BSH + self._drop(a, 0)
            h = self.post_attention_layernorm(x_BSH)
        with region("tensor"):
            m = self._exit(self.mlp(self._enter(h)), self.mlp.down_proj)
        with region("sequence"):
            out = x_BSH + self._drop(m, 1)
        self.calls += 1
        return out

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters used on sequence shards: their gradients are partial."""
        params = list(self.input_layernorm.parameters()) + list(self.post_attention_layernorm.parameters())
        params += [row.bias for row in (self.attn.o_proj, self.mlp.down_proj) if row.bias is not None]
        return params

    def allreduce_sequence_parallel_grads(self) -> None:
        """Sum the norm-weight (and row-bias) gradients over the TP group (SP only: under plain
        TP every rank saw every token, so they are already complete)."""
        if not self.sequence_parallel or self.degree == 1:
            return
        for p in self.sequence_parallel_parameters():
            if p.grad is not None:
                comm.all_reduce(p.grad, group=self.group)


# --------------------------------------------------------------------------------------------
# Errata 8, and the arithmetic
# --------------------------------------------------------------------------------------------
def allreduce_as_reduce_scatter_all_gather(x: torch.Tensor, group=None, dim: int = 0) -> dict:
    """Run an all-reduce, and a reduce-scatter followed by an all-gather, on ``x``.

    Returns both results (equal) and the logged sent bytes of each path (equal): sequence
    parallelism does not *replace* the all-reduce with an all-gather, it splits it in two.
    """
    with comm.record() as log_ar:
        ar = comm.all_reduce(x.clone(), group=group)
    with comm.record() as log_split:
        shard = comm.reduce_scatter(x.clone(), dim=dim, group=group)
        rsag = comm.all_gather(shard, dim=dim, group=group)
    return {"all_reduce": ar, "reduce_scatter+all_gather": rsag,
            "all_reduce_log": comm.summary(log_ar), "split_log": comm.summary(log_split)}


@dataclass(frozen=True)
class ActivationSaving:
    """Training activations of one layer on one TP rank (Korthikanti et al. 2022, eqs. 3-4)."""

    model: str
    tp: int
    seq_len: int
    tp_only: int  # bytes per layer per rank, tensor parallelism alone
    tp_sp: int  # with sequence parallelism
    hidden_state: int  # one full (batch x seq x hidden) tensor
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.tp_only / self.tp_sp


def activation_saving(model, tp: int, seq_len: int, batch: int = 1, dtype: str = "bf16",
                      flash_attention: bool = True) -> ActivationSaving:
    """Per-layer training activations per rank with TP alone and with TP + SP.

    Uses :func:`shardlab.memory.activation_bytes` (``layers=1``): ``10 + 24/t`` vs ``34/t``
    bytes per (token x hidden) in 16-bit, with flash attention dropping the score terms.
    """
    spec = memory.get_model(model)
    kw = dict(dtype=dtype, training=True, tp=tp, flash_attention=flash_attention, layers=1)
    return ActivationSaving(
        spec.name, tp, seq_len,
        memory.activation_bytes(spec, batch, seq_len, sp=False, **kw),
        memory.activation_bytes(spec, batch, seq_len, sp=True, **kw),
        memory.hidden_state_bytes(batch, seq_len, spec.hidden, dtype),
    )


# --------------------------------------------------------------------------------------------
# A rank function: one layer, sharded vs unsharded
# --------------------------------------------------------------------------------------------
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


def reference_shard(name: str, full: torch.Tensor, degree: int, rank: int) -> torch.Tensor:
    """The slice of a reference parameter (or its gradient) that ``ParallelBlock`` holds."""
    leaf = name.split(".")[-2] if name.endswith(("weight", "bias")) else name
    if leaf in _COLUMN:
        return full.chunk(degree, dim=0)[rank]
    if leaf in _ROW and name.endswith("weight"):
        return full.chunk(degree, dim=1)[rank]
    return full  # norms and row biases: replicated


def compare_block(sequence_parallel: bool = True, *, dropout: float = 0.0, batch: int = 2,
                  seq_len: int = 16, model: str = "tiny", seed: int = 0, group=None) -> dict:
    """Rank function: one decoder layer of ``model``, unsharded vs :class:`ParallelBlock`.

    Every rank builds the same reference layer and input, runs forward and backward on it,
    then on its shard. Returns the largest differences (output, input gradient, parameter
    gradients, all compared on this rank's slice), the collectives of forward + backward
    (``comm``) and of the norm-gradient sync (``comm_grad_sync``), and the bytes saved for
    backward per region (``saved``: ``"sequence"`` = norms, dropout, residual; ``"tensor"``
    = inside attention and MLP).
    """
    from . import models
    from .runtime import device

    spec = memory.get_model(model)
    dev = device()
    t, r = comm.group_size(group), comm.group_rank(group)
    block = models.Block(spec.hidden, spec.heads, spec.kv_heads, spec.ffn, device=dev)
    models.init_parameters(block, seed, prefix="blocks.0")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seq_len, spec.hidden, generator=g).to(dev)
    gy = torch.randn(batch, seq_len, spec.hidden, generator=g).to(dev)

    xr = x.clone().requires_grad_()
    yr = reference_block_forward(block, xr, dropout, seed=seed)
    yr.backward(gy)

    pb = ParallelBlock(block, group, sequence_parallel=sequence_parallel, dropout=dropout, seed=seed)
    shard = (lambda a: sequence_shard(a, t, r)) if sequence_parallel else (lambda a: a.clone())
    xp = shard(x).requires_grad_()
    with comm.record() as log, SavedActivations(exclude=pb.parameters()) as saved:
        yp = pb(xp)
        yp.backward(shard(gy))
    with comm.record() as sync_log:
        pb.allreduce_sequence_parallel_grads()

    ref_grads = dict(block.named_parameters())
    param_err = max(
        (reference_shard(n, ref_grads[n].grad, t, r) - p.grad).abs().max().item()
        for n, p in pb.named_parameters())
    return {
        "out_err": (yp - shard(yr)).abs().max().item(),
        "grad_x_err": (xp.grad - shard(xr.grad)).abs().max().item(),
        "param_grad_err": param_err,
        "comm": comm.summary(log),
        "comm_grad_sync": comm.summary(sync_log),
        "saved": dict(saved.bytes),
        "local_input_shape": tuple(xp.shape),
    }
