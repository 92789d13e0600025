"""Alpha-beta cost models of collectives, and the communication and compute of a layer.

A collective over ``p`` ranks runs in steps; every step pays a latency ``alpha`` and moves
bytes at the per-direction link bandwidth ``B``. For ring algorithms on ``S`` bytes:

=================  ==========  =====================  ===========================
collective         steps       bytes each rank sends  time
=================  ==========  =====================  ===========================
all-reduce         2(p-1)      2(p-1)/p * S           2(p-1) a + 2(p-1)/p * S/B
all-gather         p-1         (p-1)/p * S            (p-1) a + (p-1)/p * S/B
reduce-scatter     p-1         (p-1)/p * S            (p-1) a + (p-1)/p * S/B
all-to-all         p-1         (p-1)/p * S            (p-1) a + (p-1)/p * S/B
point-to-point     1           S                      a + S/B
=================  ==========  =====================  ===========================

``S`` is always the full tensor one rank holds before (all-reduce, reduce-scatter,
all-to-all) or after (all-gather) the collective. All-to-all assumes pairwise exchanges over
a non-blocking fabric (NVSwitch, a fat-tree switch). A collective over one rank costs 0.

Time functions take a ``link``: a :data:`shardlab.hardware.LINKS` key, a
:class:`~shardlab.hardware.LinkSpec`, or a :class:`CollectiveModel` calibrated on
measurements with :func:`fit_alpha_beta`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .hardware import GPUSpec, LinkSpec, get_gpu, get_link
from .memory import ModelSpec, dtype_bytes, get_model, kv_heads_per_rank, layer_breakdown

__all__ = [
    "COLLECTIVES",
    "allreduce_bytes",
    "allgather_bytes",
    "reduce_scatter_bytes",
    "alltoall_bytes",
    "p2p_bytes",
    "collective_steps",
    "collective_time",
    "p2p_time",
    "allreduce_time",
    "allgather_time",
    "reduce_scatter_time",
    "alltoall_time",
    "bus_bandwidth",
    "AlphaBeta",
    "CollectiveModel",
    "fit_alpha_beta",
    "relative_error",
    "MEASURED_ALLREDUCE_2XH100",
    "calibrated_2xh100",
    "CommCost",
    "tp_comm_cost",
    "decode_allreduce_cost",
    "prefill_allreduce_cost",
    "ep_alltoall_cost",
    "ComputeCost",
    "forward_flops",
    "roofline_time",
    "StepEstimate",
    "tp_step_estimate",
]

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "p2p")


def _check_p(p: int) -> int:
    if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 1:
        raise ValueError(f"p (number of ranks) must be a positive int, got {p!r}")
    return int(p)


def _check_nbytes(nbytes):
    if np.any(np.asarray(nbytes) < 0):
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    return nbytes


def _check_collective(collective: str) -> str:
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; use one of: {', '.join(COLLECTIVES)}")
    return collective


# --------------------------------------------------------------------------------------------
# Bytes each rank sends
# --------------------------------------------------------------------------------------------
def _byte_factor(collective: str, p: int) -> float:
    """Fraction of the full tensor that each rank sends (and receives)."""
    if collective == "p2p":
        return 1.0
    if p == 1:
        return 0.0
    # All-reduce = reduce-scatter + all-gather: two passes of (p-1)/p each.
    return (2 if collective == "allreduce" else 1) * (p - 1) / p


def collective_steps(collective: str, p: int) -> int:
    """Number of latency-paying steps of the ring / pairwise algorithm."""
    _check_collective(collective)
    p = _check_p(p)
    if collective == "p2p":
        return 1
    return (2 if collective == "allreduce" else 1) * (p - 1)


def allreduce_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` tensor: 2(p-1)/p * nbytes."""
    return _byte_factor("allreduce", _check_p(p)) * _check_nbytes(nbytes)


def allgather_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends in an all-gather whose *gathered* result is ``nbytes``: (p-1)/p."""
    return _byte_factor("allgather", _check_p(p)) * _check_nbytes(nbytes)


def reduce_scatter_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends in a reduce-scatter of an ``nbytes`` input: (p-1)/p * nbytes."""
    return _byte_factor("reduce_scatter", _check_p(p)) * _check_nbytes(nbytes)


