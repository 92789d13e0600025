"""Figures for the memory wall and data parallelism (chapters 1 and 2). Each returns a Figure.

Figures are pyplot figures, so that a notebook cell ending in ``;`` shows them inline;
close them (``plt.close(fig)``) when you draw many, as the widgets do. The bytes come from
`shardlab.memory`, the times from `shardlab.cost` (through
`shardlab.data_parallel.dp_step_estimate`).
"""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..hardware import get_gpu
from ..memory import MemoryReport, ModelSpec, get_model, memory_per_gpu

__all__ = [
    "COMPONENTS", "COLORS", "inference_report", "valid_tp_degrees",
    "memory_stack_figure", "memory_per_gpu_figure", "dp_link", "dp_scaling_figure",
]

GB = 1e9
COMPONENTS = ("weights", "kv_cache", "activations", "gradients", "optimizer")
LABELS = {"weights": "weights", "kv_cache": "KV cache", "activations": "activations",
          "gradients": "gradients", "optimizer": "optimizer state"}
COLORS = {"weights": "#4c72b0", "kv_cache": "#dd8452", "activations": "#55a868",
          "gradients": "#c44e52", "optimizer": "#8172b3"}


def inference_report(model: str | ModelSpec, *, dtype: str = "fp16", kv_dtype: str = "fp16",
                     batch: int = 1, seq_len: int = 2048, tp: int = 1, pp: int = 1,
                     flash_attention: bool = True) -> MemoryReport:
    """`memory.memory_per_gpu` for inference with weights in `dtype` and the KV cache and
    activations in `kv_dtype`: weight-only quantization (int8, int4) leaves the cache as is.

    Activations are those of a prefill of the whole batch in one pass; `flash_attention`
    (the default, as in current serving engines) never materialises the score matrix."""
    kw = dict(batch=batch, seq_len=seq_len, tp=tp, pp=pp, flash_attention=flash_attention)
    weights = memory_per_gpu(model, dtype=dtype, **kw)
    rest = memory_per_gpu(model, dtype=kv_dtype, **kw)
    layout = dict(rest.layout, dtype=dtype, kv_dtype=kv_dtype)
    return MemoryReport(weights=weights.weights, kv_cache=rest.kv_cache,
                        activations=rest.activations, layout=layout)


def valid_tp_degrees(model: str | ModelSpec, candidates=(1, 2, 4, 8, 16)) -> list[int]:
    """TP degrees that split the model's heads, KV heads and FFN evenly."""
    spec = get_model(model)
    out = []
    for t in candidates:
        if spec.heads % t or spec.ffn % t:
            continue
        if t <= spec.kv_heads and spec.kv_heads % t:
            continue
        if t > spec.kv_heads and t % spec.kv_heads:
            continue
        out.append(t)
    return out


def _stack(ax, x, report: MemoryReport, width: float = 0.7, alpha: float = 1.0,
           legend: bool = True) -> float:
    bottom = 0.0
    for c in COMPONENTS:
        value = getattr(report, c) / GB
        if value <= 0:
            continue
        ax.bar(x, value, width, bottom=bottom, color=COLORS[c], alpha=alpha,
               label=LABELS[c] if legend else None, edgecolor="white", linewidth=0.5)
        bottom += value
    return bottom


def _capacity_line(ax, capacity_bytes: float, label: str) -> None:
    ax.axhline(capacity_bytes / GB, color="black", linestyle="--", linewidth=1.2, label=label)


