"""Choose a parallel layout (TP x PP x DP, and EP for mixture-of-experts) for a model on a set
of GPUs, by computing what each layout costs.

>>> from shardlab.planner import plan
>>> best = plan("llama3-70b", 4, 80, "nvlink-h100", "inference")[0]
>>> (best.tp, best.pp, best.dp)
(4, 1, 1)

The planner enumerates every ``tp x pp x dp == gpus`` layout, rejects the ones whose shapes do
not split (a TP degree that does not divide the heads) or that do not fit in memory, and ranks
the rest by one number computed from :mod:`shardlab.memory`, :mod:`shardlab.cost` and
:mod:`shardlab.pipeline`. Nothing is hand-tuned per case: the course's conclusions (TP inside an
NVLink domain for online inference, not TP over PCIe under load, TP=8 x PP=2 for 405B on two
nodes) come out of the arithmetic below.

How a layout is scored
======================
**Fits in memory** (both workloads): the most loaded GPU's bytes, from
:func:`shardlab.memory.memory_per_gpu`, must be at most ``memory_utilization x gpu_memory_gb``
(default 90%, vLLM's default ``--gpu-memory-utilization``; the rest is CUDA context, the NCCL
buffers and fragmentation). For inference the bytes are weights + **KV cache for ``batch``
sequences of ``context`` tokens** + the activations of one step; for training, weights +
gradients + optimizer state (mixed-precision Adam, ZeRO stage ``zero`` over DP) + the
activations 1F1B keeps in flight. Leaving the KV cache out of the check is how bandwidth-only
calculators call layouts "good" that cannot hold a single long conversation (errata 10).

**Inference** is scored by the **time per output token** (TPOT) of a decode step in a server
that runs continuous batching with chunked prefill, under the requested load:

* each model replica (there are ``dp``) serves ``batch / dp`` sequences; in steady state every
  sequence lives ``output_tokens`` steps, so each step also carries the prompt tokens of the
  requests that arrive meanwhile: ``batch/dp x prompt/output_tokens`` prefill tokens, where
  ``prompt = context - output_tokens``;
* compute of one step on one GPU is a roofline: the larger of FLOPs / peak and bytes read
  (its weights and its share of the KV cache) / HBM bandwidth (:func:`~shardlab.cost.roofline_time`
  pieces; ``efficiency`` scales both peaks);
* TP adds 2 all-reduces per layer (:func:`~shardlab.cost.tp_comm_cost`), each paying the
  alpha-beta time: **2(p-1) latency steps** plus 2(p-1)/p x bytes / bandwidth. Both terms are
  reported; at small batches the latency term is the larger one (errata 1);
* PP runs ``m = min(pp, batch/dp)`` micro-batches in flight (vLLM's virtual engines): a token
  crosses the ``pp`` stages one after another, so TPOT = pp x (stage compute + stage TP comm)
  + the p2p hops between stages. With ``m < pp`` stages sit idle: the **bubble**
  ``1 - m x stage time / TPOT``;
* EP (MoE models, ``ep = tp``): each rank holds whole experts; the attention all-reduce stays,
  the MLP all-reduce becomes a dispatch and a combine all-to-all (:func:`~shardlab.cost.ep_alltoall_cost`).

Communication, compute and p2p are added without overlap (an upper bound on real engines that
overlap some of it). ``objective="latency"`` (online serving, the default) ranks by TPOT;
``objective="throughput"`` (offline) gives each replica as many sequences as its memory holds,
up to ``batch``, and ranks by output tokens per second of the whole deployment. The time to
first token of one prompt alone (``ttft``) is reported, not scored.

**Training** is scored by **throughput** (tokens per second) of one optimizer step of ``batch``
sequences of ``context`` tokens: ``m = batch / dp`` micro-batches of one sequence each go
through a 1F1B pipeline, step = (m + pp - 1) x (forward + backward of one micro-batch on one
stage, incl. 4 TP collectives per layer and 2 p2p hops) + the DP gradient all-reduce. The
``(pp-1)`` extra slots are the bubble, (p-1)/(m+p-1)
(:func:`~shardlab.pipeline.bubble_fraction_closed_form`). Sequence parallelism is on whenever
TP > 1 (same communication volume, activations / tp).

**Placement**: ranks are numbered TP fastest (TP ranks adjacent, so a TP group stays in one
node whenever ``tp <= gpus_per_node``), then PP, then DP for inference (a replica stays
together), then DP, then PP for training (Megatron's order: the big gradient all-reduce stays
inside a node when it can, the small p2p sends cross nodes). A collective or hop whose ranks
sit on different nodes runs on ``inter_node_link`` (one NIC per GPU), else on ``link``.

Only the standard library and the arithmetic modules above are imported (no torch), so the
planner can run in an in-browser Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .cost import ep_alltoall_cost, forward_flops, p2p_time, allreduce_time, tp_comm_cost
from .hardware import (
    CONNECTION_LEVELS,
    GB,
    GPUSpec,
    LinkSpec,
    Topology,
    TPVerdict,
    get_gpu,
    get_link,
    nvlink_bandwidth,
    parse_topology,
    tp_verdict,
)
from .memory import (
    MemoryReport,
    ModelSpec,
    activation_bytes,
    dtype_bytes,
    get_model,
    memory_per_gpu,
)
from .pipeline.simulator import bubble_fraction_closed_form

__all__ = [
    "WORKLOADS",
    "OBJECTIVES",
    "DEFAULT_GPU_FOR_LINK",
    "Layout",
    "Plan",
    "plan",
    "evaluate",
    "serving_command",
    "TopologyAdvice",
    "topology_advice",
]

WORKLOADS = ("inference", "training")
OBJECTIVES = ("latency", "throughput")

# Whose compute (HBM bandwidth, peak FLOP/s) to assume when `gpu` is not given: the GPU that
# link preset belongs to; for PCIe and network links, an H100 ("the same GPU without NVLink").
DEFAULT_GPU_FOR_LINK = {"nvlink-a100": "a100-80gb", "nvlink-h100": "h100-80gb",
                        "nvlink-h200": "h200-141gb"}
_FALLBACK_GPU = "h100-80gb"

# Default load when `batch` is None: concurrent sequences for online inference, the cap per
# replica for offline inference, global batch (sequences) per optimizer step for training.
_DEFAULT_BATCH = {("inference", "latency"): 32, ("inference", "throughput"): 256,
                  ("training", "throughput"): 512, ("training", "latency"): 512}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One candidate layout and what it costs.

    Times are seconds. For inference, ``step_time`` is the time per output token (one decode
    step, prefill share included) and ``throughput`` output tokens/s of the whole deployment;
    for training, ``step_time`` is one optimizer step and ``throughput`` tokens/s.
    ``compute_time + comm_latency + comm_bandwidth + p2p_time (+ bubble_time)`` adds up to
    ``step_time`` (inference: ``bubble_time`` is 0, the idle share is ``bubble``).
    ``rejected`` says why a layout was left out (then the timings may be 0).
    """

    tp: int
    pp: int
    dp: int
    ep: int = 1
    dtype: str = "fp16"
    workload: str = "inference"
    memory: MemoryReport | None = None
    capacity_gb: float = 0.0
    links: dict = field(default_factory=dict)
    compute_time: float = 0.0
    comm_latency: float = 0.0
    comm_bandwidth: float = 0.0
    p2p_time: float = 0.0
    bubble_time: float = 0.0
    bubble: float = 0.0
    step_time: float = 0.0
    throughput: float = 0.0
    ttft: float | None = None
    microbatches: int = 1
    batch: int = 1  # sequences per replica (inference) or global batch (training)
    context: int = 0
    nodes: int = 1
    reason: str = ""
    rejected: str | None = None

    def __repr__(self) -> str:
        if self.rejected:
            return f"Layout({self.label}, rejected: {self.rejected})"
        what = (f"{self.step_time * 1e3:.1f} ms per token" if self.workload == "inference"
                else f"{self.throughput:,.0f} tokens/s")
        return f"Layout({self.label}, {self.dtype}, {what}, {self.memory_gb:.1f} GB per GPU)"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def degrees(self) -> tuple[int, int, int]:
        """``(tp, pp, dp)``: the layout as a tuple, e.g. for a drill's answer."""
        return (self.tp, self.pp, self.dp)

    @property
    def label(self) -> str:
        ep = f" (EP={self.ep})" if self.ep > 1 else ""
        return f"TP={self.tp} x PP={self.pp} x DP={self.dp}{ep}"

    @property
    def comm_time(self) -> float:
        """All communication on the critical path: collectives (latency + bandwidth) and p2p."""
        return self.comm_latency + self.comm_bandwidth + self.p2p_time

    @property
    def time_per_token(self) -> float:
        """Inference: TPOT (= ``step_time``). Training: seconds per token processed."""
        if self.workload == "inference":
            return self.step_time
        return 1.0 / self.throughput if self.throughput else math.inf

    @property
    def memory_gb(self) -> float:
        """Bytes on the most loaded GPU, in GB (0 when the shapes did not split)."""
        return self.memory.total / GB if self.memory is not None else 0.0

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory_gb <= self.capacity_gb

    def row(self) -> dict:
        """The layout as a flat dict (ms and GB, rounded) for tables."""
        ms = lambda s: round(s * 1e3, 2)  # noqa: E731
        row = {"layout": self.label, "tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep,
               "dtype": self.dtype, "GB/GPU": round(self.memory_gb, 1)}
        if self.rejected:
            row["rejected"] = self.rejected
            return row
        time_key = "ms/token" if self.workload == "inference" else "ms/step"
        row.update({time_key: ms(self.step_time), "compute ms": ms(self.compute_time),
                    "comm latency ms": ms(self.comm_latency),
                    "comm bandwidth ms": ms(self.comm_bandwidth), "p2p ms": ms(self.p2p_time),
                    "bubble": round(self.bubble, 3), "tokens/s": round(self.throughput)})
        if self.ttft is not None:
            row["TTFT ms"] = ms(self.ttft)
        row["reason"] = self.reason
        return row