def alltoall_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends in an all-to-all of an ``nbytes`` send buffer: it keeps 1/p."""
    return _byte_factor("alltoall", _check_p(p)) * _check_nbytes(nbytes)


def p2p_bytes(nbytes: float) -> float:
    """Bytes sent by a point-to-point send (pipeline stages): all of them."""
    return _byte_factor("p2p", 1) * _check_nbytes(nbytes)


def bytes_sent(collective: str, nbytes: float, p: int) -> float:
    """Bytes each rank sends in `collective` ("allreduce", "allgather", ...) of ``nbytes``."""
    if collective == "p2p":
        return p2p_bytes(nbytes)
    _check_collective(collective)
    return _byte_factor(collective, _check_p(p)) * _check_nbytes(nbytes)


def bus_bandwidth(nbytes: float, seconds: float, p: int, collective: str = "allreduce") -> float:
    """NCCL-tests "bus bandwidth" of a timed collective: the bytes each rank actually moved
    per second (algorithm bandwidth nbytes/seconds times the collective's byte factor),
    comparable with the link's per-direction bandwidth."""
    _check_collective(collective)
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return _byte_factor(collective, _check_p(p)) * nbytes / seconds


# --------------------------------------------------------------------------------------------
# Calibrated models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlphaBeta:
    """Latency per step (s) and bandwidth (bytes/s) of one collective kind; ``p`` it was fit at."""

    alpha: float
    bandwidth: float
    p: int | None = None

    @property
    def beta(self) -> float:
        """Seconds per byte (0 for an infinitely fast link)."""
        return 0.0 if math.isinf(self.bandwidth) else 1.0 / self.bandwidth


@dataclass(frozen=True)
class CollectiveModel:
    """Alpha-beta parameters per collective kind, e.g. fitted on measured times.

    Kinds not in ``params`` fall back to ``fallback`` (a link preset), else raise.
    """

    name: str
    params: dict[str, AlphaBeta] = field(default_factory=dict)
    fallback: LinkSpec | None = None
    source: str = ""

    def alpha_beta(self, collective: str) -> AlphaBeta:
        _check_collective(collective)
        if collective in self.params:
            return self.params[collective]
        if self.fallback is not None:
            return AlphaBeta(self.fallback.alpha, self.fallback.bandwidth)
        raise ValueError(
            f"model {self.name!r} has no parameters for {collective!r}; it has "
            f"{', '.join(self.params) or 'none'} (fit that collective or give a fallback link)"
        )

    def predict(self, nbytes, p: int | None = None, collective: str | None = None):
        """Predicted seconds for ``nbytes`` (scalar or array). ``collective`` defaults to the
        only calibrated kind, ``p`` to the rank count it was fitted at."""
        if collective is None:
            if len(self.params) != 1:
                raise ValueError(f"say which collective: model {self.name!r} has {', '.join(self.params)}")
            collective = next(iter(self.params))
        ab = self.alpha_beta(collective)
        if p is None:
            if ab.p is None:
                raise ValueError("pass p: this model's parameters do not record a rank count")
            p = ab.p
        return collective_time(collective, nbytes, p, self)

    def merged(self, other: "CollectiveModel") -> "CollectiveModel":
        """A model with both models' kinds (``other`` wins where both have one)."""
        return CollectiveModel(self.name, {**self.params, **other.params},
                               self.fallback or other.fallback, self.source)


def _link_alpha_beta(link, collective: str) -> AlphaBeta:
    if isinstance(link, CollectiveModel):
        return link.alpha_beta(collective)
    spec = get_link(link)
    return AlphaBeta(spec.alpha, spec.bandwidth)


def _link_name(link) -> str:
    return link.name if isinstance(link, (LinkSpec, CollectiveModel)) else str(link)


FIT_OBJECTIVES = ("relative", "absolute", "minimax")


def fit_alpha_beta(sizes, times, p: int, collective: str = "allreduce", *,
                   relative: bool = True, objective: str | None = None, name: str = "fitted",
                   source: str = "", fallback: LinkSpec | str | None = None) -> CollectiveModel:
    """Fit ``alpha`` (per step) and bandwidth to measured ``times`` (s) of ``sizes`` (bytes).

    The model is ``time = steps(p) * alpha + factor(p) * size / B`` with both terms
    non-negative. ``objective`` says what "best" means:

    * ``"relative"`` (the default; also ``relative=True``): least squares on relative
      errors, so microsecond and second-long points count alike;
    * ``"absolute"`` (``relative=False``): least squares on seconds, dominated by the
      largest sizes;
    * ``"minimax"``: the smallest worst-case relative error over all points, the right
      criterion for a claim such as "within 25% at every size".
    """
    _check_collective(collective)
    p = _check_p(p)
    objective = objective or ("relative" if relative else "absolute")
    if objective not in FIT_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(FIT_OBJECTIVES)}")
    if collective != "p2p" and p < 2:
        raise ValueError("fit at p >= 2 ranks: a collective over one rank takes no time")
    x = np.asarray(sizes, dtype=float).ravel()
    y = np.asarray(times, dtype=float).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need at least 2 (size, time) pairs of equal length; got {x.size} sizes, {y.size} times")
    if np.any(y <= 0) or np.any(x < 0):
        raise ValueError("times must be > 0 seconds and sizes >= 0 bytes")
    design = np.column_stack([np.full_like(x, collective_steps(collective, p)),
                              _byte_factor(collective, p) * x])
    if objective == "minimax":
        alpha, beta = _minimax_relative(design, y)
    else:
        alpha, beta = _least_squares(design, y, objective == "relative")
    fit = AlphaBeta(alpha, math.inf if beta == 0 else 1.0 / beta, p)
    fb = get_link(fallback) if fallback is not None else None
    return CollectiveModel(name, {collective: fit}, fb, source)


