"""Figures for pipeline parallelism (chapters 5 and 6). Each returns a Figure.

A *timeline* is a sequence of :class:`~shardlab.pipeline.TimedOp` ``(stage, op, start,
end)``: the simulator's (:func:`~shardlab.pipeline.simulate`), the real executor's
measured one (:class:`~shardlab.pipeline.executor.PipelineRun`), or the forward-only
decode timeline of :func:`decode_timeline`. :func:`gantt` draws any of them, so the
simulated and the measured schedule sit side by side in the same style.

:func:`decode_timeline` and :func:`decode_summary` are plain arithmetic (no torch, no
matplotlib): the inference view of a pipeline, where a token must leave the last stage
before the next token can enter the first.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from ..pipeline import (
    Op,
    Schedule,
    TimedOp,
    bubble_fraction_closed_form,
    schedule,
    simulate,
)

__all__ = [
    "KIND_COLORS",
    "gantt",
    "gantt_figure",
    "schedule_figure",
    "op_order_figure",
    "bubble_vs_microbatches",
    "peak_memory_vs_microbatches",
    "activation_trace",
    "decode_timeline",
    "decode_figure",
    "decode_summary",
    "stored_timeline",
    "format_benchmark",
    "benchmark_figure",
]

KIND_COLORS = {"F": "#4c72b0", "B": "#55a868", "W": "#c44e52"}
KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight gradient"}
MARKERS = {"naive": "s", "gpipe": "o", "1f1b": "x", "interleaved-1f1b": "^", "zb-h1": "."}
SCHEDULE_COLORS = {"naive": "#8c8c8c", "gpipe": "#4c72b0", "1f1b": "#dd8452",
                   "interleaved-1f1b": "#55a868", "zb-h1": "#c44e52"}


def _timeline(obj) -> tuple[TimedOp, ...]:
    return tuple(obj.timeline) if hasattr(obj, "timeline") else tuple(obj)


def _shade(color: str, chunk: int) -> tuple:
    """Later model chunks in lighter tints of their kind's color."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    f = min(0.55, 0.3 * chunk)
    return (r + (1 - r) * f, g + (1 - g) * f, b + (1 - b) * f)


def _draw_timeline(ax, timeline: Sequence[TimedOp], *, stages: int | None = None,
                   scale: float = 1.0, labels: bool | None = None) -> None:
    stages = stages or (max(t.stage for t in timeline) + 1 if timeline else 1)
    end = max((t.end for t in timeline), default=1.0) * scale
    if labels is None:
        per_stage = max(1, len(timeline) / max(stages, 1))
        labels = per_stage <= 48
    chunked = any(t.op.chunk for t in timeline)
    for t in timeline:
        color = _shade(KIND_COLORS.get(t.op.kind, "#999999"), t.op.chunk)
        left, width = t.start * scale, (t.end - t.start) * scale
        ax.barh(t.stage, width, left=left, height=0.8, color=color, edgecolor="white",
                linewidth=0.6)
        if labels and width > end / 60:
            text = f"{t.op.microbatch}" + (f"'" * t.op.chunk if chunked else "")
            ax.text(left + width / 2, t.stage, text, ha="center", va="center", fontsize=7,
                    color="white" if t.op.chunk == 0 else "black", clip_on=True)
    ax.set_yticks(range(stages))
    ax.set_yticklabels([f"stage {s}" for s in range(stages)])
    ax.set_ylim(stages - 0.5, -0.5)
    ax.set_xlim(0, end * 1.01 if end > 0 else 1)
    ax.set_facecolor("#f2f2f2")  # idle time shows as grey: the bubble
    ax.grid(axis="x", color="white", linewidth=0.8)
    ax.set_axisbelow(True)


