"""Figures for sequence parallelism (chapter 7). Each function returns a Figure.

Figures are pyplot figures, so that a notebook cell ending in ``;`` shows them inline;
close them (``plt.close(fig)``) when you draw many, as the widgets do.

The arithmetic comes from :mod:`shardlab.memory` (activation bytes) and from measurements
that the notebook takes on ranks (bytes saved for backward, per region); nothing here needs
a process group.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .. import memory

__all__ = ["block_regions_figure", "saved_activations_figure", "activation_memory_figure"]

SEQ_COLOR = "#cfe8cf"  # sequence-sharded regions
TP_COLOR = "#cfe0f5"  # tensor-parallel regions
COMM_COLOR = "#fde0c5"


def _box(ax, x, y, w, h, text, color, fontsize=8):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", facecolor=color,
                                edgecolor="0.3", linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, x0, x1, y):
    ax.add_patch(FancyArrowPatch((x0, y), (x1, y), arrowstyle="-|>", mutation_scale=9,
                                 color="0.25", linewidth=0.9))


def block_regions_figure(tp: int = 2) -> Figure:
    """One half of a decoder layer (norm, attention or MLP, dropout, residual) under tensor
    parallelism alone and with sequence parallelism: the shape each rank holds in every
    region, and the collectives at the borders (forward / backward)."""
    fig = plt.figure(figsize=(11, 3.6), layout="constrained")
    ax = fig.add_subplot()
    t = tp
    rows = [
        ("tensor parallel", [
            ("norm\n[s, h]", SEQ_COLOR), ("f\nidentity /\nall-reduce", COMM_COLOR),
            (f"attention or MLP\ncolumn -> row\n[s, h/{t}] inside", TP_COLOR),
            ("g\nall-reduce /\nidentity", COMM_COLOR), ("dropout + residual\n[s, h]", SEQ_COLOR)]),
        ("+ sequence parallel", [
            (f"norm\n[s/{t}, h]", SEQ_COLOR), ("all-gather /\nreduce-scatter", COMM_COLOR),
            (f"attention or MLP\ncolumn -> row\n[s, h/{t}] inside", TP_COLOR),
            ("reduce-scatter /\nall-gather", COMM_COLOR), (f"dropout + residual\n[s/{t}, h]", SEQ_COLOR)]),
    ]
    widths = [1.6, 1.3, 2.2, 1.3, 2.0]
    gap = 0.35
    for i, (label, boxes) in enumerate(rows):
        y = 1.35 - i * 1.25
        ax.text(-0.15, y + 0.45, label, ha="right", va="center", fontsize=10, fontweight="bold")
        x = 0.0
        for (text, color), w in zip(boxes, widths):
            _box(ax, x, y, w, 0.9, text, color)
            if x + w + gap < sum(widths) + gap * 4:
                _arrow(ax, x + w + 0.02, x + w + gap - 0.02, y + 0.45)
            x += w + gap
    ax.text(0.0, -0.35, f"Shapes per rank, t = {t} ranks, s tokens, h hidden. "
            "Green: norms, dropout, residual (replicated under TP, sharded by SP). Blue: split "
            "over heads / FFN columns. Orange: communication (forward / backward).",
            fontsize=8, ha="left", va="top", wrap=True)
    ax.set_xlim(-2.6, sum(widths) + 4 * gap + 0.1)
    ax.set_ylim(-0.7, 2.4)
    ax.axis("off")
    ax.set_title("Sequence parallelism: same collectives' bytes, 1/t of the activations between them",
                 fontsize=11)
    return fig


def saved_activations_figure(measured: dict[str, dict[str, int]], degree: int,
                             title: str = "") -> Figure:
    """Bytes saved for backward on one rank, per region, for each labelled run.

    ``measured`` maps a label (e.g. "TP", "TP + SP") to ``{region: bytes}`` as
    :class:`shardlab.sequence_parallel.SavedActivations` reports it.
    """
    labels = list(measured)
    regions = [r for r in ("sequence", "tensor") if any(r in m for m in measured.values())]
    names = {"sequence": "norms, dropout, residual", "tensor": "inside attention and MLP"}
    colors = {"sequence": SEQ_COLOR, "tensor": TP_COLOR}
    fig = plt.figure(figsize=(7.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(regions))
    w = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        vals = [measured[label].get(r, 0) / 1024 for r in regions]
        bars = ax.bar(x + (k - (len(labels) - 1) / 2) * w, vals, w,
                      color=[colors[r] for r in regions], edgecolor="0.2",
                      hatch=None if k == 0 else "//", label=label)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [names[r] for r in regions])
    ax.set_ylabel("KiB saved for backward, one rank")
    ax.legend(fontsize=8)
    ax.set_title(title or f"Activations kept for backward, measured (TP degree {degree})", fontsize=11)
    return fig


def activation_memory_figure(model: str = "llama3-70b", tp: int = 8, seq_len: int = 131072,
                             batch: int = 1, dtype: str = "bf16", flash_attention: bool = True,
                             layers: int | None = None) -> Figure:
    """Training activations per GPU against sequence length: no parallelism, TP, TP + SP
    (:func:`shardlab.memory.activation_bytes`, Korthikanti et al. 2022), for one layer and for
    ``layers`` (default: all) layers, with the 80 GB of an H100 for scale."""
    spec = memory.get_model(model)
    n_layers = spec.layers if layers is None else layers
    lens = np.unique(np.geomspace(1024, max(seq_len, 2048), 12).astype(int))
    kw = dict(batch=batch, dtype=dtype, training=True, flash_attention=flash_attention, layers=1)

    def series(tp_, sp):
        return np.array([memory.activation_bytes(spec, seq_len=int(s), tp=tp_, sp=sp, **kw)
                         for s in lens], float)

    curves = {"no parallelism": series(1, False), f"TP={tp}": series(tp, False),
              f"TP={tp} + SP": series(tp, True)}
    fig = plt.figure(figsize=(9, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colors = colormaps["tab10"]
    for k, (label, ys) in enumerate(curves.items()):
        ax1.plot(lens, ys / 1e9, "o-", ms=3, color=colors(k), label=label)
        ax2.plot(lens, ys * n_layers / 1e9, "o-", ms=3, color=colors(k), label=label)
    ax2.axhline(80, color="0.4", ls="--", lw=1)
    ax2.text(lens[0], 80, " 80 GB", va="bottom", fontsize=8, color="0.3")
    for ax, title in ((ax1, "one layer"), (ax2, f"all {n_layers} layers (kept for backward)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("GB per GPU")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fa = "flash attention" if flash_attention else "scores materialised"
    fig.suptitle(f"{spec.name} training activations, batch {batch}, {dtype}, {fa}", fontsize=11)
    return fig
