"""Time a pipeline schedule: an event-driven simulator and the closed forms it meets.

Model: every rank runs its ops in the schedule's order, one at a time. An op starts
when its rank is free and every dependency has finished (plus ``t_p2p`` for a
dependency computed on another rank: the activation or gradient has to travel).
Nothing else is modelled (no memory limits, no overlap of communication with
compute on the receiving side), which is exactly the setting of the textbook
bubble formulas, so the simulator reproduces them to rounding error.

Durations are per op. ``t_forward`` and ``t_backward`` are the times for one
micro-batch through one rank's whole share of the layers; with ``chunks = v``
model chunks per rank each chunk holds 1/v of that share, so one chunk's F takes
``t_forward / v`` and a micro-batch still costs ``t_forward + t_backward`` on every
rank, whatever v is. For split-backward schedules (``zb-h1``) B (input gradient)
takes ``t_backward - t_weight`` and W (weight gradient) takes ``t_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from .schedules import Op, Schedule, _run_order, check_schedule_args

__all__ = [
    "TimedOp",
    "SimResult",
    "simulate",
    "bubble_fraction_closed_form",
    "min_microbatches_for_bubble",
]


class TimedOp(NamedTuple):
    """One op as it ran in the simulation: on ``stage``, from ``start`` to ``end``.

    A named tuple rather than a dataclass: a timeline has 10^5 of them, and
    ``for stage, op, start, end in result.timeline`` is handy for plotting.
    """

    stage: int
    op: Op
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` measured.

    * ``timeline``: every op with its start and end, rank by rank, in run order.
    * ``makespan``: time from the first op's start (0) to the last op's end.
    * ``bubble_fraction``: idle time over ``stages * makespan`` (0 = never idle).
    * ``peak_activations``: per stage, the most micro-batches whose activations are
      held at once. A micro-batch's activations are held from the start of its F
      until its B finishes (its W, in split-backward schedules: W still needs the
      layer inputs). With ``chunks > 1`` the unit is a *micro-batch-chunk*: the
      activations of one micro-batch through one model chunk, 1/chunks of a
      micro-batch through the rank's whole share (see ``peak_activation_memory``).
    * ``peak_activation_memory``: ``peak_activations / chunks``, in units of one
      micro-batch's activations through the rank's whole share of layers, so that
      schedules with different chunk counts compare directly.
    * ``per_stage_busy`` / ``per_stage_idle``: compute time and idle time per rank
      (idle counted up to the makespan).
    """

    schedule: Schedule = field(repr=False)
    timeline: tuple[TimedOp, ...] = field(repr=False)  # one entry per op: long
    makespan: float
    bubble_fraction: float
    peak_activations: tuple[int, ...]
    peak_activation_memory: tuple[float, ...]
    per_stage_busy: tuple[float, ...]
    per_stage_idle: tuple[float, ...]

    def stage_timeline(self, stage: int) -> tuple[TimedOp, ...]:
        """The timeline entries of one rank, in run order."""
        return tuple(t for t in self.timeline if t.stage == stage)