def _legend(ax, kinds: Iterable[str], chunked: bool = False) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=KIND_COLORS[k], label=KIND_NAMES[k]) for k in "FBW" if k in kinds]
    handles.append(Patch(color="#f2f2f2", label="idle (bubble)"))
    if chunked:
        handles.append(Patch(color=_shade("#777777", 1), label="later chunk (lighter, ')"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.28 if chunked else -0.22),
              ncol=len(handles), fontsize=8, frameon=False)


def _default_title(obj, timeline) -> str:
    sched = getattr(obj, "schedule", None)
    head = ""
    if isinstance(sched, Schedule):
        head = f"{sched.name}: p={sched.stages}, m={sched.microbatches}"
        if sched.chunks > 1:
            head += f", v={sched.chunks}"
    bubble = getattr(obj, "bubble_fraction", None)
    if bubble is not None:
        head += f"  (bubble {bubble:.0%})"
    return head


def gantt(result, *, ax=None, title: str | None = None, unit: str | None = None,
          labels: bool | None = None, legend: bool = True, figsize=None):
    """Gantt chart of a pipeline timeline: one row per stage, time to the right.

    ``result``: a :class:`~shardlab.pipeline.SimResult`, a measured
    :class:`~shardlab.pipeline.executor.PipelineRun`, or a sequence of ``TimedOp``.
    Forward blue, backward green, weight gradient red; later model chunks lighter; the
    grey background is idle time. Bars carry the micro-batch number. ``unit``: the x
    label (default "time (t_f = 1)" for simulations, "ms" for measured runs, which are
    drawn in milliseconds). Returns the Figure (the one ``ax`` belongs to, if given).
    """
    from matplotlib.figure import Figure

    timeline = _timeline(result)
    measured = hasattr(result, "reports")
    scale = 1e3 if measured else 1.0
    if unit is None:
        unit = "measured time (ms)" if measured else "time (one forward = 1)"
    stages = getattr(getattr(result, "schedule", None), "stages", None)
    if ax is None:
        n = stages or (max(t.stage for t in timeline) + 1)
        fig = Figure(figsize=figsize or (10, 0.45 * n + 1.4), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    _draw_timeline(ax, timeline, stages=stages, scale=scale, labels=labels)
    ax.set_xlabel(unit)
    ax.set_title(_default_title(result, timeline) if title is None else title, fontsize=10,
                 loc="left")
    if legend:
        _legend(ax, {t.op.kind for t in timeline}, any(t.op.chunk for t in timeline))
    return fig


def gantt_figure(results: Sequence, titles: Sequence[str] | None = None, *, sharex: bool = False,
                 width: float = 10.0, unit: str | None = None):
    """Several Gantt charts stacked (e.g. simulated above measured, or GPipe above 1F1B).

    With ``sharex`` the charts share one time axis (compare makespans by eye). ``unit``:
    the x label, as in :func:`gantt`."""
    from matplotlib.figure import Figure

    results = list(results)
    rows = []
    for r in results:
        stages = getattr(getattr(r, "schedule", None), "stages", None)
        rows.append(stages or (max(t.stage for t in _timeline(r)) + 1))
    heights = [0.45 * n + 0.9 for n in rows]
    fig = Figure(figsize=(width, sum(heights) + 0.8), layout="constrained")
    axes = fig.subplots(len(results), 1, sharex=sharex, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    kinds, chunked, ends = set(), False, []
    for i, (ax, r) in enumerate(zip(axes, results)):
        gantt(r, ax=ax, title=None if titles is None else titles[i], legend=False, unit=unit)
        tl = _timeline(r)
        ends.append(max((t.end for t in tl), default=1.0) * (1e3 if hasattr(r, "reports") else 1.0))
        kinds |= {t.op.kind for t in tl}
        chunked |= any(t.op.chunk for t in tl)
        if sharex and i < len(results) - 1:
            ax.set_xlabel("")
    if sharex:  # one time axis: wide enough for the longest timeline
        axes[0].set_xlim(0, max(ends) * 1.01)
    _legend(axes[-1], kinds, chunked)
    return fig


def op_order_figure(schedules: Sequence[Schedule], titles: Sequence[str] | None = None,
                    *, width: float = 10.0):
    """Each rank's op *order* in slots, no timing: how schedules are drawn in papers and
    tutorials (every op one box). Use it to hold a diagram up against the data."""
    from matplotlib.figure import Figure

    schedules = list(schedules)
    heights = [0.42 * s.stages + 0.9 for s in schedules]
    fig = Figure(figsize=(width, sum(heights) + 0.7), layout="constrained")
    axes = fig.subplots(len(schedules), 1, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    kinds = set()
    for i, (ax, sched) in enumerate(zip(axes, schedules)):
        tl = [TimedOp(s, op, j, j + 1) for s, ops in enumerate(sched.ops) for j, op in enumerate(ops)]
        kinds |= {t.op.kind for t in tl}
        _draw_timeline(ax, tl, stages=sched.stages, labels=True)
        ax.set_xlabel("op slot on its rank (order only, no timing)")
        ax.set_title(titles[i] if titles else sched.name, fontsize=10, loc="left")
    _legend(axes[-1], kinds)
    return fig


def schedule_figure(name: str = "1f1b", stages: int = 4, microbatches: int = 8, chunks: int = 2,
                    backward_ratio: float = 2.0, weight_fraction: float = 0.5):
    """Simulated Gantt chart of one schedule with its bubble and peak memory in the
    title: the figure of the chapter 5-6 dashboard.

    ``backward_ratio`` = t_b / t_f (t_f = 1); ``weight_fraction``: the share of the
    backward that is weight gradient (``zb-h1`` only). ``chunks`` is used by
    ``interleaved-1f1b`` only, whose m is rounded up to a multiple of p."""
    v = chunks if name == "interleaved-1f1b" else 1
    m = microbatches
    note = ""
    if name == "interleaved-1f1b" and m % stages:
        m = -(-m // stages) * stages
        note = f" (m rounded up to {m}, a multiple of p)"
    sched = schedule(name, stages, m, v)
    r = simulate(sched, 1.0, backward_ratio, t_weight=weight_fraction * backward_ratio)
    head = f"{name}: p={stages}, m={m}" + (f", v={v}" if v > 1 else "") + note
    title = (f"{head}\nbubble {r.bubble_fraction:.1%}   makespan {r.makespan:g}   "
             f"peak activations per stage "
             f"{', '.join(f'{x:g}' for x in r.peak_activation_memory)} (micro-batches' worth)")
    return gantt(r, title=title)


def bubble_vs_microbatches(stages: int = 4, microbatches: Sequence[int] = tuple(range(1, 33)), *,
                           names: Sequence[str] = ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"),
                           chunks: int = 2, t_forward: float = 1.0, t_backward: float = 2.0,
                           target: float | None = None, ax=None):
    """Simulated bubble fraction against the number of micro-batches m, one curve per
    schedule (markers: :func:`simulate`; dashed: the closed form where there is one).
    ``interleaved-1f1b`` uses ``chunks`` chunks and only m that are multiples of p;
    ``zb-h1`` splits the backward half and half (``t_weight = t_backward / 2``)."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(8, 4.2), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    for name in names:
        v = chunks if name == "interleaved-1f1b" else 1
        ms = [m for m in microbatches if name != "interleaved-1f1b" or m % stages == 0]
        if not ms:
            continue
        sim = [simulate(schedule(name, stages, m, v), t_forward, t_backward).bubble_fraction for m in ms]
        label = name + (f" (v={v})" if v > 1 else "")
        color = SCHEDULE_COLORS.get(name)
        marker = MARKERS.get(name, "o")
        ax.plot(ms, sim, marker, ms=5 if marker == "o" else 4, color=color, label=label,
                mfc="none" if name == "gpipe" else color)
        closed = []
        for m in ms:
            try:
                closed.append(bubble_fraction_closed_form(name, stages, m, v, t_forward=t_forward,
                                                          t_backward=t_backward))
            except ValueError:
                closed.append(float("nan"))
        ax.plot(ms, closed, "--", lw=1, color=color)
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls=":")
        ax.text(max(microbatches), target, f" {target:.0%}", va="bottom", ha="right", fontsize=8)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble fraction (idle / stages x makespan)")
    ax.set_ylim(0, 1)
    ax.set_title(f"p = {stages} stages, t_b/t_f = {t_backward / t_forward:g}: markers simulated, "
                 "dashed closed form", fontsize=10, loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def peak_memory_vs_microbatches(stages: int = 4, microbatches: Sequence[int] = tuple(range(1, 33)), *,
                                names: Sequence[str] = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1"),
                                chunks: int = 2, ax=None):
    """Peak activation memory of the busiest stage (stage 0) against m, in units of one
    micro-batch's activations through a rank's whole share of layers
    (``SimResult.peak_activation_memory``): GPipe grows with m, 1F1B stops at p."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(8, 4.2), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    for name in names:
        v = chunks if name == "interleaved-1f1b" else 1
        ms = [m for m in microbatches if name != "interleaved-1f1b" or m % stages == 0]
        peaks = [max(simulate(schedule(name, stages, m, v)).peak_activation_memory) for m in ms]
        ax.plot(ms, peaks, MARKERS.get(name, "o") + "-", ms=4, lw=1, color=SCHEDULE_COLORS.get(name),
                mfc="none" if name == "gpipe" else None,
                label=name + (f" (v={v})" if v > 1 else ""))
    ax.axhline(stages, color="black", lw=0.8, ls=":")
    ax.text(min(microbatches), stages, f" p = {stages}", va="bottom", fontsize=8)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("peak activations, stage 0\n(micro-batches' worth)")
    ax.set_title(f"p = {stages} stages: activations held at the peak", fontsize=10, loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def activation_trace(runs: Mapping[str, object], *, stage: int = 0, ax=None):
    """Measured activation bytes held on one stage over a step, one line per run
    (``{"gpipe": run, "1f1b": run}``): the saved-tensor count the executor keeps,
    sampled at the end of every op and normalized by one F's worth."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(8, 3.6), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    for name, run in runs.items():
        rep = run.reports[stage]
        unit = rep.activation_unit_bytes or 1
        ops = [t for t in rep.timeline]
        xs = list(range(1, len(ops) + 1))
        ys = [b / unit for _, b in rep.memory_trace]
        ax.step([0] + xs, [0] + ys, where="post", label=name,
                color=SCHEDULE_COLORS.get(run.schedule.name))
    ax.set_xlabel(f"ops completed on stage {stage}")
    ax.set_ylabel("activations held\n(one F's worth = 1)")
    ax.set_title(f"Measured on stage {stage}: saved tensors held for the backward pass",
                 fontsize=10, loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- inference


def decode_timeline(stages: int, tokens: int, *, requests: int = 1, t_stage: float = 1.0,
                    t_p2p: float = 0.0) -> tuple[TimedOp, ...]:
    """Forward-only decode through a pipeline of ``stages``: ``requests`` independent
    sequences, ``tokens`` new tokens each.

    A token of one sequence passes stage 0, 1, ..., p-1 (``t_stage`` each, ``t_p2p`` per
    hop), and the next token of that sequence can enter stage 0 only after the sampled
    token comes back from the last stage (one more hop). With one sequence there is
    nothing to overlap: one stage works at a time. Different sequences can fill the
    other stages (each stage serves them first come, first served). Ops are labelled
    ``F`` with ``microbatch`` = the request number.
    """
    for what, val in (("stages", stages), ("tokens", tokens), ("requests", requests)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{what} must be a positive int, got {val!r}")
    if t_stage <= 0 or t_p2p < 0:
        raise ValueError("t_stage must be > 0 and t_p2p >= 0")
    free = [0.0] * stages
    ready = [0.0] * requests  # when each request's next token may enter stage 0
    out = []
    for _ in range(tokens):
        for r in sorted(range(requests), key=lambda r: (ready[r], r)):
            t = ready[r]
            for s in range(stages):
                if s:
                    t += t_p2p
                start = max(t, free[s])
                t = free[s] = start + t_stage
                out.append(TimedOp(s, Op("F", r, 0, s), start, t))
            ready[r] = t + (t_p2p if stages > 1 else 0.0)
    out.sort(key=lambda x: (x.stage, x.start))
    return tuple(out)


def decode_figure(stages: int = 4, tokens: int = 3, *, requests: Sequence[int] = (1, 4),
                  t_stage: float = 1.0, t_p2p: float = 0.0):
    """The inference view: decode timelines for each number of concurrent requests, on
    one time axis. Bars carry the token number; each request has its own color."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    fig = Figure(figsize=(10, len(requests) * (0.45 * stages + 1.0) + 0.6), layout="constrained")
    axes = fig.subplots(len(requests), 1, sharex=True, squeeze=False)[:, 0]
    for ax, r in zip(axes, requests):
        tl = decode_timeline(stages, tokens, requests=r, t_stage=t_stage, t_p2p=t_p2p)
        end = max(t.end for t in tl)
        # Which token each bar is: the k-th op of a request on a stage is token k.
        count: dict = {}
        for t in tl:
            k = count.get((t.stage, t.op.microbatch), 0)
            count[(t.stage, t.op.microbatch)] = k + 1
            ax.barh(t.stage, t.end - t.start, left=t.start, height=0.8,
                    color=palette[t.op.microbatch % len(palette)], edgecolor="white", linewidth=0.6)
            ax.text((t.start + t.end) / 2, t.stage, f"t{k}", ha="center", va="center", fontsize=7,
                    color="white")
        s = decode_summary(stages, tokens, requests=r, t_stage=t_stage, t_p2p=t_p2p)
        ax.set_yticks(range(stages))
        ax.set_yticklabels([f"stage {i}" for i in range(stages)])
        ax.set_ylim(stages - 0.5, -0.5)
        ax.set_xlim(0, end * 1.01)
        ax.set_facecolor("#f2f2f2")
        ax.set_title(f"{r} request{'s' if r > 1 else ''} in flight: "
                     f"{s['latency_per_token']:.3g} per token per request, "
                     f"utilization {s['utilization']:.0%}", fontsize=10, loc="left")
        if r > 1:
            ax.legend(handles=[Patch(color=palette[i % len(palette)], label=f"request {i}")
                               for i in range(r)], fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xlabel("time (one stage's forward for one token = 1)")
    return fig


def decode_summary(stages: int, tokens: int, *, requests: int = 1, t_stage: float = 1.0,
                   t_p2p: float = 0.0) -> dict:
    """Latency per token, throughput and utilization of :func:`decode_timeline`."""
    tl = decode_timeline(stages, tokens, requests=requests, t_stage=t_stage, t_p2p=t_p2p)
    makespan = max(t.end for t in tl)
    busy = sum(t.end - t.start for t in tl)
    return {
        "stages": stages, "requests": requests, "tokens": tokens,
        "makespan": makespan,
        "latency_per_token": makespan / tokens,
        "tokens_per_time": requests * tokens / makespan,
        "utilization": busy / (stages * makespan),
    }


# --------------------------------------------------------------------------- stored GPU results


def stored_timeline(doc: dict, name: str, which: str = "ops") -> tuple[TimedOp, ...]:
    """The per-op timeline a benchmark result stored for schedule ``name``
    (``which="ops"`` measured, ``"simulated"`` the simulator's), in seconds."""
    rows = doc["results"]["timelines"][name][which]
    return tuple(TimedOp(int(s), Op(kind, int(mb), int(c), int(s)), float(a), float(b))
                 for s, kind, mb, c, a, b in rows)


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f}us"


def format_benchmark(doc: dict) -> str:
    """The stored pipeline benchmark (``benchmarks/pipeline.py``) as a text table."""
    lines = [f"{'schedule':>16} {'m':>3} {'makespan':>10} {'t_f':>8} {'t_b':>8} "
             f"{'bubble: measured':>17} {'replayed':>9} {'simulated':>10} {'closed form':>12} "
             f"{'hop':>7} {'send post':>9} {'stage-0 peak memory':>20} {'activations held':>17}"]
    for r in doc["results"].get("runs", []):
        mem = r["peak_memory_allocated"][0]
        held = "/".join(f"{k:g}" for k in r["peak_activations"])
        lines.append(
            f"{r['schedule']:>16} {r['microbatches']:>3} {r['makespan_s'] * 1e3:>8.1f}ms "
            f"{r['t_forward_s'] * 1e3:>6.2f}ms {r['t_backward_s'] * 1e3:>6.2f}ms "
            f"{r['measured_bubble']:>17.1%} {r.get('replayed_bubble', float('nan')):>9.1%} "
            f"{r['simulated_bubble']:>10.1%} {r['closed_form_bubble']:>12.1%} "
            f"{_us(r.get('hop_latency_s')):>7} {_us(r.get('send_post_s')):>9} "
            f"{(mem / 2**30 if mem else float('nan')):>16.2f} GiB {held:>17}")
    return "\n".join(lines)


def benchmark_figure(doc: dict):
    """Stored GPU pipeline results: bubble (measured; replayed from the measured op
    durations with no gaps; the closed form) and stage 0's peak memory against m, per
    schedule (GPipe, 1F1B, interleaved 1F1B)."""
    from matplotlib.figure import Figure

    runs = doc["results"].get("runs", [])
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name in sorted({r["schedule"] for r in runs}, key=lambda n: n != "gpipe"):
        rs = sorted((r for r in runs if r["schedule"] == name), key=lambda r: r["microbatches"])
        ms = [r["microbatches"] for r in rs]
        c = SCHEDULE_COLORS.get(name)
        ax1.plot(ms, [r["measured_bubble"] for r in rs], "o-", color=c, label=f"{name} measured")
        if "replayed_bubble" in rs[0]:
            ax1.plot(ms, [r["replayed_bubble"] for r in rs], "x:", color=c,
                     label=f"{name} replayed (measured op times, no gaps)")
        if rs[0].get("chunks", 1) > 1:  # interleaving has its own closed form
            ax1.plot(ms, [r["closed_form_bubble"] for r in rs], "--", color=c, lw=1,
                     label=f"{name} closed form (v={rs[0]['chunks']})")
        mem = [r["peak_memory_allocated"][0] for r in rs]
        if all(x is not None for x in mem):  # mock devices report no CUDA memory
            ax2.plot(ms, [x / 2**30 for x in mem], "o-", color=c, label=f"{name}")
    if runs:
        ms = sorted({r["microbatches"] for r in runs})
        p = runs[0]["stages"]
        ax1.plot(ms, [(p - 1) / (m + p - 1) for m in ms], "k--", lw=1, label="(p-1)/(m+p-1)")
    ax1.set_xscale("log", base=2)
    ax2.set_xscale("log", base=2)
    ax1.set_xlabel("micro-batches m")
    ax2.set_xlabel("micro-batches m")
    ax1.set_ylabel("bubble fraction")
    ax2.set_ylabel("stage 0: max_memory_allocated (GiB)")
    ax1.set_title("Bubble", fontsize=10, loc="left")
    ax2.set_title("Peak memory on stage 0", fontsize=10, loc="left")
    if not ax2.lines:
        ax2.set_title("Peak memory on stage 0: not measured (mock devices)", fontsize=10, loc="left")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return fig