def memory_stack_figure(reports: Mapping[str, MemoryReport], capacity_bytes: float, *,
                        title: str = "Memory per GPU", capacity_label: str | None = None,
                        ylabel: str = "GB per GPU") -> Figure:
    """Stacked bars (weights, KV cache, activations, gradients, optimizer state) of the most
    loaded GPU for each labelled layout, against the card's capacity (dashed line). Totals
    are printed on the bars; those over capacity in red."""
    if not reports:
        raise ValueError("reports is empty: pass {label: MemoryReport}")
    n = len(reports)
    fig = plt.figure(figsize=(max(6.0, 1.15 * n + 2.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    seen: set[str] = set()
    top = 0.0
    for i, (label, rep) in enumerate(reports.items()):
        seen |= {c for c in COMPONENTS if getattr(rep, c) > 0}
        total = _stack(ax, i, rep, legend=False)
        over = rep.total > capacity_bytes
        ax.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=9,
                color="#b2182b" if over else "black", fontweight="bold" if over else None)
        top = max(top, total)
    for c in COMPONENTS:  # one legend entry per component present, in stacking order
        if c in seen:
            ax.bar(0, 0, color=COLORS[c], label=LABELS[c])
    cap_label = capacity_label or f"card capacity ({capacity_bytes / GB:.0f} GB)"
    _capacity_line(ax, capacity_bytes, cap_label)
    ax.set_xticks(range(n), list(reports), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(top, capacity_bytes / GB) * 1.15)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def memory_per_gpu_figure(model: str = "llama3-70b", dtype: str = "fp16", seq_len: int = 8192,
                          batch: int = 8, tp: int = 4, gpu: str = "h100-80gb",
                          kv_dtype: str = "fp16") -> Figure:
    """Inference memory per GPU for a model, weight precision, context length, batch and TP
    degree, against the card's capacity.

    Left: the breakdown at every valid TP degree, the chosen one solid. Right: the total per
    GPU as the context grows, one line per TP degree, a dot at the chosen setting.
    """
    spec = get_model(model)
    card = get_gpu(gpu)
    degrees = valid_tp_degrees(spec, (1, 2, 4, 8))
    if tp not in degrees:
        raise ValueError(f"tp={tp} does not split {spec.name} evenly; use one of {degrees}")
    fig = plt.figure(figsize=(11, 4.3), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.35]})

    top = 0.0
    for i, t in enumerate(degrees):
        rep = inference_report(spec, dtype=dtype, kv_dtype=kv_dtype, batch=batch,
                               seq_len=seq_len, tp=t)
        total = _stack(left, i, rep, alpha=1.0 if t == tp else 0.35, legend=t == tp)
        over = rep.total > card.memory_bytes
        left.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=9,
                  color="#b2182b" if over else "black",
                  fontweight="bold" if t == tp else None)
        top = max(top, total)
    _capacity_line(left, card.memory_bytes, f"{card.name}: {card.memory_gb:.0f} GB")
    left.set_xticks(range(len(degrees)), [f"TP={t}" for t in degrees])
    left.set_ylim(0, max(top, card.memory_gb) * 1.15)
    left.set_ylabel("GB per GPU")
    left.set_title(f"batch {batch} x {seq_len:,} tokens", fontsize=10)
    left.legend(fontsize=8, loc="upper right", framealpha=0.95)
    left.grid(axis="y", alpha=0.3)

    contexts = np.array([2**k for k in range(10, 18)])  # 1k .. 128k tokens
    for t in degrees:
        totals = [inference_report(spec, dtype=dtype, kv_dtype=kv_dtype, batch=batch,
                                   seq_len=int(s), tp=t).total / GB for s in contexts]
        right.plot(contexts, totals, marker=".", linewidth=2.5 if t == tp else 1.2,
                   alpha=1.0 if t == tp else 0.6, label=f"TP={t}")
    chosen = inference_report(spec, dtype=dtype, kv_dtype=kv_dtype, batch=batch,
                              seq_len=seq_len, tp=tp).total / GB
    right.plot([seq_len], [chosen], "o", color="black", markersize=7, zorder=5)
    right.axhline(card.memory_gb, color="black", linestyle="--", linewidth=1.2)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(contexts, [f"{c // 1024}k" for c in contexts])
    lo, hi = right.get_ylim()
    ticks = [10 * 2**k for k in range(-4, 16) if lo <= 10 * 2**k <= hi]  # 80 GB is one of them
    right.set_yticks(ticks, [f"{t:g}" for t in ticks])
    right.minorticks_off()
    right.set_xlabel("context length (tokens per sequence)")
    right.set_ylabel("total GB per GPU")
    right.set_title("as the context grows", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3, which="both")
    fig.suptitle(f"{spec.name} inference: weights {dtype}, KV cache {kv_dtype}", fontsize=11)
    return fig