class Plan(list):
    """The fitting layouts, best first (a list, so ``plan(...)[0]`` is the recommendation),
    with the rest of the story as attributes:

    * ``rejected``: layouts left out, each with ``.rejected`` saying why, in numbers;
    * ``advice``: lines worth reading (e.g. what int8/fp8 weights would buy);
    * ``alternatives``: e.g. ``{"int8": Layout}``, the best layout at another precision;
    * ``inputs``: the arguments after defaults were filled in, and the GPU assumed for compute.
    """

    def __init__(self, layouts, *, rejected, inputs, advice, alternatives):
        super().__init__(layouts)
        self.rejected = list(rejected)
        self.inputs = dict(inputs)
        self.advice = list(advice)
        self.alternatives = dict(alternatives)

    @property
    def best(self) -> Layout | None:
        return self[0] if self else None

    @property
    def workload(self) -> str:
        return self.inputs["workload"]

    def table(self, rejected: bool = False) -> list[dict]:
        """Rows (see :meth:`Layout.row`) of the ranked layouts, and of the rejected ones too
        when ``rejected``."""
        rows = [dict(rank=n + 1, **lay.row()) for n, lay in enumerate(self)]
        if rejected:
            rows += [dict(rank="-", **lay.row()) for lay in self.rejected]
        return rows

    def summary(self) -> str:
        """A few lines: the inputs, the ranked layouts with their reasons, the rejected ones."""
        i = self.inputs
        head = (f"{i['model_name']} on {i['gpus']} x {i['gpu_memory_gb']:g} GB GPUs over {i['link']}"
                f" ({i['nodes']} node{'s' if i['nodes'] > 1 else ''}), {i['workload']}"
                f" [{i['objective']}], context {i['context']}, batch {i['batch']}, {i['dtype']}")
        lines = [head]
        lines += [f"  {n + 1}. {lay.reason}" for n, lay in enumerate(self)]
        lines += [f"  x  {lay.label}: {lay.rejected}" for lay in self.rejected]
        lines += [f"  note: {a}" for a in self.advice]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        best = self.best.label if self else "nothing fits"
        return (f"Plan({self.inputs['model_name']}, {self.inputs['gpus']} GPUs, "
                f"{self.inputs['workload']}: {len(self)} layouts, {len(self.rejected)} rejected; "
                f"best {best})")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _positive_int(name: str, value, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")
    return value


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _resolve_gpu(gpu, link: LinkSpec) -> GPUSpec:
    if gpu is None:
        gpu = DEFAULT_GPU_FOR_LINK.get(link.name, _FALLBACK_GPU)
    return get_gpu(gpu)


# --------------------------------------------------------------------------------------------
# Placement: which link each group uses
# --------------------------------------------------------------------------------------------
def _placement(tp: int, pp: int, dp: int, workload: str, gpus_per_node: int, link: LinkSpec,
               inter: LinkSpec, single_node: bool) -> dict:
    """Links of the TP group, of each PP boundary and of the DP group for the rank order
    TP-PP-DP (inference) or TP-DP-PP (training). Consecutive placement: a group crosses nodes
    when its lowest and highest rank sit on different nodes."""
    def rank(t: int, s: int, d: int) -> int:
        if workload == "inference":
            return (d * pp + s) * tp + t
        return (s * dp + d) * tp + t

    def node(r: int) -> int:
        return 0 if single_node else r // gpus_per_node

    def crosses(ranks) -> bool:
        nodes = {node(r) for r in ranks}
        return len(nodes) > 1

    tp_cross = any(crosses(rank(t, s, d) for t in range(tp)) for s in range(pp) for d in range(dp))
    dp_cross = any(crosses(rank(t, s, d) for d in range(dp)) for t in range(tp) for s in range(pp))
    hops = []
    for s in range(pp - 1):
        cross = any(node(rank(t, s, d)) != node(rank(t, s + 1, d)) for t in range(tp) for d in range(dp))
        hops.append(inter if cross else link)
    return {"tp": inter if tp_cross else link, "dp": inter if dp_cross else link, "pp": hops}


# --------------------------------------------------------------------------------------------
# Scoring one layout
# --------------------------------------------------------------------------------------------
def _act_dtype(dtype: str) -> str:
    # Activations travel in the compute precision: quantized weights still all-reduce fp16.
    return dtype if dtype_bytes(dtype) >= 2 else "fp16"


def _comm_per_stage(spec: ModelSpec, tp: int, ep: int, tokens: int, tp_link: LinkSpec,
                    act_dtype: str, stage_layers: int, sp: bool = False) -> tuple[float, float]:
    """(latency, bandwidth) seconds of one stage's TP (and EP) collectives in one forward."""
    share = stage_layers / spec.layers
    c = tp_comm_cost(spec, tp, tokens, tp_link, act_dtype, sp=sp)
    if ep == 1:
        return c.latency_time * share, c.bandwidth_time * share
    # EP: attention keeps its all-reduce (half of TP's), the MoE block becomes all-to-alls of
    # the tokens each rank owns.
    a = ep_alltoall_cost(spec, ep, max(1, math.ceil(tokens / ep)), tp_link, act_dtype)
    return (c.latency_time / 2 + a.latency_time) * share, (c.bandwidth_time / 2 + a.bandwidth_time) * share


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _memory_reason(mem: MemoryReport, capacity: float, util: float, gpu_memory_gb: float) -> str:
    parts = [f"weights {_gb(mem.weights)}"]
    if mem.kv_cache:
        parts.append(f"KV cache {_gb(mem.kv_cache)}")
    parts.append(f"activations {_gb(mem.activations)}")
    if mem.gradients:
        parts.append(f"gradients {_gb(mem.gradients)}")
    if mem.optimizer:
        parts.append(f"optimizer {_gb(mem.optimizer)}")
    usable = f"{capacity / GB:.1f} GB usable ({util:.0%} of {gpu_memory_gb:g} GB)" if util < 1 \
        else f"{gpu_memory_gb:g} GB"
    return f"needs {_gb(mem.total)} GB per GPU > {usable}: {' + '.join(parts)}"


def _link_note(links: dict, tp: int, pp: int, dp: int) -> str:
    notes = []
    if tp > 1:
        notes.append(f"TP over {links['tp'].name}")
    if pp > 1:
        names = sorted({h.name for h in links["pp"]})
        notes.append(f"PP hops over {'/'.join(names)}")
    return ", ".join(notes)


def _score_inference(spec, tp, pp, dp, ep, *, gpu, dtype, context, output_tokens, batch,
                     objective, capacity, links, efficiency) -> dict:
    """Everything but the memory verdict for one inference layout (see the module docstring)."""
    prompt = context - output_tokens
    act = _act_dtype(dtype)
    base = memory_per_gpu(spec, dtype=dtype, batch=1, seq_len=context, tp=tp, pp=pp, dp=dp,
                          workload="inference", flash_attention=True)
    per_seq_kv = base.kv_cache
    if objective == "throughput":
        # Offline: as many sequences per replica as the memory holds, capped at `batch`.
        room = capacity - base.weights - base.activations
        b_rep = max(1, min(batch, int(room // per_seq_kv) if room > 0 else 1))
    else:
        b_rep = max(1, math.ceil(batch / dp))
    m = min(pp, b_rep)
    b_mb = math.ceil(b_rep / m)
    prefill_rep = math.ceil(b_rep * prompt / output_tokens)  # prompt tokens per step (chunked prefill)
    pf_mb = math.ceil(prefill_rep / m)
    tokens_mb = b_mb + pf_mb

    mem = memory_per_gpu(spec, dtype=dtype, batch=b_rep, seq_len=context, tp=tp, pp=pp, dp=dp,
                         workload="inference", flash_attention=True)
    mem = replace(mem, activations=activation_bytes(spec, 1, tokens_mb, act, training=False, tp=tp,
                                                    flash_attention=True))

    # One stage, one micro-batch: roofline of its decode tokens (at the average context) and
    # its share of prefill tokens.
    avg_ctx = prompt + output_tokens // 2
    flops = forward_flops(spec, b_mb, 1, avg_ctx) + pf_mb / prompt * forward_flops(spec, 1, prompt, 0)
    flops_stage = flops / (tp * pp)
    kv_read = mem.kv_cache * (b_mb / b_rep) * (avg_ctx / context)
    bytes_stage = mem.weights + kv_read
    t_compute = max(flops_stage / (gpu.bf16_flops * efficiency),
                    bytes_stage / (gpu.hbm_bandwidth * efficiency))
    stage_layers = math.ceil(spec.layers / pp)
    lat, bw = _comm_per_stage(spec, tp, ep, tokens_mb, links["tp"], act, stage_layers)
    t_stage = t_compute + lat + bw
    hop_bytes = tokens_mb * spec.hidden * dtype_bytes(act)
    hops = sum((p2p_time(hop_bytes, h) for h in links["pp"]), 0.0)
    tpot = pp * t_stage + hops
    bubble = 1.0 - m * t_stage / tpot if tpot else 0.0

    # Time to first token of one prompt alone: every layer at TP, stages in turn.
    prefill_flops = forward_flops(spec, 1, prompt, 0) / tp
    t_prefill = max(prefill_flops / (gpu.bf16_flops * efficiency),
                    mem.weights * pp / (gpu.hbm_bandwidth * efficiency))
    p_lat, p_bw = _comm_per_stage(spec, tp, ep, prompt, links["tp"], act, spec.layers)
    p_hops = sum((p2p_time(prompt * spec.hidden * dtype_bytes(act), h) for h in links["pp"]), 0.0)
    ttft = t_prefill + p_lat + p_bw + p_hops

    return dict(memory=mem, compute_time=pp * t_compute, comm_latency=pp * lat,
                comm_bandwidth=pp * bw, p2p_time=hops, bubble=bubble, step_time=tpot,
                throughput=dp * b_rep / tpot, ttft=ttft, microbatches=m, batch=b_rep)


def _score_training(spec, tp, pp, dp, ep, *, gpu, dtype, context, batch, links, efficiency,
                    zero) -> dict:
    act = _act_dtype(dtype)
    sp = tp > 1
    mem = memory_per_gpu(spec, dtype=dtype, batch=1, seq_len=context, tp=tp, pp=pp, dp=dp,
                         workload="training", zero=zero, flash_attention=True, sp=sp)
    m = max(1, math.ceil(batch / dp))  # micro-batches of one sequence per pipeline
    stage_layers = math.ceil(spec.layers / pp)
    # Forward + backward (about twice the forward) of one micro-batch on one stage.
    t_compute = 3 * forward_flops(spec, 1, context, 0) / (tp * pp) / (gpu.bf16_flops * efficiency)
    lat, bw = _comm_per_stage(spec, tp, ep, context, links["tp"], act, stage_layers, sp=sp)
    lat, bw = 2 * lat, 2 * bw  # the backward mirrors the forward's collectives
    hop = max((p2p_time(context * spec.hidden * dtype_bytes(act), h) for h in links["pp"]), default=0.0)
    t_mb = t_compute + lat + bw + 2 * hop
    # DP: all-reduce the gradients of this rank's shard (2 bytes each), once per step.
    grad_bytes = mem.weights / dtype_bytes(dtype) * 2
    dp_link = links["dp"]
    dp_time = allreduce_time(grad_bytes, dp, dp_link) if dp > 1 else 0.0
    dp_lat = 2 * (dp - 1) * dp_link.alpha if dp > 1 else 0.0
    step = (m + pp - 1) * t_mb + dp_time
    return dict(memory=mem, compute_time=m * t_compute, comm_latency=m * lat + dp_lat,
                comm_bandwidth=m * bw + (dp_time - dp_lat), p2p_time=m * 2 * hop,
                bubble_time=(pp - 1) * t_mb, bubble=bubble_fraction_closed_form("1f1b", pp, m),
                step_time=step, throughput=batch * context / step, ttft=None, microbatches=m,
                batch=batch)


def _inference_reason(lay: Layout, objective: str = "latency") -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    parts = [f"compute {ms(lay.compute_time)}"]
    if lay.tp > 1:
        kind = "all-reduce/all-to-all" if lay.ep > 1 else "all-reduce"
        parts.append(f"{kind} latency {ms(lay.comm_latency)} + bandwidth {ms(lay.comm_bandwidth)}")
    if lay.pp > 1:
        parts.append(f"p2p {ms(lay.p2p_time)}")
    links = _link_note(lay.links, lay.tp, lay.pp, lay.dp)
    extra = f"; {links}" if links else ""
    if lay.pp > 1:
        extra += f"; {lay.microbatches} micro-batch{'es' if lay.microbatches > 1 else ''} in flight, " \
                 f"idle {lay.bubble:.0%}"
    lead = f"{lay.label}: "
    if objective == "throughput":
        lead += f"{lay.throughput:,.0f} tokens/s with {lay.batch} sequence{'s' if lay.batch > 1 else ''} per replica, "
    return (f"{lead}{ms(lay.step_time)} ms per token = {' + '.join(parts)}{extra}; "
            f"{lay.memory_gb:.1f} of {lay.capacity_gb:.1f} GB per GPU")


def _training_reason(lay: Layout) -> str:
    sec = lambda s: f"{s:.2f}"  # noqa: E731
    parts = [f"compute {sec(lay.compute_time)}",
             f"collectives {sec(lay.comm_latency + lay.comm_bandwidth)}"]
    if lay.pp > 1:
        parts += [f"p2p {sec(lay.p2p_time)}", f"bubble {sec(lay.bubble_time)} ({lay.bubble:.0%})"]
    links = _link_note(lay.links, lay.tp, lay.pp, lay.dp)
    dp = f", DP all-reduce over {lay.links['dp'].name}" if lay.dp > 1 else ""
    return (f"{lay.label}: {lay.throughput:,.0f} tokens/s, step {sec(lay.step_time)} s = "
            f"{' + '.join(parts)}{'; ' + links if links else ''}{dp}; "
            f"{lay.memory_gb:.1f} of {lay.capacity_gb:.1f} GB per GPU")


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------
def _setup(model, gpus, gpu_memory_gb, link, workload, *, context, batch, output_tokens, dtype,
           objective, gpus_per_node, inter_node_link, gpu, memory_utilization, efficiency,
           zero) -> dict:
    """Check every input (ValueError saying what to change) and fill in the defaults."""
    spec = get_model(model)
    _positive_int("gpus", gpus, " (the number of GPUs, e.g. 4)")
    gpu_memory_gb = _positive_number("gpu_memory_gb", gpu_memory_gb)
    link_spec = get_link(link)
    inter_spec = get_link(inter_node_link)
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(map(repr, WORKLOADS))}, got {workload!r}")
    if objective is None:
        objective = "latency" if workload == "inference" else "throughput"
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    if workload == "training" and objective != "throughput":
        raise ValueError("training is ranked by throughput; use objective='throughput' (or leave it out)")
    _positive_int("context", context)
    _positive_int("gpus_per_node", gpus_per_node)
    if batch is None:
        batch = _DEFAULT_BATCH[(workload, objective)]
    _positive_int("batch", batch)
    dtype_bytes(dtype)  # validates the name
    if workload == "inference":
        _positive_int("output_tokens", output_tokens)
        if output_tokens >= context:
            raise ValueError(f"output_tokens ({output_tokens}) must be smaller than context ({context}): "
                             f"context counts the prompt and the output")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be a ZeRO stage 0, 1, 2 or 3, got {zero!r}")
    single_node = gpus <= gpus_per_node
    if not single_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not fill nodes of {gpus_per_node}: use a multiple of "
                         f"gpus_per_node ({gpus_per_node}), or set gpus_per_node")
    return dict(spec=spec, model=model, gpus=gpus, gpu_memory_gb=gpu_memory_gb, link=link_spec,
                inter=inter_spec, workload=workload, objective=objective, context=context,
                batch=batch, output_tokens=output_tokens, dtype=dtype,
                gpus_per_node=gpus_per_node, single_node=single_node,
                nodes=1 if single_node else gpus // gpus_per_node,
                gpu=_resolve_gpu(gpu, link_spec), memory_utilization=memory_utilization,
                capacity=memory_utilization * gpu_memory_gb * GB, efficiency=efficiency, zero=zero)


def _evaluate(st: dict, tp: int, pp: int, dp: int, ep: int) -> Layout:
    """Score one layout; a Layout with ``rejected`` set when it does not split or fit."""
    spec, workload = st["spec"], st["workload"]
    common = dict(tp=tp, pp=pp, dp=dp, ep=ep, dtype=st["dtype"], workload=workload,
                  capacity_gb=st["capacity"] / GB, context=st["context"], nodes=st["nodes"])
    if pp > spec.layers:
        return Layout(**common, rejected=f"pp={pp} exceeds the {spec.layers} layers of {spec.name}")
    if ep > 1 and (not spec.is_moe or spec.experts % ep or ep != tp):
        return Layout(**common, rejected=f"ep={ep}: expert parallelism here spreads the experts of a "
                                         f"MoE model over its TP group (ep = tp, dividing the experts)")
    links = _placement(tp, pp, dp, workload, st["gpus_per_node"], st["link"], st["inter"],
                       st["single_node"])
    try:
        if workload == "inference":
            scores = _score_inference(spec, tp, pp, dp, ep, gpu=st["gpu"], dtype=st["dtype"],
                                      context=st["context"], output_tokens=st["output_tokens"],
                                      batch=st["batch"], objective=st["objective"],
                                      capacity=st["capacity"], links=links,
                                      efficiency=st["efficiency"])
        else:
            scores = _score_training(spec, tp, pp, dp, ep, gpu=st["gpu"], dtype=st["dtype"],
                                     context=st["context"], batch=st["batch"], links=links,
                                     efficiency=st["efficiency"], zero=st["zero"])
    except ValueError as err:  # the shapes do not split this way
        return Layout(**common, rejected=str(err))
    lay = Layout(**common, links=links, **scores)
    if not lay.fits:
        return replace(lay, rejected=_memory_reason(lay.memory, st["capacity"],
                                                    st["memory_utilization"], st["gpu_memory_gb"]))
    why = _inference_reason(lay, st["objective"]) if workload == "inference" else _training_reason(lay)
    return replace(lay, reason=why)


_PLAN_DOC_KWARGS = """
    Keyword arguments: ``context`` tokens per sequence (inference: prompt + output, what the KV
    cache holds; training: sequence length); ``batch`` concurrent sequences (inference, default
    32; offline: the cap per replica, default 256) or the global batch in sequences (training,
    default 512); ``output_tokens`` generated per request; ``dtype`` of weights (and KV cache);
    ``objective`` ``"latency"`` (inference default: time per output token) or ``"throughput"``
    (training default; for inference, offline serving); ``gpus_per_node`` and
    ``inter_node_link`` (a LINKS key) for multi-node layouts; ``gpu`` whose compute to assume
    (a :data:`~shardlab.hardware.GPUS` key; default the GPU of the link preset, else H100);
    ``memory_utilization`` the share of memory a layout may fill (default 0.9);
    ``efficiency`` of the roofline peaks (default 1.0, datasheet); ``zero`` the ZeRO stage for
    training (default 1)."""


def plan(model: str | ModelSpec, gpus: int, gpu_memory_gb: float, link: str | LinkSpec,
         workload: str, *, context: int = 8192, batch: int | None = None,
         output_tokens: int = 512, dtype: str = "fp16", objective: str | None = None,
         gpus_per_node: int = 8, inter_node_link: str | LinkSpec = "ib-ndr",
         gpu: str | GPUSpec | None = None, memory_utilization: float = 0.9,
         efficiency: float = 1.0, zero: int = 1, suggest_quantization: bool = True) -> Plan:
    """Rank every ``tp x pp x dp == gpus`` layout of ``model`` (and ``ep`` for MoE models).

    ``model``: a :data:`~shardlab.memory.MODELS` key or a :class:`~shardlab.memory.ModelSpec`.
    ``gpus``: how many GPUs; ``gpu_memory_gb``: memory of each (GB = 1e9 bytes).
    ``link``: a :data:`~shardlab.hardware.LINKS` key (or a LinkSpec) for GPU-to-GPU traffic
    inside a node. ``workload``: ``"inference"`` or ``"training"``.
    {kwargs}
    ``suggest_quantization``: for fp16/bf16 inference, also plan with int8/fp8 weights and KV
    cache and say in ``.advice`` what it would buy (``.alternatives["int8"]``).

    The scoring is explained in the module docstring. Returns a :class:`Plan`: the fitting
    layouts best first, ``.rejected`` with the numbers that rule each one out, ``.advice``.
    Raises ValueError, saying what to change, for bad input.
    """
    st = _setup(model, gpus, gpu_memory_gb, link, workload, context=context, batch=batch,
                output_tokens=output_tokens, dtype=dtype, objective=objective,
                gpus_per_node=gpus_per_node, inter_node_link=inter_node_link, gpu=gpu,
                memory_utilization=memory_utilization, efficiency=efficiency, zero=zero)
    spec = st["spec"]
    ranked, rejected = [], []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            eps = [1]
            if spec.is_moe and tp > 1 and spec.experts % tp == 0:
                eps.append(tp)
            for ep in eps:
                lay = _evaluate(st, tp, pp, dp, ep)
                (rejected if lay.rejected else ranked).append(lay)

    if st["workload"] == "inference" and st["objective"] == "latency":
        ranked.sort(key=lambda x: (x.step_time, -x.throughput, x.gpus))
    else:
        ranked.sort(key=lambda x: (-x.throughput, x.step_time))
    # Rejected: closest to fitting first, shape problems last.
    rejected.sort(key=lambda x: (x.memory is None, x.memory_gb))

    inputs = _inputs(st)
    advice, alternatives = _advice(ranked, rejected, inputs, spec, model, link, inter_node_link,
                                   gpu, suggest_quantization, dtype)
    return Plan(ranked, rejected=rejected, inputs=inputs, advice=advice, alternatives=alternatives)


plan.__doc__ = plan.__doc__.format(kwargs=_PLAN_DOC_KWARGS.strip())


def _inputs(st: dict) -> dict:
    spec = st["spec"]
    return dict(model=st["model"] if isinstance(st["model"], str) else spec.name,
                model_name=spec.name, gpus=st["gpus"], gpu_memory_gb=st["gpu_memory_gb"],
                link=st["link"].name, workload=st["workload"], objective=st["objective"],
                context=st["context"], batch=st["batch"], output_tokens=st["output_tokens"],
                dtype=st["dtype"], gpus_per_node=st["gpus_per_node"], nodes=st["nodes"],
                inter_node_link=st["inter"].name, gpu=st["gpu"].name,
                memory_utilization=st["memory_utilization"], efficiency=st["efficiency"],
                zero=st["zero"])


def evaluate(model: str | ModelSpec, layout, gpu_memory_gb: float, link: str | LinkSpec,
             workload: str, *, context: int = 8192, batch: int | None = None,
             output_tokens: int = 512, dtype: str = "fp16", objective: str | None = None,
             gpus_per_node: int = 8, inter_node_link: str | LinkSpec = "ib-ndr",
             gpu: str | GPUSpec | None = None, memory_utilization: float = 0.9,
             efficiency: float = 1.0, zero: int = 1) -> Layout:
    """Score one layout exactly as :func:`plan` scores it, fitting or not.

    ``layout``: ``(tp, pp, dp)`` or ``(tp, pp, dp, ep)``. Returns a :class:`Layout` whose
    ``rejected`` is set when it does not split or fit (its timings are still computed when
    only the memory is short, so you can see what it would have cost).
    {kwargs}
    """
    try:
        degrees = tuple(layout)
    except TypeError:
        raise ValueError(f"layout must be a tuple (tp, pp, dp) or (tp, pp, dp, ep), got {layout!r}") from None
    if len(degrees) not in (3, 4):
        raise ValueError(f"layout must be a tuple (tp, pp, dp) or (tp, pp, dp, ep), got {layout!r}")
    for name, value in zip(("tp", "pp", "dp", "ep"), degrees):
        _positive_int(name, value)
    tp, pp, dp = degrees[:3]
    ep = degrees[3] if len(degrees) == 4 else 1
    st = _setup(model, tp * pp * dp, gpu_memory_gb, link, workload, context=context, batch=batch,
                output_tokens=output_tokens, dtype=dtype, objective=objective,
                gpus_per_node=gpus_per_node, inter_node_link=inter_node_link, gpu=gpu,
                memory_utilization=memory_utilization, efficiency=efficiency, zero=zero)
    return _evaluate(st, tp, pp, dp, ep)


evaluate.__doc__ = evaluate.__doc__.format(kwargs=_PLAN_DOC_KWARGS.strip())


def _advice(ranked, rejected, inputs, spec, model, link, inter_node_link, gpu,
            suggest_quantization, dtype) -> tuple[list[str], dict]:
    advice: list[str] = []
    alternatives: dict = {}
    workload = inputs["workload"]
    if not ranked:
        closest = next((r for r in rejected if r.memory is not None), None)
        if closest is not None:
            advice.append(f"nothing fits: the closest, {closest.label}, {closest.rejected}; "
                          f"add GPUs, shorten the context, lower the batch or quantize")
        else:
            advice.append("nothing fits: no layout splits this model's shapes over these GPUs")
    best = ranked[0] if ranked else None
    if best is not None and best.tp > 1 and best.links["tp"].kind != "nvlink":
        advice.append(f"the best layout runs TP over {best.links['tp'].name}, not NVLink: "
                      f"its collectives cost {(best.comm_latency + best.comm_bandwidth) * 1e3:.1f} ms "
                      f"per {'token' if workload == 'inference' else 'step'}")
    if suggest_quantization and workload == "inference" and dtype_bytes(dtype) >= 2:
        q = plan(model, inputs["gpus"], inputs["gpu_memory_gb"], link, workload,
                 context=inputs["context"], batch=inputs["batch"],
                 output_tokens=inputs["output_tokens"], dtype="int8",
                 objective=inputs["objective"], gpus_per_node=inputs["gpus_per_node"],
                 inter_node_link=inter_node_link, gpu=gpu,
                 memory_utilization=inputs["memory_utilization"],
                 efficiency=inputs["efficiency"], suggest_quantization=False)
        if q:
            qb = q[0]
            alternatives["int8"] = qb
            if best is None:
                advice.append(f"int8/fp8 weights and KV cache (1 byte each) would fit: {qb.reason}")
            else:
                key = "step_time" if inputs["objective"] == "latency" else "throughput"
                gain = best.step_time / qb.step_time if key == "step_time" else qb.throughput / best.throughput
                what = (f"{qb.step_time * 1e3:.1f} ms per token instead of {best.step_time * 1e3:.1f}"
                        if key == "step_time" else
                        f"{qb.throughput:,.0f} tokens/s instead of {best.throughput:,.0f}")
                advice.append(f"int8/fp8 weights and KV cache (1 byte each; check the accuracy on your "
                              f"task) would make it {qb.label}: {what} ({gain:.2f}x)")
    return advice, alternatives


# --------------------------------------------------------------------------------------------
# From a layout to a serving command
# --------------------------------------------------------------------------------------------
def serving_command(layout, model_id: str, *, engine: str = "vllm",
                    gpu_memory_utilization: float | None = None) -> str:
    """The ``vllm serve`` command line that runs ``layout`` (a :class:`Layout`, or any object
    or mapping with ``tp`` and ``pp``, optionally ``dp``, ``ep``, ``dtype``, ``context``,
    ``batch``, ``nodes``) for the Hugging Face model ``model_id``.

    Flags: ``--tensor-parallel-size`` and ``--pipeline-parallel-size`` always;
    ``--data-parallel-size`` for DP > 1; ``--enable-expert-parallel`` for EP > 1;
    ``--quantization fp8 --kv-cache-dtype fp8`` for a 1-byte dtype (dynamic fp8 on Hopper; for
    int4, serve a pre-quantized checkpoint: vLLM reads its format from the checkpoint);
    ``--max-model-len`` and ``--max-num-seqs`` from the layout's context and batch;
    ``--distributed-executor-backend ray`` when the layout spans nodes (start a Ray cluster
    on the nodes first and run the command on the head node).
    """
    if engine != "vllm":
        raise ValueError(f"engine must be 'vllm' (the only one this helper knows), got {engine!r}")
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError("model_id must be a Hugging Face model id, e.g. 'meta-llama/Llama-3.1-70B-Instruct'")

    def get(name, default=None):
        if isinstance(layout, dict):
            return layout.get(name, default)
        return getattr(layout, name, default)

    if get("workload", "inference") != "inference":
        raise ValueError("serving_command turns an inference layout into a command; "
                         "plan with workload='inference'")
    tp, pp, dp, ep = get("tp"), get("pp"), get("dp", 1), get("ep", 1)
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep)):
        _positive_int(f"layout.{name}", value)
    parts = ["vllm", "serve", model_id.strip(), "--tensor-parallel-size", str(tp),
             "--pipeline-parallel-size", str(pp)]
    if dp > 1:
        parts += ["--data-parallel-size", str(dp)]
    if ep > 1:
        parts.append("--enable-expert-parallel")
    dtype = get("dtype", "fp16")
    nbytes = dtype_bytes(dtype)
    if nbytes == 1:
        parts += ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    elif nbytes == 2:
        parts += ["--dtype", "bfloat16" if str(dtype).startswith("b") else "float16"]
    if get("context"):
        parts += ["--max-model-len", str(get("context"))]
    if get("batch") and get("workload", "inference") == "inference":
        parts += ["--max-num-seqs", str(get("batch"))]
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        parts += ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    if (get("nodes", 1) or 1) > 1:
        parts += ["--distributed-executor-backend", "ray"]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# From `nvidia-smi topo -m` to advice
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopologyAdvice:
    """What a machine's topology allows: the TP verdict, the NVLink groups, a layout, a link.

    ``tp`` x ``pp`` covers the chosen GPUs: TP inside groups whose every pair is NVLink,
    PP across the slower links. ``link`` is what to pass to :func:`plan` as ``link``: a
    :class:`~shardlab.hardware.LinkSpec` built from the weakest NVLink pair inside a TP group,
    or the ``pcie`` preset key when there is no NVLink (``nvidia-smi`` does not say which PCIe
    generation; check ``nvidia-smi -q``). ``visible_devices`` orders the GPUs so that each TP
    group's ranks are adjacent.
    """

    topology: Topology
    gpus: tuple[int, ...]
    verdict: TPVerdict
    nvlink_groups: tuple[tuple[int, ...], ...]
    tp: int
    pp: int
    link: LinkSpec | str
    visible_devices: str
    lines: tuple[str, ...]

    @property
    def summary(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return self.summary


def _nvlink_groups(topo: Topology, chosen: list[int]) -> list[list[int]]:
    """Connected components of the NVLink graph among ``chosen`` (in index order)."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    for g in chosen:
        if g in seen:
            continue
        comp, todo = [], [g]
        seen.add(g)
        while todo:
            x = todo.pop()
            comp.append(x)
            for y in chosen:
                if y not in seen and topo.is_nvlink(x, y):
                    seen.add(y)
                    todo.append(y)
        groups.append(sorted(comp))
    return groups


def _is_clique(topo: Topology, group: list[int]) -> bool:
    return all(topo.is_nvlink(a, b) for i, a in enumerate(group) for b in group[i + 1:])


def topology_advice(topo_text: str | Topology, gpus: int | list[int] | None = None, *,
                    pcie: str = "pcie4") -> TopologyAdvice:
    """Read ``nvidia-smi topo -m`` output and say how to split a model over ``gpus``.

    ``gpus``: how many GPUs (the first ``n``, as ``CUDA_VISIBLE_DEVICES`` would give them),
    a list of GPU indices, or None for all. Uses :func:`~shardlab.hardware.parse_topology` and
    :func:`~shardlab.hardware.tp_verdict`: TP is advisable only where every pair is NVLink;
    otherwise TP stays inside equal-sized NVLink groups (or is 1) and PP crosses the rest.
    """
    topo = topo_text if isinstance(topo_text, Topology) else parse_topology(topo_text)
    if gpus is None:
        chosen = list(range(topo.num_gpus))
    elif isinstance(gpus, bool):
        raise ValueError(f"gpus must be a count or a list of GPU indices, got {gpus!r}")
    elif isinstance(gpus, int):
        _positive_int("gpus", gpus)
        if gpus > topo.num_gpus:
            raise ValueError(f"this topology has {topo.num_gpus} GPUs; ask for at most {topo.num_gpus}")
        chosen = list(range(gpus))
    else:
        chosen = [topo._index(g) for g in gpus]
    verdict = tp_verdict(topo, chosen)  # validates the list (non-empty, no repeats)

    groups = _nvlink_groups(topo, chosen)
    names = lambda grp: "+".join(topo.gpus[i] for i in grp)  # noqa: E731
    lines = [f"{len(chosen)} GPU{'s' if len(chosen) > 1 else ''}: "
             f"{', '.join(topo.gpus[i] for i in chosen)}", f"TP across all of them: "
             f"{'advisable' if verdict.advisable else 'not advisable'} ({verdict.reason})"]
    sizes = {len(g) for g in groups}
    if verdict.advisable:
        tp, order = len(chosen), chosen
    elif len(sizes) == 1 and all(_is_clique(topo, g) for g in groups) and sizes != {1}:
        tp, order = sizes.pop(), [i for g in groups for i in g]
    else:
        tp, order = 1, chosen
    pp = len(chosen) // tp

    if tp > 1:
        tp_groups = [order[k:k + tp] for k in range(0, len(order), tp)]
        weakest = min(((a, b) for grp in tp_groups for i, a in enumerate(grp) for b in grp[i + 1:]),
                      key=lambda pair: nvlink_bandwidth(topo.link(*pair)))
        link: LinkSpec | str = topo.link_spec(*weakest)
        nv = [f"{names(g)} ({topo.link(g[0], g[1])})" for g in tp_groups]
        lines.append(f"NVLink groups: {', '.join(nv)}")
    else:
        tp_groups = [[g] for g in chosen]
        link = pcie
        lines.append("NVLink groups: none (every pair is PCIe or goes through the CPU)")
    if pp > 1:
        between = sorted({topo.link(a, b) for i, a in enumerate(order) for b in order[i + 1:]
                          if not topo.is_nvlink(a, b)},
                         key=lambda label: list(CONNECTION_LEVELS).index(label))
        worst = between[-1] if between else "?"
        inside = f"TP={tp} inside each NVLink group, " if tp > 1 else "no TP (no NVLink pair), "
        lines.append(f"suggested: {inside}PP={pp} across {'/'.join(between)} "
                     f"(the worst, {worst}: {CONNECTION_LEVELS.get(worst, '')})")
    else:
        lines.append(f"suggested: TP={tp}" + (" over NVLink" if tp > 1 else ""))
    visible = ",".join(str(i) for i in order)
    keep = "keeps each TP group's ranks adjacent" if tp > 1 else "puts the stages in this order"
    lines.append(f"CUDA_VISIBLE_DEVICES={visible} {keep}; "
                 f"plan(..., link={link.name if isinstance(link, LinkSpec) else repr(link)})")
    return TopologyAdvice(topology=topo, gpus=tuple(chosen), verdict=verdict,
                          nvlink_groups=tuple(tuple(g) for g in groups), tp=tp, pp=pp, link=link,
                          visible_devices=visible, lines=tuple(lines))
