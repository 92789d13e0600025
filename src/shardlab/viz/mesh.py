"""Figures for 3D parallelism (chapter 8): the TP x PP x DP rank grid and what each GPU holds.

Each function returns a Figure; nothing here needs a process group. Figures are pyplot
figures, so that a notebook cell ending in ``;`` shows them inline; close them
(``plt.close(fig)``) when you draw many, as the widgets do.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..mesh import LayoutSummary, ParallelDims

__all__ = ["grid_figure", "layout_memory_figure", "losses_figure"]

AXIS_COLORS = {"tp": "#d62728", "pp": "#1f77b4", "dp": "#2ca02c"}
# Muted node colours that leave red, blue and green to the group outlines.
NODE_COLORS = ListedColormap(["#f2e6c9", "#d9d2e9", "#e6e6e6", "#fce5cd", "#d0e0e3",
                              "#ead1dc", "#fff2cc", "#d9ead3", "#cccccc"])


def grid_figure(dims: ParallelDims, gpus_per_node: int | None = 8, highlight: int | None = 0,
                title: str = "", max_labels: int = 256) -> Figure:
    """The rank grid: one panel per DP replica, stages as rows, TP ranks as columns.

    Cells show the global rank and are coloured by node (``gpus_per_node`` consecutive
    ranks). ``highlight`` outlines that rank's TP group (red), PP group (blue) and DP group
    (green). Large grids drop the rank labels.
    """
    tp, pp, dp = dims.tp, dims.pp, dims.dp
    cols = min(dp, 6)
    panel_rows = -(-dp // cols)
    cell = 0.42 if dims.world_size <= max_labels else 0.12
    width = min(16, max(5.5, cols * (tp * cell + 0.7)))
    height = min(14, max(2.6, panel_rows * (pp * cell + 0.9)))
    fig = plt.figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(panel_rows, cols, squeeze=False).ravel())
    nodes = (dims.world_size + gpus_per_node - 1) // gpus_per_node if gpus_per_node else dp
    cmap = NODE_COLORS if nodes <= 9 else colormaps["viridis"]
    labels = dims.world_size <= max_labels
    hl = dims.coords(highlight) if highlight is not None else None
    for d, ax in enumerate(axes):
        if d >= dp:
            ax.axis("off")
            continue
        ranks = np.array([[dims.rank_of(tp=t, pp=p, dp=d) for t in range(tp)] for p in range(pp)])
        node = ranks // gpus_per_node if gpus_per_node else np.full_like(ranks, d)
        norm = node / max(nodes - 1, 1) if nodes > 9 else node
        ax.imshow(norm, cmap=cmap, vmin=0, vmax=1 if nodes > 9 else 8, aspect="auto",
                  interpolation="nearest")
        if labels:
            for p in range(pp):
                for t in range(tp):
                    ax.text(t, p, str(ranks[p, t]), ha="center", va="center", fontsize=8)
        if hl is not None:
            def outline(t0, p0, w, h, axis):
                inset = {"tp": 0.04, "pp": 0.1, "dp": 0.16}[axis]  # nested, never on top
                ax.add_patch(Rectangle((t0 - 0.5 + inset, p0 - 0.5 + inset), w - 2 * inset,
                                       h - 2 * inset, fill=False, lw=2.2,
                                       edgecolor=AXIS_COLORS[axis]))
            if d == hl.dp:
                outline(0, hl.pp, tp, 1, "tp")
                outline(hl.tp, 0, 1, pp, "pp")
            outline(hl.tp, hl.pp, 1, 1, "dp")
        ax.set_xticks(range(tp) if tp <= 16 else [])
        ax.set_yticks(range(pp) if pp <= 16 else [])
        ax.tick_params(labelsize=7, length=0)
        ax.set_xlabel("TP index", fontsize=8)
        ax.set_ylabel("PP stage", fontsize=8)
        ax.set_title(f"DP replica {d}", fontsize=9)
    note = f", {gpus_per_node} GPUs per node (colour = node)" if gpus_per_node else ""
    hl_note = (f"\nrank {highlight}'s groups: TP red, PP blue, DP green" if hl is not None else "")
    fig.suptitle(title or f"{dims}{note}{hl_note}", fontsize=10)
    return fig


def layout_memory_figure(summaries: dict[str, LayoutSummary]) -> Figure:
    """Memory on the busiest GPU of each labelled layout, by component; the black tick is the
    GPU's capacity."""
    labels = list(summaries)
    parts = ("weights", "gradients", "optimizer", "activations", "kv_cache")
    fig = plt.figure(figsize=(8, 0.7 * len(labels) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(labels))
    for k, part in enumerate(parts):
        vals = np.array([getattr(summaries[lb].memory, part) / 1e9 for lb in labels])
        if not vals.any():
            continue
        ax.barh(labels, vals, left=left, color=colormaps["Set2"](k), label=part.replace("_", " "))
        left += vals
    for y, lb in enumerate(labels):
        s = summaries[lb]
        cap = s.capacity / 1e9
        ax.plot([cap, cap], [y - 0.4, y + 0.4], color="black", lw=2)
        verdict = "fits" if s.fits else "does not fit"
        ax.text(max(left[y], cap), y, f"  {left[y]:.1f} GB: {verdict} in {cap:.0f} GB ({s.gpu})",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB on the busiest GPU")
    ax.set_xlim(0, max(left.max(), max(s.capacity for s in summaries.values()) / 1e9) * 1.9)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Memory per GPU of each layout (shardlab.memory.memory_per_gpu)", fontsize=11)
    return fig


def losses_figure(reference: list[float], runs: dict[str, list[float]]) -> Figure:
    """Training loss per step: the single-device run and each parallel run on top of it."""
    fig = plt.figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    steps = np.arange(1, len(reference) + 1)
    ax.plot(steps, reference, "o-", color="0.2", lw=3, alpha=0.35, ms=10, label="one device")
    markers = "xs^v"
    for k, (label, losses) in enumerate(runs.items()):
        ax.plot(steps, losses, markers[k % 4] + "--", ms=7, label=label)
    ax.set_xticks(steps)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Same losses, step by step", fontsize=11)
    return fig