def dp_link(link: str, dp: int, gpu: str = "h100-80gb", gpus_per_node: int = 8) -> str:
    """The link a DP all-reduce runs on: `link` itself, or for "auto" the GPU's NVLink
    inside one node (`dp <= gpus_per_node`) and InfiniBand NDR across nodes (a ring runs at
    the pace of its slowest hop)."""
    if link != "auto":
        return link
    return get_gpu(gpu).link if dp <= gpus_per_node else "ib-ndr"


def dp_scaling_figure(model: str = "llama3-8b", gpu: str = "h100-80gb",
                      link: str = "auto", micro_batch: int = 1, seq_len: int = 4096,
                      zero: int = 0, overlap: float = 0.0, max_dp: int = 64,
                      mfu: float = 0.4) -> Figure:
    """Data parallelism on `dp` GPUs: throughput (left) grows almost linearly; memory per
    GPU (right) stays where it was for one GPU, unless ZeRO (`zero` = 1, 2, 3) shards the
    optimizer state, gradients and weights over the replicas.

    Throughput: `data_parallel.dp_step_estimate` (3x forward FLOPs at `mfu` of peak, plus the
    gradient all-reduce on `link`, a fraction `overlap` of it hidden behind the backward);
    `link="auto"` is NVLink up to 8 GPUs and InfiniBand NDR beyond (`dp_link`).
    Memory: `memory.memory_per_gpu(workload="training", dp=dp, zero=zero)`, mixed-precision
    Adam, one micro-batch of activations.
    """
    from ..data_parallel import dp_step_estimate

    spec = get_model(model)
    card = get_gpu(gpu)
    degrees = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= max_dp]
    est = [dp_step_estimate(spec, gpu, d, dp_link(link, d, gpu), micro_batch=micro_batch,
                            seq_len=seq_len, mfu=mfu, overlap=overlap) for d in degrees]
    fig = plt.figure(figsize=(12, 4.3), layout="constrained")
    left, right = fig.subplots(1, 2)

    ideal = [d * est[0].tokens_per_second for d in degrees]
    left.plot(degrees, [x / 1e3 for x in ideal], "--", color="0.5", label="ideal (linear)")
    left.plot(degrees, [e.tokens_per_second / 1e3 for e in est], "o-", color=COLORS["weights"],
              label="modelled: " + ("NVLink in a node, IB NDR across" if link == "auto"
                                    else f"all-reduce on {link}"))
    for d, e in zip(degrees, est):
        if d in (degrees[-1],) or d == 8:
            left.annotate(f"{e.scaling_efficiency:.0%}", (d, e.tokens_per_second / 1e3),
                          textcoords="offset points", xytext=(4, -12), fontsize=8)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(degrees, [str(d) for d in degrees])
    left.set_xlabel("data-parallel degree (GPUs)")
    left.set_ylabel("thousand tokens / s")
    left.set_title("throughput grows with the replicas", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")

    top = 0.0
    for i, d in enumerate(degrees):
        rep = memory_per_gpu(spec, dtype="bf16", batch=micro_batch, seq_len=seq_len, dp=d,
                             workload="training", zero=zero, flash_attention=True)
        total = _stack(right, i, rep, legend=i == 0)
        over = rep.total > card.memory_bytes
        right.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8,
                   color="#b2182b" if over else "black")
        top = max(top, total)
    _capacity_line(right, card.memory_bytes, f"{card.name}: {card.memory_gb:.0f} GB")
    right.set_xticks(range(len(degrees)), [str(d) for d in degrees])
    right.set_xlabel("data-parallel degree (GPUs)")
    right.set_ylabel("GB per GPU")
    right.set_ylim(0, max(top, card.memory_gb) * 1.15)
    zero_note = "no ZeRO" if zero == 0 else f"ZeRO stage {zero}"
    right.set_title(f"memory per GPU ({zero_note})", fontsize=10)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{spec.name} training, {micro_batch} x {seq_len:,} tokens per GPU, "
                 f"mixed-precision Adam", fontsize=11)
    return fig