def _least_squares(design: np.ndarray, y: np.ndarray, relative: bool) -> tuple[float, float]:
    w = 1.0 / y if relative else np.ones_like(y)
    a, b = design * w[:, None], y * w

    def solve(cols: list[int]) -> np.ndarray:
        coef = np.zeros(2)
        coef[cols] = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        return coef

    coef = solve([0, 1])
    if np.any(coef < 0):  # two unknowns: the non-negative optimum has one of them at 0
        candidates = [np.clip(solve([k]), 0, None) for k in (0, 1)]
        coef = min(candidates, key=lambda c: float(np.sum((a @ c - b) ** 2)))
    return float(coef[0]), float(coef[1])


def _ternary_min(f, lo: float, hi: float, iters: int = 64) -> tuple[float, float]:
    """Minimum of a convex function on [lo, hi]: (argmin, value)."""
    for _ in range(iters):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if f(m1) <= f(m2):
            hi = m2
        else:
            lo = m1
    x = (lo + hi) / 2
    return x, f(x)


def _minimax_relative(design: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Non-negative (alpha, beta) minimising max_i |design_i . (alpha, beta) / y_i - 1|.

    Each |relative error| is convex in (alpha, beta), so their maximum is, and so is its
    minimum over beta as a function of alpha: two nested ternary searches find the optimum
    (no LP solver needed for two unknowns).
    """
    c, d = design[:, 0] / y, design[:, 1] / y  # relative prediction per unit alpha, beta
    # (0, 0) has error 1 everywhere, so the optimum keeps every prediction under twice its
    # measurement: alpha <= 2 / max(c), beta <= 2 / max(d). Tight brackets, few iterations.
    a_hi = 2.0 / c.max() if c.max() > 0 else 0.0
    b_hi = 2.0 / d.max() if d.max() > 0 else 0.0

    def worst(alpha: float, beta: float) -> float:
        return float(np.max(np.abs(c * alpha + d * beta - 1.0)))

    def best_beta(alpha: float) -> tuple[float, float]:
        return _ternary_min(lambda b: worst(alpha, b), 0.0, b_hi)

    alpha, _ = _ternary_min(lambda a: best_beta(a)[1], 0.0, a_hi)
    return float(alpha), float(best_beta(alpha)[0])


def relative_error(predicted, measured):
    """``|predicted - measured| / measured`` (scalar or array)."""
    m = np.asarray(measured, dtype=float)
    if np.any(m == 0):
        raise ValueError("measured values must be non-zero to take a relative error")
    err = np.abs(np.asarray(predicted, dtype=float) - m) / np.abs(m)
    return float(err) if err.ndim == 0 else err


# Measured on 2 x H100 80GB (NV18), PyTorch 2.11 + NCCL 2.28, fp16 all-reduce, mean of
# back-to-back calls timed with CUDA events (SYLLABUS.md, "Hardware facts"). A lead, not a
# substitute for the course's own benchmarks in benchmarks/.
MEASURED_ALLREDUCE_2XH100 = {
    "p": 2,
    "sizes": (16 * 2**10, 512 * 2**10, 8 * 2**20, 256 * 2**20, 2**30),
    "times": (65e-6, 52e-6, 60e-6, 0.90e-3, 3.24e-3),
    "source": "2 x H100 80GB NV18, PyTorch 2.11, NCCL 2.28, fp16, CUDA events (SYLLABUS.md)",
}


def calibrated_2xh100(relative: bool = True) -> CollectiveModel:
    """All-reduce model fitted on :data:`MEASURED_ALLREDUCE_2XH100`, falling back to the
    ``nvlink-h100`` preset for other collectives."""
    m = MEASURED_ALLREDUCE_2XH100
    return fit_alpha_beta(m["sizes"], m["times"], m["p"], "allreduce", relative=relative,
                          name="h100-nv18-measured", source=m["source"], fallback="nvlink-h100")


# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------
def collective_time(collective: str, nbytes, p: int, link) -> float:
    """Alpha-beta time (s) of ``collective`` on ``nbytes`` over ``p`` ranks on ``link``."""
    _check_collective(collective)
    p = _check_p(p)
    _check_nbytes(nbytes)
    if p == 1 and collective != "p2p":
        return np.zeros(np.shape(nbytes)) if np.ndim(nbytes) else 0.0
    ab = _link_alpha_beta(link, collective)
    return collective_steps(collective, p) * ab.alpha + _byte_factor(collective, p) * nbytes * ab.beta


def p2p_time(nbytes: float, link) -> float:
    """One send of ``nbytes``: alpha + nbytes / B."""
    return collective_time("p2p", nbytes, 2, link)


def allreduce_time(nbytes: float, p: int, link) -> float:
    """Ring all-reduce: 2(p-1) alpha + 2(p-1)/p * nbytes / B."""
    return collective_time("allreduce", nbytes, p, link)


def allgather_time(nbytes: float, p: int, link) -> float:
    """Ring all-gather to ``nbytes`` in total: (p-1) alpha + (p-1)/p * nbytes / B."""
    return collective_time("allgather", nbytes, p, link)


def reduce_scatter_time(nbytes: float, p: int, link) -> float:
    """Ring reduce-scatter of ``nbytes``: (p-1) alpha + (p-1)/p * nbytes / B."""
    return collective_time("reduce_scatter", nbytes, p, link)


def alltoall_time(nbytes: float, p: int, link) -> float:
    """Pairwise all-to-all of an ``nbytes`` send buffer: (p-1) alpha + (p-1)/p * nbytes / B."""
    return collective_time("alltoall", nbytes, p, link)


# --------------------------------------------------------------------------------------------
# Communication of a transformer forward pass
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommCost:
    """Collectives of one forward pass on one rank, and their alpha-beta time."""

    collective: str  # "allreduce", "reduce_scatter+allgather" or "alltoall"
    degree: int  # ranks in the group (TP or EP degree)
    tokens: int  # tokens in flight: batch x new tokens
    count: int  # collectives per forward pass
    message_bytes: int  # full tensor size of each collective
    payload_bytes: int  # count x message_bytes
    bytes_sent_per_rank: float  # what each rank puts on the wire, over the whole pass
    bandwidth_time: float  # bytes_sent_per_rank / B
    latency_time: float  # steps x alpha, over the whole pass
    link: str = ""

    @property
    def total_time(self) -> float:
        return self.bandwidth_time + self.latency_time

    @property
    def latency_fraction(self) -> float:
        """Share of the time spent in latency: near 1 means latency-bound."""
        return self.latency_time / self.total_time if self.total_time else 0.0


def tp_comm_cost(model: str | ModelSpec, tp: int, tokens: int, link, dtype: str = "fp16",
                 sp: bool = False) -> CommCost:
    """Tensor-parallel communication of one forward pass over ``tokens`` tokens.

    Each layer's attention and MLP end in a row-parallel linear whose partial sums are
    all-reduced: 2 all-reduces per layer, each of a ``tokens x hidden`` activation. With
    sequence parallelism (``sp``) each becomes a reduce-scatter plus an all-gather: twice as
    many collectives, exactly the same bytes and latency steps.
    """
    spec = get_model(model)
    tp = _check_p(tp)
    if not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a positive int (batch x new tokens), got {tokens!r}")
    tokens = int(tokens)
    message = int(math.ceil(tokens * spec.hidden * dtype_bytes(dtype)))
    blocks = 2 * spec.layers if tp > 1 else 0  # attention + MLP per layer
    if sp:
        kinds, name = ("reduce_scatter", "allgather"), "reduce_scatter+allgather"
    else:
        kinds, name = ("allreduce",), "allreduce"
    sent = bw = lat = 0.0
    for kind in kinds:
        ab = _link_alpha_beta(link, kind)
        per_call = _byte_factor(kind, tp) * message
        sent += blocks * per_call
        bw += blocks * per_call * ab.beta
        lat += blocks * collective_steps(kind, tp) * ab.alpha if tp > 1 else 0.0
    count = blocks * len(kinds)
    return CommCost(name, tp, tokens, count, message, blocks * message, sent, bw, lat, _link_name(link))


def decode_allreduce_cost(model: str | ModelSpec, tp: int, batch: int, link,
                          dtype: str = "fp16") -> CommCost:
    """TP all-reduces of one decode step: one new token per sequence, ``batch`` sequences.

    For a 70B model at TP=4 and batch 1: 160 all-reduces of 16 KiB.
    """
    return tp_comm_cost(model, tp, batch, link, dtype)


def prefill_allreduce_cost(model: str | ModelSpec, tp: int, prompt_len: int, link,
                           batch: int = 1, dtype: str = "fp16") -> CommCost:
    """TP all-reduces of a prefill over ``batch`` prompts of ``prompt_len`` tokens: the same
    count as a decode step, ``prompt_len`` times bigger messages."""
    return tp_comm_cost(model, tp, batch * prompt_len, link, dtype)


def ep_alltoall_cost(model: str | ModelSpec, ep: int, tokens: int, link,
                     dtype: str = "fp16") -> CommCost:
    """Expert-parallel all-to-alls of one forward pass: per MoE layer, one dispatch and one
    combine, each rank's buffer holding ``tokens x top_k`` hidden vectors. Assumes uniform
    routing (a share (ep-1)/ep leaves the rank) and ignores the small count exchange."""
    spec = get_model(model)
    if not spec.is_moe:
        raise ValueError(f"{spec.name} has no experts; use a MoE model such as 'mixtral-8x7b'")
    ep = _check_p(ep)
    if spec.experts % ep:
        raise ValueError(f"ep={ep} must divide the {spec.experts} experts of {spec.name}")
    message = int(math.ceil(tokens * spec.top_k * spec.hidden * dtype_bytes(dtype)))
    count = 2 * spec.layers if ep > 1 else 0
    ab = _link_alpha_beta(link, "alltoall")
    sent = count * alltoall_bytes(message, ep)
    lat = count * collective_steps("alltoall", ep) * ab.alpha if ep > 1 else 0.0
    return CommCost("alltoall", ep, tokens, count, message, count * message, sent,
                    sent * ab.beta, lat, _link_name(link))


# --------------------------------------------------------------------------------------------
# Compute: roofline
# --------------------------------------------------------------------------------------------
def forward_flops(model: str | ModelSpec, batch: int = 1, new_tokens: int = 1,
                  context_len: int = 0, per_layer: bool = False) -> float:
    """FLOPs of a forward pass over ``batch x new_tokens`` tokens after ``context_len`` cached.

    2 FLOPs per active weight per token (embedding lookups are free, the LM head is not)
    plus attention: QK^T and AV cost 4 x heads x head_dim FLOPs per (query, key) pair, with
    causal masking (query i sees context_len + i keys). ``per_layer`` gives one decoder layer.
    """
    spec = get_model(model)
    tokens = batch * new_tokens
    parts = layer_breakdown(spec)
    layer_weights = parts["attention"] + parts["mlp"] * spec.top_k // spec.experts + parts["router"]
    pairs = batch * (new_tokens * context_len + new_tokens * (new_tokens + 1) // 2)
    layer = 2 * layer_weights * tokens + 4 * spec.heads * spec.head_dim * pairs
    if per_layer:
        return float(layer)
    head = 2 * spec.hidden * spec.vocab * tokens
    return float(spec.layers * layer + head)


@dataclass(frozen=True)
class ComputeCost:
    """Roofline estimate on one GPU: time is the larger of FLOPs/peak and bytes/HBM bandwidth."""

    flops: float
    bytes: float
    compute_time: float
    memory_time: float
    gpu: str = ""

    @property
    def time(self) -> float:
        return max(self.compute_time, self.memory_time)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_time >= self.memory_time else "memory"


def roofline_time(model: str | ModelSpec, gpu: str | GPUSpec, *, batch: int = 1,
                  new_tokens: int = 1, context_len: int = 0, dtype: str = "fp16",
                  tp: int = 1, per_layer: bool = False, efficiency: float = 1.0) -> ComputeCost:
    """Roofline time of a forward pass on one of ``tp`` ranks.

    Bytes read: the weights the tokens touch (for MoE, at most ``batch x new_tokens x top_k``
    experts per layer) and the KV cache of ``context_len + new_tokens`` positions, both split
    over TP ranks (KV heads replicated when TP exceeds them). Activations are ignored.
    ``efficiency`` scales both peaks (1.0 = datasheet; measured GEMMs reach ~0.8).
    """
    spec = get_model(model)
    g = get_gpu(gpu)
    tp = _check_p(tp)
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    kv_per_rank = kv_heads_per_rank(spec, tp)
    tokens = batch * new_tokens
    parts = layer_breakdown(spec)
    experts_touched = min(spec.experts, tokens * spec.top_k)
    layer_weights = (parts["attention"] + parts["mlp"] * experts_touched // spec.experts) / tp \
        + parts["router"] + parts["norms"]
    kv_values = 2 * kv_per_rank * spec.head_dim * batch * (context_len + new_tokens)
    layer_bytes = (layer_weights + kv_values) * dtype_bytes(dtype)
    flops = forward_flops(spec, batch, new_tokens, context_len, per_layer=True) / tp
    if not per_layer:
        head_bytes = (spec.hidden * spec.vocab / tp + spec.hidden) * dtype_bytes(dtype)
        layer_bytes = spec.layers * layer_bytes + head_bytes
        flops = forward_flops(spec, batch, new_tokens, context_len) / tp
    return ComputeCost(flops, layer_bytes, flops / (g.bf16_flops * efficiency),
                       layer_bytes / (g.hbm_bandwidth * efficiency), g.name)


@dataclass(frozen=True)
class StepEstimate:
    """One forward pass under TP: compute (roofline) plus communication, no overlap."""

    compute: ComputeCost
    comm: CommCost

    @property
    def total_time(self) -> float:
        return self.compute.time + self.comm.total_time

    @property
    def comm_fraction(self) -> float:
        return self.comm.total_time / self.total_time


def tp_step_estimate(model: str | ModelSpec, gpu: str | GPUSpec, tp: int, link=None, *,
                     batch: int = 1, new_tokens: int = 1, context_len: int = 0,
                     dtype: str = "fp16", efficiency: float = 1.0) -> StepEstimate:
    """Decode (``new_tokens=1``) or prefill step time at TP degree ``tp``: roofline compute
    on ``gpu`` plus TP all-reduces on ``link`` (default: the GPU's own link preset)."""
    g = get_gpu(gpu)
    compute = roofline_time(model, g, batch=batch, new_tokens=new_tokens, context_len=context_len,
                            dtype=dtype, tp=tp, efficiency=efficiency)
    comm = tp_comm_cost(model, tp, batch * new_tokens, link or g.link, dtype)
    return StepEstimate(compute, comm)
