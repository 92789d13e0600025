"""Figures for expert parallelism (chapter 9). Each function returns a Figure.

Figures are pyplot figures, so that a notebook cell ending in ``;`` shows them inline;
close them (``plt.close(fig)``) when you draw many, as the widgets do.

Routing is computed with :func:`shardlab.expert_parallel.route` on synthetic router logits
(no model, no process group), so a widget can redraw it instantly.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from .. import memory
from ..expert_parallel import moe_parameters, route

__all__ = ["synthetic_logits", "tokens_per_expert_figure", "routing_figure",
           "alltoall_matrix_figure", "moe_parameters_figure"]


def synthetic_logits(tokens: int, experts: int, skew: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Router logits for ``tokens`` tokens: standard normal plus ``skew`` times a preference
    that falls linearly from expert 0 (most popular) to the last expert."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=g) + skew * torch.linspace(1, -1, experts)


def tokens_per_expert_figure(chosen, kept=None, capacity: int | None = None, ep: int | None = None,
                             title: str = "", ax=None) -> Figure:
    """Bars of assignments per expert (``chosen``); with ``kept``, the part beyond capacity is
    hatched as dropped. ``ep`` colours the experts by the rank that holds them."""
    chosen = np.asarray(chosen)
    kept = chosen if kept is None else np.asarray(kept)
    E = len(chosen)
    fig = None
    if ax is None:
        fig = plt.figure(figsize=(max(7, 0.5 * E + 2), 3.4), layout="constrained")
        ax = fig.add_subplot()
    per_rank = E // ep if ep else E
    colors = [colormaps["tab10"]((e // per_rank) % 10) if ep else "#4c72b0" for e in range(E)]
    x = np.arange(E)
    ax.bar(x, kept, color=colors, edgecolor="0.2", label="processed")
    if (chosen > kept).any():
        ax.bar(x, chosen - kept, bottom=kept, color="white", edgecolor="#c44e52", hatch="///",
               label="dropped (over capacity)")
    if capacity is not None:
        ax.axhline(capacity, color="#c44e52", ls="--", lw=1.2)
        ax.text(E - 0.5, capacity, f"capacity {capacity}", ha="right", va="bottom", fontsize=8,
                color="#c44e52")
    ax.set_xticks(x, [str(e) for e in x], fontsize=8)
    ax.set_xlabel("expert" + (f" (colour: EP rank holding it, {per_rank} per rank)" if ep else ""))
    ax.set_ylabel("token assignments")
    if (chosen > kept).any():
        ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    return fig if fig is not None else ax.figure


def routing_figure(tokens: int = 512, experts: int = 8, top_k: int = 2,
                   capacity_factor: float | None = 1.25, skew: float = 0.5, ep: int = 4,
                   seed: int = 0) -> Figure:
    """Top-k routing of ``tokens`` synthetic tokens over ``experts`` experts: tokens per
    expert, the capacity, what is dropped, and the load-balancing loss.
    ``capacity_factor=None`` (or 0) is dropless."""
    from ..expert_parallel import load_balancing_loss

    cf = capacity_factor or None
    r = route(synthetic_logits(tokens, experts, skew, seed), top_k, cf)
    aux = load_balancing_loss(r.probs_TE, r.expert_idx_TK).item()
    cap = "dropless" if cf is None else f"capacity factor {cf:g} -> {r.capacity} slots per expert"
    title = (f"{tokens} tokens, top-{top_k} of {experts} experts, {cap}\n"
             f"dropped: {r.dropped_assignments} of {tokens * top_k} assignments "
             f"({r.dropped_tokens} tokens lost every expert); balancing loss {aux:.3f} (1 = even)")
    ep = ep if ep and experts % ep == 0 else None
    return tokens_per_expert_figure(r.tokens_per_expert.numpy(), r.kept_per_expert.numpy(),
                                    r.capacity, ep, title)


def alltoall_matrix_figure(send_counts: list[list[int]], title: str = "") -> Figure:
    """Rows each rank (row) sends each rank (column) in the dispatch all-to-all; the combine
    sends the transpose back. The diagonal never leaves the GPU."""
    m = np.asarray(send_counts)
    p = m.shape[0]
    fig = plt.figure(figsize=(1.0 * p + 2.4, 0.9 * p + 1.4), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0)
    for i in range(p):
        for j in range(p):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if m[i, j] > m.max() * 0.6 else "black",
                    fontweight="bold" if i == j else None)
    ax.set_xticks(range(p), [f"to {j}" for j in range(p)], fontsize=8)
    ax.set_yticks(range(p), [f"from {i}" for i in range(p)], fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="token rows")
    ax.set_title(title or "Dispatch all-to-all: rows sent (diagonal stays local)", fontsize=10)
    return fig


def moe_parameters_figure(model: str = "mixtral-8x7b", dtype: str = "bf16") -> Figure:
    """Total vs active parameters of a MoE model, split into experts and shared weights."""
    spec = memory.get_model(model)
    p = moe_parameters(spec)
    active_experts = p["active"] - p["shared"]
    fig = plt.figure(figsize=(6.5, 2.6), layout="constrained")
    ax = fig.add_subplot()
    rows = [("total (stored)", p["shared"], p["experts"]), ("active per token", p["shared"], active_experts)]
    for y, (label, shared, experts) in enumerate(rows):
        ax.barh(y, shared / 1e9, color="#8c8c8c", label="shared: attention, norms, router, embeddings" if y == 0 else None)
        ax.barh(y, experts / 1e9, left=shared / 1e9, color="#dd8452",
                label="expert MLPs" if y == 0 else None)
        total = shared + experts
        gb = total * memory.dtype_bytes(dtype) / 1e9
        what = "stored" if y == 0 else "read per token"
        ax.text(total / 1e9, y, f"  {total / 1e9:.2f}B params ({gb:.1f} GB {what}, {dtype})",
                va="center", fontsize=8)
    ax.set_yticks([0, 1], [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, p["total"] / 1e9 * 1.7)
    ax.set_xlabel("billions of parameters")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{spec.name}: top-{spec.top_k} of {spec.experts} experts per token", fontsize=10)
    return fig
