"""Figures for choosing a strategy (chapters 10 and 11, and the errata page).

Every function returns a ``matplotlib.figure.Figure`` (not pyplot), so a notebook shows it
once and a widget can redraw it freely. The numbers come from :mod:`shardlab.planner`,
:mod:`shardlab.memory` and :mod:`shardlab.pipeline`; nothing here computes a cost itself.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..hardware import GB
from ..planner import Layout, Plan, evaluate

__all__ = [
    "TIME_PARTS",
    "MEMORY_PARTS",
    "plan_figure",
    "planner_figure",
    "tpot_vs_batch_figure",
    "memory_pressure_figure",
    "schedule_order_figure",
]

# (attribute, legend label, colour): the stacked pieces of a layout's time and memory.
TIME_PARTS = (
    ("compute_time", "compute (roofline)", "#4C72B0"),
    ("comm_latency", "collective latency", "#DD8452"),
    ("comm_bandwidth", "collective bandwidth", "#C44E52"),
    ("p2p_time", "pipeline p2p", "#8172B3"),
    ("bubble_time", "pipeline bubble", "#BBBBBB"),
)
MEMORY_PARTS = (
    ("weights", "weights", "#4C72B0"),
    ("kv_cache", "KV cache", "#55A868"),
    ("activations", "activations", "#CCB974"),
    ("gradients", "gradients", "#DD8452"),
    ("optimizer", "optimizer state", "#C44E52"),
)


def _title(result: Plan) -> str:
    i = result.inputs
    nodes = f", {i['nodes']} nodes" if i["nodes"] > 1 else ""
    load = (f"context {i['context']}, batch {i['batch']}" if i["workload"] == "inference"
            else f"sequence {i['context']}, global batch {i['batch']}")
    return (f"{i['model_name']} on {i['gpus']} x {i['gpu_memory_gb']:g} GB over {i['link']}{nodes}: "
            f"{i['workload']} ({i['objective']}), {load}, {i['dtype']}")


def _time_axis(ax, layouts: list[Layout], inference: bool) -> None:
    scale, unit = (1e3, "ms per output token") if inference else (1.0, "seconds per optimizer step")
    ys = list(range(len(layouts)))[::-1]  # best at the top
    for attr, label, colour in TIME_PARTS:
        left = [0.0] * len(layouts)
        for n, lay in enumerate(layouts):
            left[n] = sum(getattr(lay, a) for a, _, _ in TIME_PARTS[:[p[0] for p in TIME_PARTS].index(attr)])
        widths = [getattr(lay, attr) * scale for lay in layouts]
        if any(widths):
            ax.barh(ys, widths, left=[x * scale for x in left], color=colour, label=label, height=0.6)
    for y, lay in zip(ys, layouts):
        total = lay.step_time * scale
        extra = f"  ({lay.throughput:,.0f} tok/s)" if not inference else ""
        ax.text(total, y, f" {total:.3g}{extra}", va="center", fontsize=8)
    ax.set_yticks(ys, [lay.label for lay in layouts], fontsize=8)
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(lay.step_time for lay in layouts) * scale * 1.35)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title("ranked layouts (best at the top)", fontsize=9)


def _memory_axis(ax, layouts: list[Layout], rejected: list[Layout], capacity_gb: float) -> None:
    shown = layouts + [r for r in rejected if r.memory is not None]
    ys = list(range(len(shown)))[::-1]
    for attr, label, colour in MEMORY_PARTS:
        widths = [getattr(lay.memory, attr) / GB for lay in shown]
        if not any(widths):
            continue
        left = []
        for lay in shown:
            before = [a for a, _, _ in MEMORY_PARTS][:[a for a, _, _ in MEMORY_PARTS].index(attr)]
            left.append(sum(getattr(lay.memory, a) for a in before) / GB)
        ax.barh(ys, widths, left=left, color=colour, label=label, height=0.6)
    for y, lay in zip(ys, shown):
        if lay.rejected:  # hatch the layouts that do not fit
            ax.add_patch(Rectangle((0, y - 0.3), lay.memory_gb, 0.6, fill=False, hatch="//",
                                   edgecolor="black", linewidth=0))
    ax.axvline(capacity_gb, color="black", linestyle="--", linewidth=1)
    ax.text(capacity_gb, 0.01, f" usable: {capacity_gb:.0f} GB", fontsize=8, va="bottom",
            transform=ax.get_xaxis_transform())
    labels = [lay.label + ("  (rejected)" if lay.rejected else "") for lay in shown]
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GB on the most loaded GPU")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title("memory per GPU (hatched: does not fit)", fontsize=9)


def plan_figure(result: Plan, max_layouts: int = 8) -> Figure:
    """Two panels for a :class:`~shardlab.planner.Plan`: the ranked layouts' time split into
    compute, collective latency and bandwidth, p2p (and bubble, for training); and memory per
    GPU of ranked and rejected layouts against the usable capacity."""
    layouts = list(result)[:max_layouts]
    rejected = result.rejected[:max(0, max_layouts - len(layouts)) + 3]
    fig = Figure(figsize=(12, 0.45 * max(len(layouts) + len(rejected), 4) + 1.6), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    inference = result.workload == "inference"
    if layouts:
        _time_axis(ax_t, layouts, inference)
    else:
        ax_t.text(0.5, 0.5, "no layout fits", ha="center", va="center", transform=ax_t.transAxes)
        ax_t.set_axis_off()
    capacity = result.inputs["gpu_memory_gb"] * result.inputs["memory_utilization"]
    _memory_axis(ax_m, layouts, rejected, capacity)
    fig.suptitle(_title(result), fontsize=10)
    return fig


def planner_figure(result: Plan, max_layouts: int = 6) -> Figure:
    """Table and chart in one figure (what the chapter 11 dashboard draws): the ranked
    layouts with their time, time to first token (inference), collectives, bubble and
    memory; the closest rejected layouts and the planner's notes; then :func:`plan_figure`'s
    two panels."""
    inference = result.workload == "inference"
    layouts = list(result)[:max_layouts]
    rejected = result.rejected[:3]
    notes = [f"x {lay.label}: {lay.rejected}" for lay in rejected] + [f"note: {a}" for a in result.advice]
    notes = [line if len(line) < 200 else line[:197] + "..." for line in notes]
    n_bars = max(len(layouts) + len(rejected), 3)
    table_h = 0.24 * (len(layouts) + 1) + 0.17 * len(notes) + 0.45
    chart_h = 0.4 * n_bars + 1.5
    fig = Figure(figsize=(12, table_h + chart_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[table_h, chart_h])
    ax = top.subplots()
    ax.set_axis_off()
    head = ["#", "layout", "ms/token" if inference else "tokens/s", "TTFT ms" if inference else "step s",
            "compute ms" if inference else "compute s", "collectives ms" if inference else "collectives s",
            "bubble", "GB/GPU"]
    rows = []
    for n, lay in enumerate(layouts):
        scale = 1e3 if inference else 1.0
        rows.append([str(n + 1), lay.label,
                     f"{lay.step_time * 1e3:.1f}" if inference else f"{lay.throughput:,.0f}",
                     f"{lay.ttft * 1e3:.0f}" if inference else f"{lay.step_time:.2f}",
                     f"{lay.compute_time * scale:.1f}",
                     f"{(lay.comm_latency + lay.comm_bandwidth) * scale:.1f}",
                     f"{lay.bubble:.0%}", f"{lay.memory_gb:.1f}"])
    table_frac = 0.24 * (len(layouts) + 1) / table_h
    if rows:
        table = ax.table(cellText=rows, colLabels=head, cellLoc="center",
                         bbox=(0.0, 1 - table_frac, 1.0, table_frac))
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    ax.text(0, 1 - table_frac - 0.03, "\n".join(notes) if notes else "", fontsize=7.5, va="top",
            transform=ax.transAxes)
    top.suptitle(_title(result), fontsize=10)
    ax_t, ax_m = bottom.subplots(1, 2)
    if layouts:
        _time_axis(ax_t, layouts, inference)
    else:
        ax_t.text(0.5, 0.5, "no layout fits: see the notes above", ha="center", va="center",
                  transform=ax_t.transAxes)
        ax_t.set_axis_off()
    capacity = result.inputs["gpu_memory_gb"] * result.inputs["memory_utilization"]
    _memory_axis(ax_m, layouts, rejected, capacity)
    return fig


def tpot_vs_batch_figure(model: str, layouts, gpu_memory_gb: float, links, batches, **kwargs) -> Figure:
    """Time per output token against the number of concurrent sequences, one line per layout,
    one panel per link: where TP's all-reduces stop paying for themselves. Points that do
    not fit in memory are left out. ``kwargs`` go to :func:`shardlab.planner.evaluate`."""
    links = list(links)
    fig = Figure(figsize=(5.2 * len(links), 3.8), layout="constrained")
    axes = fig.subplots(1, len(links), sharey=True, squeeze=False)[0]
    for ax, link in zip(axes, links):
        for layout in layouts:
            xs, ys = [], []
            for b in batches:
                lay = evaluate(model, layout, gpu_memory_gb, link, "inference", batch=b, **kwargs)
                if not lay.rejected:
                    xs.append(b)
                    ys.append(lay.step_time * 1e3)
            tp, pp, dp = layout[:3]
            ax.plot(xs, ys, marker="o", label=f"TP={tp} x PP={pp} x DP={dp}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences (batch)")
        ax.set_title(f"{model} over {link}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ms per output token")
    axes[0].legend(fontsize=8)
    return fig


def memory_pressure_figure(cases: dict, capacity_gb: float | None = None) -> Figure:
    """Stacked memory per GPU of named cases: ``{label: MemoryReport}`` (for example
    inference at several batches and training, from :func:`shardlab.memory.memory_per_gpu`)."""
    labels = list(cases)
    fig = Figure(figsize=(8, 0.55 * len(labels) + 1.8), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(labels)))[::-1]
    names = [a for a, _, _ in MEMORY_PARTS]
    for attr, label, colour in MEMORY_PARTS:
        widths = [getattr(cases[k], attr) / GB for k in labels]
        if not any(widths):
            continue
        left = [sum(getattr(cases[k], a) for a in names[:names.index(attr)]) / GB for k in labels]
        ax.barh(ys, widths, left=left, color=colour, label=label, height=0.6)
    for y, k in zip(ys, labels):
        ax.text(cases[k].total / GB, y, f" {cases[k].total / GB:.1f} GB", va="center", fontsize=8)
    if capacity_gb is not None:
        ax.axvline(capacity_gb, color="black", linestyle="--", linewidth=1)
        ax.text(capacity_gb, len(labels) - 0.45, f" {capacity_gb:g} GB card", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GB per GPU")
    ax.set_xlim(0, max(r.total for r in cases.values()) / GB * 1.15)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)
    return fig


def schedule_order_figure(results: dict, title: str = "") -> Figure:
    """Timelines of simulated pipeline schedules, one panel each: ``{label: SimResult}`` from
    :func:`shardlab.pipeline.simulate`. Forward boxes blue, backward red, with micro-batch
    numbers; each panel's title gives the makespan and the peak in-flight activations."""
    labels = list(results)
    first = results[labels[0]]
    p = first.schedule.stages
    fig = Figure(figsize=(11, (0.42 * p + 0.8) * len(labels)), layout="constrained")
    axes = fig.subplots(len(labels), 1, squeeze=False)[:, 0]
    colours = {"F": "#4C72B0", "B": "#C44E52", "W": "#55A868"}
    for ax, label in zip(axes, labels):
        res = results[label]
        for t in res.timeline:
            ax.add_patch(Rectangle((t.start, t.stage - 0.4), t.duration, 0.8,
                                   facecolor=colours[t.op.kind], edgecolor="white"))
            ax.text(t.start + t.duration / 2, t.stage, t.op.label, ha="center", va="center",
                    fontsize=7, color="white")
        ax.set_xlim(0, res.makespan)
        ax.set_ylim(p - 0.5, -0.5)
        ax.set_yticks(range(p), [f"stage {s}" for s in range(p)], fontsize=8)
        ax.set_title(f"{label}: makespan {res.makespan:g}, peak in-flight micro-batches per stage "
                     f"{list(res.peak_activations)}", fontsize=9)
    axes[-1].set_xlabel("time (units of one forward)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