def _check_time(what: str, value: float, *, positive: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be a finite number {need}, got {value!r}")
    return value


def _durations(
    sched: Schedule, t_forward: float, t_backward: float, t_weight: float | None
) -> dict[str, float]:
    """Duration of one op of each kind, for one model chunk."""
    t_forward = _check_time("t_forward", t_forward, positive=True)
    t_backward = _check_time("t_backward", t_backward, positive=True)
    if t_weight is None:
        t_weight = t_backward / 2
    t_weight = _check_time("t_weight", t_weight, positive=False)
    if t_weight > t_backward:
        raise ValueError(
            f"t_weight ({t_weight}) is the weight-gradient part of t_backward ({t_backward}); "
            "it cannot be larger"
        )
    v = sched.chunks
    if sched.splits_backward:
        return {"F": t_forward / v, "B": (t_backward - t_weight) / v, "W": t_weight / v}
    # B does input and weight gradients together; t_weight only says how a split
    # schedule would divide t_backward, so it does not change anything here.
    return {"F": t_forward / v, "B": t_backward / v}


def simulate(
    sched: Schedule,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
    *,
    t_weight: float | None = None,
    t_p2p: float = 0.0,
) -> SimResult:
    """Run ``sched`` on an idealised machine and measure its timeline.

    ``t_forward`` / ``t_backward``: time of one micro-batch's forward / full
    backward through one rank's layers (split evenly over its chunks).
    ``t_weight``: the weight-gradient part of ``t_backward``, used by split-backward
    schedules (``zb-h1``); default ``t_backward / 2``; ignored by the others.
    ``t_p2p``: latency added to every dependency that crosses ranks.

    Raises ValueError if the schedule deadlocks or a time is negative.
    """
    dur = _durations(sched, t_forward, t_backward, t_weight)
    t_p2p = _check_time("t_p2p", t_p2p, positive=False)

    # _run_order gives op numbers in an order where every dependency and every
    # earlier op of the same rank comes first, so one pass assigns all times.
    flat, deps, ranges = sched._graph
    stage_of = [s for s, r in enumerate(ranges) for _ in r]
    op_time = [dur[op.kind] for op in flat]
    start = [0.0] * len(flat)
    end = [0.0] * len(flat)
    free = [0.0] * sched.stages
    for i in _run_order(sched):
        s = stage_of[i]
        t = free[s]
        for d in deps[i]:
            # A dependency from another rank has to travel: add the p2p latency.
            ready = end[d] + t_p2p if stage_of[d] != s else end[d]
            if ready > t:
                t = ready
        start[i] = t
        end[i] = free[s] = t + op_time[i]
    timed = [[TimedOp(s, flat[i], start[i], end[i]) for i in r] for s, r in enumerate(ranges)]

    makespan = max(free) if free else 0.0
    busy = tuple(math.fsum(t.end - t.start for t in ops) for ops in timed)
    idle = tuple(makespan - b for b in busy)
    bubble = math.fsum(idle) / (sched.stages * makespan) if makespan > 0 else 0.0

    # Activations are taken when an F starts and given back when the releasing op
    # (B, or W if the schedule has W) ends. A rank runs one op at a time, so the
    # count held at any moment is the running count over its op list.
    release = "W" if sched.splits_backward else "B"
    peaks = []
    for ops in sched.ops:
        held = peak = 0
        for op in ops:
            if op.kind == "F":
                held += 1
                peak = max(peak, held)
            elif op.kind == release:
                held -= 1
        peaks.append(peak)

    return SimResult(
        schedule=sched,
        timeline=tuple(t for ops in timed for t in ops),
        makespan=makespan,
        bubble_fraction=bubble,
        peak_activations=tuple(peaks),
        peak_activation_memory=tuple(pk / sched.chunks for pk in peaks),
        per_stage_busy=busy,
        per_stage_idle=idle,
    )


# --------------------------------------------------------------------------- closed forms


def bubble_fraction_closed_form(
    name: str,
    p: int,
    m: int,
    v: int = 1,
    *,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
    t_weight: float | None = None,
) -> float:
    """The bubble fraction of schedule ``name`` from its formula (``t_p2p = 0``).

    * ``naive``: (p-1)/p, whatever m.
    * ``gpipe``, ``1f1b``: (p-1)/(m+p-1), whatever the op times.
    * ``interleaved-1f1b`` (v chunks, m a multiple of p): (p-1)/(v*m+p-1): the
      bubble time per rank is (p-1)*(t_f+t_b)/v, v times less than 1F1B's.
    * ``zb-h1`` (needs m >= p): each rank idles (p-1)*(t_f + t_B - t_W), where
      t_B = t_backward - t_weight is the input-gradient part and t_W = t_weight,
      instead of 1F1B's (p-1)*(t_f + t_backward); fraction = that idle time over
      m*(t_f+t_backward) plus it. Holds while t_W <= t_f and t_W <= t_B (W fits
      into the gaps it fills); otherwise ValueError (simulate instead).

    The times only matter for ``zb-h1``; the others' fractions do not depend on them.
    Arguments are checked as :func:`~shardlab.pipeline.schedule` checks them.
    """
    check_schedule_args(name, p, m, v)
    if name == "naive":
        return (p - 1) / p
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    # zb-h1
    t_f = _check_time("t_forward", t_forward, positive=True)
    t_b = _check_time("t_backward", t_backward, positive=True)
    t_w = t_b / 2 if t_weight is None else _check_time("t_weight", t_weight, positive=False)
    if t_w > t_b:
        raise ValueError(f"t_weight ({t_w}) cannot exceed t_backward ({t_b})")
    t_bi = t_b - t_w
    if m < p and p > 1:
        raise ValueError(f"the zb-h1 closed form needs m >= p (got m={m}, p={p}); use simulate()")
    if t_w > t_f or t_w > t_bi:
        raise ValueError(
            f"the zb-h1 closed form needs t_weight <= t_forward and t_weight <= t_backward - t_weight "
            f"(got t_forward={t_f}, t_backward={t_b}, t_weight={t_w}); use simulate()"
        )
    idle = (p - 1) * (t_f + t_bi - t_w)
    return idle / (m * (t_f + t_b) + idle)


def min_microbatches_for_bubble(
    name: str,
    p: int,
    target: float,
    v: int = 1,
    *,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
    t_weight: float | None = None,
) -> int:
    """Smallest number of micro-batches m with closed-form bubble fraction < ``target``.

    For ``interleaved-1f1b`` only multiples of ``p`` count (the schedule needs them);
    for ``zb-h1`` only m >= p (where its closed form holds). Raises ValueError if no
    m can get there (``naive``'s bubble does not depend on m; a target <= 0 needs
    p = 1).
    """
    target = float(target)
    if not (0.0 < target <= 1.0) or not math.isfinite(target):
        raise ValueError(f"target must be a bubble fraction in (0, 1], got {target!r}")
    kw = dict(t_forward=t_forward, t_backward=t_backward, t_weight=t_weight)
    step = p if name == "interleaved-1f1b" else 1
    first = p if name == "zb-h1" else step

    def bubble(m: int) -> float:
        return bubble_fraction_closed_form(name, p, m, v, **kw)

    if name == "naive":
        if bubble(1) < target:
            return 1
        raise ValueError(
            f"the naive schedule's bubble is (p-1)/p = {bubble(1):.4f} for every m; "
            "micro-batches cannot bring it below the target: use gpipe or 1f1b"
        )
    if bubble(first) < target:
        return first
    # Every other bubble falls monotonically towards 0 as m grows: double, then bisect
    # over multiples of step (k counts steps: m = k * step).
    lo = first // step  # bubble(lo * step) >= target
    hi = max(lo, 1) * 2
    while bubble(hi * step) >= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bubble(mid * step) < target:
            hi = mid
        else:
            lo = mid
    return hi * step
