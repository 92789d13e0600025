"""Figures for tensor parallelism (chapters 3 and 4). Each function returns a Figure.

Figures are pyplot figures, so that a notebook cell ending in ``;`` shows them inline;
close them (``plt.close(fig)``) when you draw many, as the widgets do.
The arithmetic comes from :mod:`shardlab.cost` and :mod:`shardlab.tensor_parallel`'s plain
functions; nothing here needs a process group.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from .. import cost
from ..hardware import LINKS, get_link
from ..memory import get_model

__all__ = [
    "LINK_CHOICES", "resolve_link", "link_label", "step_estimate",
    "weight_shards_figure", "column_row_flow_figure", "comm_log_figure",
    "head_layout_figure", "comm_vs_compute_figure", "allreduce_regimes_figure",
]

MEASURED = "measured-2xh100"  # the all-reduce model fitted on the syllabus's 2 x H100 timings
LINK_CHOICES = (*LINKS, MEASURED)


def _rank_color(r: int, p: int):
    return colormaps["tab10"](r % 10) if p <= 10 else colormaps["viridis"](r / max(p - 1, 1))


def resolve_link(link):
    """A LINKS key, a LinkSpec, or "measured-2xh100" (fitted on measured NCCL all-reduces)."""
    return cost.calibrated_2xh100() if link == MEASURED else link


def link_label(link) -> str:
    if link == MEASURED:
        return ("all-reduce fitted on 2 x H100 NV18 measurements "
                "(other TP degrees: extrapolated by ring steps)")
    spec = get_link(link)
    return f"{spec.name}: {spec.bandwidth / 1e9:.0f} GB/s each way, alpha {spec.alpha * 1e6:.0f} us"


def step_estimate(model: str, gpu: str, link, phase: str, batch: int, seq_len: int, tp: int):
    """`cost.tp_step_estimate` for a phase: ``"decode"`` (one new token per sequence after
    ``seq_len`` cached ones) or ``"prefill"`` (``seq_len`` prompt tokens per sequence)."""
    if phase == "decode":
        kw = dict(batch=batch, new_tokens=1, context_len=seq_len)
    elif phase == "prefill":
        kw = dict(batch=batch, new_tokens=seq_len, context_len=0)
    else:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    return cost.tp_step_estimate(model, gpu, tp, resolve_link(link), **kw)


# --------------------------------------------------------------------------- chapter 3

def weight_shards_figure(out_features: int = 8, in_features: int = 12, degree: int = 4) -> Figure:
    """Which rank holds which part of a weight ``W`` (out x in, as nn.Linear stores it):
    column-parallel keeps rows r of p (output features), row-parallel columns r of p."""
    if out_features % degree or in_features % degree:
        raise ValueError(f"degree {degree} must divide both out_features ({out_features}) and "
                         f"in_features ({in_features})")
    fig = plt.figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = colormaps["tab10"].resampled(10)
    owner_col = np.repeat(np.arange(degree), out_features // degree)[:, None].repeat(in_features, 1)
    owner_row = np.repeat(np.arange(degree), in_features // degree)[None, :].repeat(out_features, 0)
    titles = ("column-parallel: rank r keeps rows r of p\n(output features)",
              "row-parallel: rank r keeps columns r of p\n(input features)")
    for ax, owner, title in zip(axes, (owner_col, owner_row), titles):
        ax.imshow(owner, cmap=cmap, vmin=0, vmax=9, aspect="equal")
        for r in range(degree):
            ys, xs = np.nonzero(owner == r)
            ax.text(xs.mean(), ys.mean(), f"rank {r}", ha="center", va="center", fontsize=9,
                    color="white", fontweight="bold")
        ax.set_xticks(np.arange(-0.5, in_features), minor=True)
        ax.set_yticks(np.arange(-0.5, out_features), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_xlabel(f"in_features = {in_features}")
        ax.set_ylabel(f"out_features = {out_features}")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"W of nn.Linear({in_features}, {out_features}) over {degree} ranks")
    return fig


def _box(ax, x, y, w, h, color, label="", hatch=None, alpha=1.0):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", linewidth=0.8,
                           hatch=hatch, alpha=alpha))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=8)


def _arrow(ax, x0, y0, x1, y1, text="", color="black"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10,
                                 color=color, linewidth=1))
    if text:
        ax.text((x0 + x1) / 2, y0 + 0.12, text, ha="center", va="bottom", fontsize=7)


def column_row_flow_figure(degree: int = 4) -> Figure:
    """Column-parallel then row-parallel on ``degree`` ranks: what each rank holds at each step
    and where the only communication of the forward pass happens (one all-reduce, ``g``)."""
    fig = plt.figure(figsize=(10, 0.9 * degree + 1.6), layout="constrained")
    ax = fig.add_subplot()
    grey = "0.85"
    row_h, gap = 0.6, 0.35
    top = degree * (row_h + gap)
    for r in range(degree):
        y = top - (r + 1) * (row_h + gap)
        c = _rank_color(r, degree)
        ax.text(-0.25, y + row_h / 2, f"rank {r}", ha="right", va="center", fontsize=9)
        _box(ax, 0.0, y, 1.0, row_h, grey, "X (whole)")
        _arrow(ax, 1.05, y + row_h / 2, 1.75, y + row_h / 2, f"W1 rows {r}/{degree}")
        _box(ax, 1.8, y, 0.7, row_h, c, f"H shard {r}")
        _arrow(ax, 2.55, y + row_h / 2, 3.25, y + row_h / 2, f"W2 cols {r}/{degree}")
        _box(ax, 3.3, y, 1.0, row_h, c, f"Z partial {r}", hatch="//", alpha=0.6)
        _arrow(ax, 4.35, y + row_h / 2, 5.05, y + row_h / 2)
        _box(ax, 5.1 + 0.6, y, 1.0, row_h, grey, "Z = sum")
    ax.add_patch(Rectangle((5.1, -gap / 2), 0.45, top, facecolor="#fde0c5", edgecolor="#d9822b"))
    ax.text(5.325, top / 2 - gap / 2, "all-reduce (g)", rotation=90, ha="center", va="center",
            fontsize=9, color="#a0522d")
    ax.text(0.5, top + 0.05, "f: identity forward,\nall-reduce of dX backward", ha="center",
            va="bottom", fontsize=8, color="#a0522d")
    ax.text(1.6, top + 0.05, "column-parallel W1:\nno communication", ha="left", va="bottom", fontsize=8)
    ax.text(3.3, top + 0.05, "row-parallel W2:\npartial sums", ha="left", va="bottom", fontsize=8)
    ax.set_xlim(-1.0, 6.9)
    ax.set_ylim(-0.4, top + 0.8)
    ax.axis("off")
    ax.set_title("Column then row: one all-reduce forward, one backward", fontsize=11)
    return fig


def comm_log_figure(summaries: dict[str, dict], title: str = "What each rank sent") -> Figure:
    """Bytes each rank sent per labelled run, split by collective, with the call counts.

    ``summaries`` maps a label to ``comm.summary(log)`` (``{op: {"calls", "bytes",
    "sent_bytes"}}``), e.g. {"column forward": ..., "row forward": ...}.
    """
    labels = list(summaries)
    ops = sorted({op for s in summaries.values() for op in s})
    fig = plt.figure(figsize=(8, 0.55 * len(labels) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(labels))
    for k, op in enumerate(ops):
        vals = np.array([summaries[lb].get(op, {}).get("sent_bytes", 0) for lb in labels], float)
        calls = [summaries[lb].get(op, {}).get("calls", 0) for lb in labels]
        bars = ax.barh(labels, vals, left=left, color=colormaps["Set2"](k), label=op)
        for bar, n in zip(bars, calls):
            if n:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2,
                        f"{n} x", ha="center", va="center", fontsize=8)
        left += vals
    for y, total in enumerate(left):
        if total == 0:
            ax.text(0, y, "  no communication", va="center", fontsize=8, color="0.4")
    ax.invert_yaxis()
    ax.set_xlabel("bytes sent by one rank")
    if ops:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=11)
    return fig


# --------------------------------------------------------------------------- chapter 4

def head_layout_figure(heads: int = 64, kv_heads: int = 8, tps=(4, 8, 16),
                       name: str = "") -> Figure:
    """Query heads (cells) per rank (rows) at each TP degree, coloured by the KV head they
    use; a rank's row lists the KV heads it stores. Beyond ``kv_heads`` ranks, a KV head
    is stored on several ranks."""
    from ..tensor_parallel import head_layout

    layouts = [head_layout(heads, kv_heads, t) for t in tps]
    fig = plt.figure(figsize=(10, 1.2 + 0.22 * sum(lay.tp for lay in layouts)), layout="constrained")
    axes = fig.subplots(len(layouts), 1, height_ratios=[lay.tp + 1 for lay in layouts], squeeze=False)[:, 0]
    cmap = colormaps["tab20"]
    for ax, lay in zip(axes, layouts):
        grid = np.full((lay.tp, heads), np.nan)
        for r in range(lay.tp):
            for h in lay.query_heads(r):
                grid[r, h] = h // lay.group_size
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=19, aspect="auto", interpolation="nearest")
        for r in range(lay.tp):
            kv = lay.kv_heads_of(r)
            txt = f"KV {kv.start}" if len(kv) == 1 else f"KV {kv.start}-{kv.stop - 1}"
            ax.text(heads - 0.3, r, txt, ha="right", va="center", fontsize=7)
        ax.set_yticks(range(lay.tp), [f"rank {r}" for r in range(lay.tp)], fontsize=6 if lay.tp > 8 else 8)
        ax.set_xticks([])
        rep = f", each KV head on {lay.kv_replicas} ranks" if lay.kv_replicas > 1 else ""
        ax.set_title(f"TP={lay.tp}: {lay.heads_per_rank} query heads and "
                     f"{lay.kv_heads_per_rank} KV head(s) per rank{rep}", fontsize=9)
    axes[-1].set_xlabel(f"query head (0-{heads - 1}), coloured by the KV head it attends with")
    fig.suptitle(f"{name + ': ' if name else ''}{heads} query heads, {kv_heads} KV heads", fontsize=11)
    return fig


def comm_vs_compute_figure(model: str = "llama3-70b", gpu: str = "h100-80gb",
                           link="nvlink-h100", phase: str = "decode", batch: int = 1,
                           seq_len: int = 4096, tp: int = 4, tps=(1, 2, 4, 8)) -> Figure:
    """One forward pass per TP degree: roofline compute on ``gpu`` next to the TP all-reduces
    on ``link`` (latency and bandwidth terms), no overlap. ``tp`` is highlighted."""
    spec = get_model(model)
    est = [step_estimate(model, gpu, link, phase, batch, seq_len, t) for t in tps]
    comp = np.array([e.compute.time for e in est]) * 1e3
    lat = np.array([e.comm.latency_time for e in est]) * 1e3
    bw = np.array([e.comm.bandwidth_time for e in est]) * 1e3
    fig = plt.figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(tps))
    ax.bar(x, comp, color="#4c72b0", label="compute (roofline)")
    ax.bar(x, lat, bottom=comp, color="#dd8452", label="all-reduce latency")
    ax.bar(x, bw, bottom=comp + lat, color="#c44e52", label="all-reduce bandwidth")
    total = comp + lat + bw
    for i, e in enumerate(est):
        ax.text(i, total[i], f"{total[i]:.3g} ms\ncomm {100 * e.comm_fraction:.0f}%",
                ha="center", va="bottom", fontsize=8,
                fontweight="bold" if tps[i] == tp else "normal")
        if tps[i] == tp:
            ax.bar(i, total[i], fill=False, edgecolor="black", linewidth=2)
    ax.set_xticks(x, [f"TP={t}" for t in tps])
    ax.set_ylabel("time per forward pass (ms)")
    ax.set_ylim(0, total.max() * 1.25)
    what = (f"decode: batch {batch}, 1 new token after {seq_len} cached" if phase == "decode"
            else f"prefill: batch {batch} x {seq_len} tokens")
    ax.set_title(f"{spec.name}, {what}\n{link_label(link)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def allreduce_regimes_figure(model: str = "llama3-70b", tp: int = 4, gpu: str = "h100-80gb",
                             links=("nvlink-h100", "pcie4", "ib-ndr"),
                             marks=(("decode, batch 1", 1), ("decode, batch 32", 32),
                                    ("prefill, 2,048 tokens", 2048))) -> Figure:
    """TP all-reduce time of one forward pass against tokens in flight, per link: flat where
    latency dominates (decode), rising with the tokens where bandwidth does (prefill).
    The dotted line is the roofline compute time of the same pass."""
    spec = get_model(model)
    tokens = np.unique(np.logspace(0, 16, 65, base=2).astype(int))
    fig = plt.figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for k, link in enumerate(links):
        c = [cost.tp_comm_cost(model, tp, int(t), resolve_link(link)) for t in tokens]
        color = colormaps["tab10"](k)
        ax.plot(tokens, [x.total_time * 1e3 for x in c], color=color, label=link)
        ax.plot(tokens, [x.bandwidth_time * 1e3 for x in c], color=color, linestyle="--", linewidth=0.8)
    comp = [cost.roofline_time(model, gpu, batch=1, new_tokens=int(t), tp=tp).time * 1e3 for t in tokens]
    ax.plot(tokens, comp, color="black", linestyle=":", label=f"compute ({get_model(model).name} on {gpu})")
    for label, t in marks:
        ax.axvline(t, color="0.6", linewidth=0.8)
        ax.text(t * 1.08, 0.03, label, rotation=90, fontsize=7, va="bottom", color="0.35",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in flight per forward pass (batch x new tokens)")
    ax.set_ylabel("time per forward pass (ms)")
    ax.set_title(f"{spec.name}, TP={tp}: {2 * spec.layers} all-reduces per forward pass\n"
                 "solid: latency + bandwidth; dashed: bandwidth term alone", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig
