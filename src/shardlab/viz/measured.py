"""Figures of the measurements stored in ``benchmarks/results/``: predicted against measured.

Every function takes a result document (:func:`shardlab.results.load_result`) and returns a
Figure whose bottom line is the result's provenance (GPU, link, driver, CUDA, NCCL, torch,
date), so that no measured figure appears without saying where it was measured.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .. import cost, results

__all__ = ["caption", "collective_figure", "busbw_figure", "ratio_figure",
           "tp_speedup_figure", "overlap_figure"]

_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def caption(fig: Figure, result: dict) -> Figure:
    """Write the result's provenance line under the figure."""
    fig.text(0.01, 0.005, results.provenance_line(result), fontsize=7, color="0.35",
             ha="left", va="bottom", wrap=True)
    fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, 0.2))
    return fig


def _size_axis(ax, sizes) -> None:
    ax.set_xscale("log", base=2)
    ticks = [2**k for k in range(0, 41, 2) if min(sizes) <= 2**k <= max(sizes)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([results.format_bytes(t).replace(" ", "\n") for t in ticks], fontsize=7)
    ax.set_xlabel("message size S")


def collective_figure(result: dict, op: str = "all_reduce", dtype: str | None = None) -> Figure:
    """Left: measured time of one collective (shardlab and raw) against the link preset and
    the calibrated alpha-beta model. Right: each model's relative error per size."""
    rows = results.compare_collective(result, op, dtype)
    s = np.array([r["bytes"] for r in rows], dtype=float)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.loglog(s, [r["measured_s"] * 1e6 for r in rows], "o", label="measured: shardlab.comm")
    ax.loglog(s, [r["raw_s"] * 1e6 for r in rows], "x", ms=5, color="0.4",
              label="measured: torch.distributed")
    preset = results.preset_link(result)
    ax.loglog(s, [r["preset_s"] * 1e6 for r in rows], "--", label=f"preset {preset.name}")
    ax.loglog(s, [r["calibrated_s"] * 1e6 for r in rows], "-", label="calibrated alpha-beta")
    _size_axis(ax, s)
    ax.set_ylabel("time per call (us)")
    ax.set_title(f"{op.replace('_', '-')} ({dtype or results._default_dtype(result)}), "
                 f"{results._world(result)} ranks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax2.semilogx(s, [100 * r["preset_error"] for r in rows], "--o", ms=3, label="preset")
    ax2.semilogx(s, [100 * r["calibrated_error"] for r in rows], "-o", ms=3, label="calibrated")
    ax2.axhline(100 * results.CALIBRATION_GOAL, color="k", lw=0.8, ls=":",
                label=f"goal {100 * results.CALIBRATION_GOAL:.0f}%")
    _size_axis(ax2, s)
    ax2.set_yscale("symlog", linthresh=10)
    ax2.set_ylabel("|predicted - measured| / measured (%)")
    ax2.set_title("model error")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return caption(fig, result)


def busbw_figure(result: dict, dtype: str | None = None) -> Figure:
    """Bus bandwidth (nccl-tests' busbw) of every measured collective, with the link's
    per-direction bandwidth for scale."""
    dtype = dtype or results._default_dtype(result)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    p = results._world(result)
    every = [m["bytes"] for m in result["results"]["measurements"]]
    for op in _OPS:
        try:
            s, t = results.measured_curve(result, op, dtype)
        except ValueError:
            continue
        bw = [cost.bus_bandwidth(si, ti, p, results.OP_TO_COLLECTIVE[op]) / 1e9 for si, ti in zip(s, t)]
        ax.semilogx(s, bw, "-o", ms=3, label=op.replace("_", "-"))
    link = results.preset_link(result)
    ax.axhline(link.bandwidth / 1e9, color="k", ls=":", lw=0.8,
               label=f"{link.name}: {link.bandwidth / 1e9:.0f} GB/s each way")
    _size_axis(ax, every)
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"Bus bandwidth through shardlab.comm ({dtype})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return caption(fig, result)


def ratio_figure(result: dict, dtype: str | None = None) -> Figure:
    """shardlab.comm time over raw torch.distributed time, per collective and size."""
    dtype = dtype or results._default_dtype(result)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for op in _OPS:
        rows = [m for m in result["results"]["measurements"] if m["op"] == op and m["dtype"] == dtype]
        if rows:
            rows.sort(key=lambda m: m["bytes"])
            ax.semilogx([m["bytes"] for m in rows], [m["ratio"] for m in rows], "-o", ms=3,
                        label=op.replace("_", "-"))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(results.RATIO_GOAL, color="k", lw=0.8, ls=":",
               label=f"goal: within {100 * (results.RATIO_GOAL - 1):.0f}%")
    _size_axis(ax, [m["bytes"] for m in result["results"]["measurements"]])
    ax.set_ylabel("shardlab / raw time")
    ax.set_title(f"What the logging wrapper costs ({dtype})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return caption(fig, result)


def tp_speedup_figure(result: dict) -> Figure:
    """Measured TP speedup over one GPU for every shape, next to its roofline bound."""
    s = results.summarize_tp_layer(result)
    rows = s["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    x = np.arange(len(rows))
    w = 0.38
    ax.bar(x - w / 2, [r["speedup"] or 0 for r in rows], w, label="measured (best shardlab variant)")
    ax.bar(x + w / 2, [r["roofline_speedup"] or 0 for r in rows], w, alpha=0.6,
           label="roofline (measured ceilings + measured all-reduce)")
    for goal, phase in ((results.DECODE_SPEEDUP_GOAL, "decode"), (results.PREFILL_SPEEDUP_GOAL, "prefill")):
        idx = [i for i, r in enumerate(rows) if r["phase"] == phase]
        if idx:
            ax.hlines(goal, min(idx) - 0.45, max(idx) + 0.45, colors="k", linestyles=":")
            ax.text(max(idx) + 0.45, goal, f" goal {goal}x", va="center", fontsize=8)
    ax.axhline(s["tp"], color="0.6", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["shape"].replace(" ", "\n", 1) for r in rows], fontsize=8)
    ax.set_ylabel(f"speedup of TP={s['tp']} over 1 GPU")
    ax.set_title("A 70B-shaped layer: measured speedup and its roofline")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return caption(fig, result)


def overlap_figure(result: dict) -> Figure:
    """Time of the TP MLP at prefill per variant, for each prompt length."""
    ms = result["results"]["measurements"]
    token_counts = sorted({m["tokens"] for m in ms})
    fig, axes = plt.subplots(1, len(token_counts), figsize=(5.5 * len(token_counts), 4.2), squeeze=False)
    for ax, tokens in zip(axes[0], token_counts):
        rows = [m for m in ms if m["tokens"] == tokens and m.get("seconds")]
        labels = [m["variant"].replace("_", " ") + (f" x{m['chunks']}" if m["chunks"] > 1 else "")
                  for m in rows]
        colors = ["0.6" if m["variant"] in ("compute_only", "allreduce_only") else
                  "C1" if m["variant"] in ("async_op", "side_stream") else "C0" for m in rows]
        ax.barh(range(len(rows)), [m["seconds"] * 1e3 for m in rows], color=colors)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("time per MLP forward (ms)")
        ax.set_title(f"{tokens} tokens")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Overlapping the TP all-reduce with the MLP (grey: parts alone, "
                 "orange: overlapped)", fontsize=10)
    fig.tight_layout()
    return caption(fig, result)
