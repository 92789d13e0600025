"""The TP x PP x DP rank grid of 3D parallelism.

``world_size = tp * pp * dp`` ranks are laid out on a three-axis grid. The order is fixed
and **TP is the fastest-varying axis**, then PP, then DP::

    rank = dp_idx * (pp * tp) + pp_idx * tp + tp_idx

so the ``tp`` ranks of one tensor-parallel group are adjacent (0..tp-1, tp..2tp-1, ...):
on nodes of ``g`` GPUs with ``tp`` dividing ``g``, every TP group stays inside one node and
its all-reduces ride NVLink, the pipeline's point-to-point sends cross node boundaries
next, and the data-parallel all-reduce of the gradients, once per step, spans the farthest.

Vocabulary: an *axis* is one of ``"tp"``, ``"pp"``, ``"dp"`` (never a tensor dim); its
*degree* is how many ranks it spans; a *group* is the set of ranks that differ only in
that axis' coordinate.

Everything here except :meth:`ParallelDims.build_groups` is plain arithmetic (no process
group, no torch) and runs in microseconds; ``build_groups`` runs inside a rank function and
makes the ``torch.distributed`` groups (every rank makes every group, as the API requires).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from . import hardware, memory

__all__ = [
    "AXES",
    "Coord",
    "ParallelDims",
    "MeshGroups",
    "AxisLinks",
    "axis_links",
    "LayoutSummary",
    "describe_layout",
    "recompute_activation_bytes",
    "MT_NLG_530B",
]

#: The axes, fastest-varying first.
AXES: tuple[str, ...] = ("tp", "pp", "dp")


@dataclass(frozen=True)
class Coord:
    """Where a rank sits on the grid: its index along each axis."""

    tp: int
    pp: int
    dp: int

    def __str__(self) -> str:
        return f"(tp={self.tp}, pp={self.pp}, dp={self.dp})"


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor, pipeline and data parallelism: ``tp * pp * dp`` ranks.

    >>> dims = ParallelDims(tp=2, pp=2, dp=2)
    >>> dims.coords(5)
    Coord(tp=1, pp=0, dp=1)
    >>> dims.groups("tp")
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    >>> dims.groups("pp")
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    >>> dims.groups("dp")
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            _positive_int(axis, getattr(self, axis))

    # -- construction and validation
    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The layout with the given ``tp`` and ``pp`` and whatever ``dp`` fills ``world_size``."""
        _positive_int("world_size", world_size)
        _positive_int("tp", tp)
        _positive_int("pp", pp)
        if world_size % (tp * pp):
            ok = [d for d in _divisors(world_size)]
            raise ValueError(
                f"tp={tp} x pp={pp} = {tp * pp} does not divide the world size {world_size}, so "
                f"no whole number of data-parallel replicas fits: choose tp and pp whose product "
                f"is one of {ok}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def degree(self, axis: str) -> int:
        return getattr(self, _check_axis(axis))

    def validate(self, world_size: int) -> "ParallelDims":
        """Raise ``ValueError`` unless ``tp * pp * dp == world_size``; say what to change."""
        _positive_int("world_size", world_size)
        if self.world_size == world_size:
            return self
        hints = []
        for axis in AXES:
            rest = self.world_size // self.degree(axis)
            if world_size % rest == 0:
                hints.append(f"{axis}={world_size // rest}")
        hint = ("set " + " or ".join(hints)) if hints else \
            f"choose degrees whose product is {world_size}"
        raise ValueError(
            f"tp={self.tp} x pp={self.pp} x dp={self.dp} = {self.world_size} ranks, but the world "
            f"has {world_size}: {hint} (or run on {self.world_size} ranks)")

    # -- the grid
    def coords(self, rank: int) -> Coord:
        """Grid coordinates of a global rank."""
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in 0..{self.world_size - 1}, got {rank!r}")
        return Coord(tp=rank % self.tp, pp=rank // self.tp % self.pp, dp=rank // (self.pp * self.tp))

    def rank_of(self, *, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        """Global rank at grid coordinates (``tp``, ``pp``, ``dp``)."""
        for axis, idx in (("tp", tp), ("pp", pp), ("dp", dp)):
            if not isinstance(idx, int) or not 0 <= idx < self.degree(axis):
                raise ValueError(f"{axis} index must be in 0..{self.degree(axis) - 1}, got {idx!r}")
        return dp * self.pp * self.tp + pp * self.tp + tp

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along ``axis``: the rank lists that differ only in that coordinate.

        Ordered by their lowest rank; each list in increasing axis index (= group rank).
        """
        _check_axis(axis)
        seen: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            key = tuple(getattr(c, a) for a in AXES if a != axis)
            seen.setdefault(key, []).append(r)
        return sorted(seen.values())

    def group_of(self, rank: int, axis: str) -> list[int]:
        """The ranks of ``rank``'s group along ``axis`` (``rank`` included)."""
        c = self.coords(rank)
        return [self.rank_of(**{**_as_dict(c), axis: i}) for i in range(self.degree(axis))]

    def table(self) -> list[dict]:
        """One row per rank: its coordinates and its group along each axis (for printing)."""
        return [{"rank": r, **_as_dict(self.coords(r)),
                 **{f"{a}_group": self.group_of(r, a) for a in AXES}} for r in range(self.world_size)]

    # -- inside a rank
    def build_groups(self) -> "MeshGroups":
        """Create the TP, PP and DP process groups and return this rank's three (collective).

        Call it inside a rank function, on every rank. Groups are named ``"tp"``, ``"pp"``,
        ``"dp"`` in the comm log. They are cached per process, so a later ``cluster.run``
        gets the same groups without creating new ones.
        """
        import torch.distributed as dist

        from . import comm

        if not dist.is_initialized():
            raise RuntimeError("build_groups() needs a process group: call it inside a rank "
                               "function (shardlab.launch / Cluster.run)")
        self.validate(dist.get_world_size())
        if self in _GROUP_CACHE:
            return _GROUP_CACHE[self]
        me = dist.get_rank()
        mine = {}
        for axis in AXES:  # same order on every rank: new_group is collective
            for ranks in self.groups(axis):
                g = comm.new_group(ranks, name=axis)
                if me in ranks:
                    mine[axis] = g
        out = MeshGroups(self, me, self.coords(me), mine["tp"], mine["pp"], mine["dp"])
        _GROUP_CACHE[self] = out
        return out

    def __str__(self) -> str:
        return f"TP={self.tp} x PP={self.pp} x DP={self.dp} = {self.world_size} ranks"


_GROUP_CACHE: dict[ParallelDims, "MeshGroups"] = {}


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}: use one of {', '.join(AXES)}")
    return axis


def _as_dict(c: Coord) -> dict:
    return {"tp": c.tp, "pp": c.pp, "dp": c.dp}


@dataclass(frozen=True)
class MeshGroups:
    """One rank's view of the grid: its coordinates and its TP, PP and DP process groups."""

    dims: ParallelDims
    rank: int
    coord: Coord
    tp: object
    pp: object
    dp: object

    def group(self, axis: str):
        return getattr(self, _check_axis(axis))

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.dims.pp - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the same (tp, dp) position one pipeline stage earlier."""
        if self.is_first_stage:
            return None
        return self.dims.rank_of(tp=self.coord.tp, pp=self.coord.pp - 1, dp=self.coord.dp)

    @property
    def next_stage_rank(self) -> int | None:
        if self.is_last_stage:
            return None
        return self.dims.rank_of(tp=self.coord.tp, pp=self.coord.pp + 1, dp=self.coord.dp)


# --------------------------------------------------------------------------------------------
# Which link each axis uses
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisLinks:
    """For one axis: does any of its groups span nodes, and so which link carries it."""

    axis: str
    degree: int
    spans_nodes: bool
    link: str  # a key of hardware.LINKS ("" for degree 1: no traffic)
    nodes_per_group: int


def axis_links(dims: ParallelDims, gpus_per_node: int, intra: str = "nvlink-h100",
               inter: str = "ib-ndr") -> dict[str, AxisLinks]:
    """The link each axis' collectives use when ranks fill nodes of ``gpus_per_node`` in order.

    An axis whose every group stays inside one node uses ``intra`` (NVLink); one with a group
    spread over several nodes is limited by ``inter`` (the network). Nodes hold consecutive
    ranks, as launchers number them.
    """
    _positive_int("gpus_per_node", gpus_per_node)
    hardware.get_link(intra)
    hardware.get_link(inter)
    out = {}
    for axis in AXES:
        nodes = max(len({r // gpus_per_node for r in g}) for g in dims.groups(axis))
        degree = dims.degree(axis)
        link = "" if degree == 1 else (inter if nodes > 1 else intra)
        out[axis] = AxisLinks(axis, degree, nodes > 1, link, nodes)
    return out


# --------------------------------------------------------------------------------------------
# Worked layouts
# --------------------------------------------------------------------------------------------
# Megatron-Turing NLG 530B (Smith et al. 2022, table 1): 105 layers, hidden 20480, 128 heads,
# sequence 2048, GPT-2 vocabulary (51,200 after padding), tied embeddings. Its MLP is GPT-style
# (two matrices, 4h wide: 8h^2 weights); memory.ModelSpec counts a SwiGLU MLP (3 h ffn), so we
# give the SwiGLU width with the same weight count, 8h/3, rounded to a multiple of 8 so that
# TP=8 divides it. Biases and learned position embeddings (about 0.05B) are not counted.
MT_NLG_530B = memory.ModelSpec(
    "Megatron-Turing NLG 530B", layers=105, hidden=20480, heads=128, kv_heads=128,
    ffn=8 * round(20480 / 3), vocab=51200, tied_embeddings=True)


@dataclass(frozen=True)
class LayoutSummary:
    """A layout of a model on a cluster: the grid, memory on the busiest GPU, links per axis."""

    model: str
    dims: ParallelDims
    gpus_per_node: int
    nodes: int
    gpu: str
    capacity: float  # bytes of one GPU
    memory: memory.MemoryReport
    fits: bool
    links: dict[str, AxisLinks] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per axis, for a table."""
        return [{"axis": a, "degree": l.degree, "spans nodes": l.spans_nodes,
                 "link": l.link or "-", "nodes per group": l.nodes_per_group}
                for a, l in self.links.items()]


def recompute_activation_bytes(model, dims: ParallelDims, *, batch: int = 1, seq_len: int = 2048,
                               dtype: str = "fp16", sp: bool = False,
                               flash_attention: bool = False) -> int:
    """Training activations on the first stage with *full activation recomputation*.

    Each layer keeps only its input (``batch x seq_len x hidden``, split over TP by sequence
    parallelism) and recomputes the rest in the backward pass, where one layer's full
    activations (:func:`shardlab.memory.activation_bytes`) exist at a time. Under 1F1B the
    first stage holds ``pp`` micro-batches of its ``layers / pp`` layers: about all layers' inputs.
    """
    spec = memory.get_model(model)
    stage_layers = math.ceil(spec.layers / dims.pp)
    kept = min(spec.layers, dims.pp * stage_layers)
    inputs = memory.hidden_state_bytes(batch, seq_len, spec.hidden, dtype) // (dims.tp if sp else 1)
    one_layer = memory.activation_bytes(spec, batch, seq_len, dtype, training=True, tp=dims.tp,
                                        sp=sp, flash_attention=flash_attention, layers=1)
    return kept * inputs + one_layer


def describe_layout(model, dims: ParallelDims, *, gpus_per_node: int = 8, gpu: str = "h100-80gb",
                    intra: str | None = None, inter: str = "ib-ndr", recompute: bool = False,
                    **memory_kwargs) -> LayoutSummary:
    """Memory per GPU (:func:`shardlab.memory.memory_per_gpu`) and links of a layout.

    ``memory_kwargs`` go to ``memory_per_gpu`` (``workload``, ``batch``, ``seq_len``,
    ``dtype``, ``zero``, ...). ``intra`` defaults to the GPU's own link preset.
    ``recompute=True`` (training) replaces the activations by
    :func:`recompute_activation_bytes`: full activation recomputation.
    """
    spec = memory.get_model(model)
    g = hardware.get_gpu(gpu)
    report = memory.memory_per_gpu(spec, tp=dims.tp, pp=dims.pp, dp=dims.dp, **memory_kwargs)
    if recompute:
        if memory_kwargs.get("workload", "inference") != "training":
            raise ValueError("recompute=True applies to training: pass workload='training'")
        keep = {k: memory_kwargs[k] for k in ("batch", "seq_len", "dtype", "sp", "flash_attention")
                if k in memory_kwargs}
        report = dataclasses.replace(report, activations=recompute_activation_bytes(spec, dims, **keep))
    links = axis_links(dims, gpus_per_node, intra or g.link, inter)
    return LayoutSummary(spec.name, dims, gpus_per_node, math.ceil(dims.world_size / gpus_per_node),
                         g.name, g.memory_bytes, report, report.fits(g.memory_bytes), links)
