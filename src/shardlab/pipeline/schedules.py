"""Pipeline schedules as data.

A *schedule* says, for every rank of a pipeline, the order in which it runs its
forward (``F``), backward (``B``) and, for zero-bubble schedules, weight-gradient
(``W``) ops. Nothing here runs a model: a schedule is a small immutable value that
the simulator (:mod:`shardlab.pipeline.simulator`) times, the figures draw, and a
real executor can walk op by op.

Vocabulary (used the same way in the book):

* **stage** / **rank**: one GPU of the pipeline, ``0 .. stages-1``. With one model
  chunk per rank the two are the same thing; ``Op.stage`` is the rank that runs it.
* **micro-batch**: one slice of the batch, ``0 .. microbatches-1``.
* **chunk** (model chunk): with interleaving each rank holds ``chunks`` separate
  slices of the layers. Chunk ``c`` on rank ``s`` is **virtual stage**
  ``c * stages + s`` (Megatron's layout: rank ``s`` holds virtual stages
  ``s, s+p, s+2p, ...``), so a micro-batch visits rank 0, 1, ..., p-1, then rank 0
  again for chunk 1, and so on.

Dependencies (what an op waits for, besides the ops before it on its own rank):

* ``F`` of virtual stage ``k`` needs ``F`` of virtual stage ``k-1`` for the same
  micro-batch (its input activations; a p2p hop when the two are on different ranks).
* ``B`` of virtual stage ``k`` needs ``B`` of ``k+1`` (the gradient of its output);
  the last virtual stage's ``B`` needs its own ``F`` (the loss).
* ``W`` needs the ``B`` of the same (stage, chunk, micro-batch), on the same rank.

A ``B`` also uses the activations its own ``F`` saved; that is local state, not a
message, and it is implied by the edges above, so it is not listed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "SCHEDULE_NAMES",
    "Op",
    "Schedule",
    "schedule",
    "check_schedule_args",
    "execution_order",
    "validate_schedule",
]

#: Every name :func:`schedule` accepts, in the order the course introduces them.
SCHEDULE_NAMES: tuple[str, ...] = ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1")

# Schedules that take several model chunks per rank.
_CHUNKED = frozenset({"interleaved-1f1b"})

_KINDS = ("F", "B", "W")


@dataclass(frozen=True)
class Op:
    """One unit of work on one rank: a forward, backward or weight-gradient pass
    of one model chunk for one micro-batch.

    ``kind`` is ``"F"`` (forward), ``"B"`` (backward; in split-backward schedules
    such as ``zb-h1`` only the input gradient) or ``"W"`` (weight gradient, split
    schedules only). ``stage`` is the rank that runs the op.
    """

    kind: str
    microbatch: int
    chunk: int = 0
    stage: int = 0

    @property
    def label(self) -> str:
        """Short name for diagrams and tests: ``"F3"``, or ``"F3c1"`` for chunk 1."""
        suffix = f"c{self.chunk}" if self.chunk else ""
        return f"{self.kind}{self.microbatch}{suffix}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: for every rank, the ordered ops it runs.

    ``ops[s]`` is the tuple of :class:`Op` that rank ``s`` executes, in order. Use
    :meth:`deps` for the ops each one waits for. Build one with :func:`schedule`.
    """

    name: str
    stages: int
    microbatches: int
    chunks: int
    ops: tuple[tuple[Op, ...], ...] = field(repr=False)  # 10^5 ops at p=64, m=1024

    def __str__(self) -> str:
        """One line per rank with its op labels: ``print(sched)`` in a notebook."""
        head = f"{self.name}: stages={self.stages} microbatches={self.microbatches} chunks={self.chunks}"
        return "\n".join([head] + [f"stage {s}: {' '.join(self.labels(s))}" for s in range(self.stages)])

    @property
    def virtual_stages(self) -> int:
        """Number of model chunks in the whole pipeline (``stages * chunks``)."""
        return self.stages * self.chunks

    @cached_property
    def splits_backward(self) -> bool:
        """True when the schedule has separate ``W`` (weight-gradient) ops."""
        return any(op.kind == "W" for ops in self.ops for op in ops)

    def virtual_stage(self, op: Op) -> int:
        """Position of ``op``'s model chunk in the whole model: ``chunk * stages + stage``."""
        return op.chunk * self.stages + op.stage

    def deps(self, op: Op) -> tuple[Op, ...]:
        """The ops whose results ``op`` needs (see the module docstring).

        A dependency whose ``stage`` differs from ``op.stage`` is a message between
        ranks (a p2p send/recv); one on the same stage is local.
        """
        if op.kind not in _KINDS:
            raise ValueError(f"unknown op kind {op.kind!r}; expected one of {_KINDS}")
        return tuple(Op(*key) for key in _dep_keys(op.kind, op.microbatch, op.chunk, op.stage,
                                                    self.stages, self.virtual_stages))

    @cached_property
    def _graph(self) -> tuple[tuple[Op, ...], tuple[tuple[int, ...], ...], tuple[range, ...]]:
        """Ops numbered 0..n-1 rank by rank, each op's dependencies as op numbers,
        and each rank's range of numbers. Built (and the schedule's structure
        checked, raising ValueError) once per schedule; the simulator and the
        deadlock check then work on plain integers, fast enough for 10^5 ops."""
        p, m, v = self.stages, self.microbatches, self.chunks
        nv = p * v
        if len(self.ops) != p:
            raise ValueError(f"schedule has op lists for {len(self.ops)} ranks, expected {p}")
        kinds = _KINDS if self.splits_backward else _KINDS[:2]
        kind_index = {k: i for i, k in enumerate(kinds)}
        # Each (kind, virtual stage, micro-batch) gets a code; number[code] is the
        # op number of the one op with that code (-1 while none is seen).
        number = [-1] * (len(kinds) * nv * m)
        codes: list[int] = []
        ranges, n = [], 0
        for s, ops in enumerate(self.ops):
            for op in ops:
                if op.stage != s:
                    raise ValueError(f"{op.label} of stage {op.stage} is in the list of stage {s}")
                if op.kind not in kind_index:
                    raise ValueError(f"stage {s}: op kind {op.kind!r} is not one of {kinds}")
                if not (0 <= op.chunk < v and 0 <= op.microbatch < m):
                    raise ValueError(f"stage {s}: {op.label} is out of range (chunks={v}, microbatches={m})")
                code = (kind_index[op.kind] * nv + op.chunk * p + s) * m + op.microbatch
                if number[code] >= 0:
                    raise ValueError(f"stage {s}: {op.label} is scheduled twice")
                number[code] = n
                codes.append(code)
                n += 1
            ranges.append(range(n - len(ops), n))
        if n != len(number):
            code = number.index(-1)
            k, rest = divmod(code, nv * m)
            vs, mb = divmod(rest, m)
            missing = Op(kinds[k], mb, vs // p, vs % p)
            raise ValueError(
                f"schedule has {n} ops, expected {len(number)}; "
                f"for example {missing.label} on stage {missing.stage} is missing"
            )
        # Dependencies (module docstring), computed on codes: F=0, B=1, W=2.
        F, B = 0, nv * m
        last = (nv - 1) * m  # first code of the last virtual stage
        deps = []
        for code in codes:
            k, rest = divmod(code, nv * m)
            if k == 0:
                dep = (number[rest - m],) if rest >= m else ()  # F of the previous virtual stage
            elif k == 1:
                # B of the next virtual stage, or, on the last one, its own F (the loss).
                dep = (number[B + rest + m],) if rest < last else (number[F + rest],)
            else:
                dep = (number[B + rest],)  # W needs its own B
            deps.append(dep)
        flat = tuple(op for ops in self.ops for op in ops)
        return flat, tuple(deps), tuple(ranges)

    @cached_property
    def _positions(self) -> dict[Op, tuple[int, int]]:
        return {op: (s, i) for s, ops in enumerate(self.ops) for i, op in enumerate(ops)}

    def position(self, op: Op) -> tuple[int, int]:
        """``(stage, index)`` of ``op`` in :attr:`ops`, e.g. for an executor's
        bookkeeping; KeyError if ``op`` is not scheduled."""
        return self._positions[op]

    def labels(self, stage: int) -> list[str]:
        """The op labels of one rank, in order, e.g. ``['F0', 'F1', 'B0', ...]``."""
        return [op.label for op in self.ops[stage]]


def _dep_keys(kind: str, mb: int, chunk: int, stage: int, p: int, nv: int) -> tuple[tuple, ...]:
    """Dependencies of one op as ``(kind, microbatch, chunk, stage)`` tuples.

    Works on plain tuples so that the simulator can handle 10^5 ops quickly.
    ``p`` ranks, ``nv`` virtual stages in all.
    """
    k = chunk * p + stage  # virtual stage
    if kind == "F":
        return (("F", mb, (k - 1) // p, (k - 1) % p),) if k > 0 else ()
    if kind == "B":
        if k < nv - 1:
            return (("B", mb, (k + 1) // p, (k + 1) % p),)
        return (("F", mb, chunk, stage),)  # the loss: last virtual stage's own forward
    if kind == "W":
        return (("B", mb, chunk, stage),)
    return ()


# --------------------------------------------------------------------------- builders
# Each builder returns, for one rank, the list of ops in execution order.


def _naive(p: int, m: int, s: int) -> list[Op]:
    # One micro-batch at a time: its forward and backward finish before the next
    # starts, so at any moment only one rank works.
    ops: list[Op] = []
    for i in range(m):
        ops += [Op("F", i, 0, s), Op("B", i, 0, s)]
    return ops


def _gpipe(p: int, m: int, s: int) -> list[Op]:
    # All forwards, then all backwards (in micro-batch order, like PyTorch's
    # ScheduleGPipe): every micro-batch's activations are alive at the turn.
    return [Op("F", i, 0, s) for i in range(m)] + [Op("B", i, 0, s) for i in range(m)]


def _one_f_one_b(p: int, m: int, s: int) -> list[Op]:
    # Warm-up: just enough forwards that the first backward arrives as the last
    # warm-up forward ends; rank s is p-1-s hops from the last stage.
    warmup = min(p - 1 - s, m)
    ops = [Op("F", i, 0, s) for i in range(warmup)]
    # Steady state: one forward, one backward. Backwards run in micro-batch order.
    for i in range(m - warmup):
        ops += [Op("F", warmup + i, 0, s), Op("B", i, 0, s)]
    # Cool-down: the backwards of the warm-up micro-batches.
    ops += [Op("B", i, 0, s) for i in range(m - warmup, m)]
    return ops


def _interleaved(p: int, m: int, v: int, s: int) -> list[Op]:
    # Megatron's interleaved 1F1B. Forwards go through the ranks' chunks in groups
    # of p micro-batches: micro-batches 0..p-1 on chunk 0, then 0..p-1 on chunk 1,
    # ..., then micro-batches p..2p-1 on chunk 0, and so on. Backwards follow the
    # same order with the chunks reversed (the last chunk's gradient comes first).
    total = m * v

    def nth(k: int, kind: str) -> Op:
        group, r = divmod(k, p * v)
        chunk = r // p
        if kind == "B":
            chunk = v - 1 - chunk
        return Op(kind, group * p + r % p, chunk, s)

    # Warm-up: a full round of the other v-1 chunks for p micro-batches, plus
    # 2 per hop to the last rank (the forward goes there and the gradient comes back).
    warmup = min(2 * (p - 1 - s) + (v - 1) * p, total)
    ops = [nth(k, "F") for k in range(warmup)]
    for k in range(total - warmup):
        ops += [nth(warmup + k, "F"), nth(k, "B")]
    ops += [nth(k, "B") for k in range(total - warmup, total)]
    return ops


def _zb_h1(p: int, m: int, s: int) -> list[Op]:
    # ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the
    # backward split into B (input gradient, on the critical path: the previous rank
    # waits for it) and W (weight gradient, which nobody waits for).
    #
    # In step x rank s runs F_x, then B_{x-(p-1-s)}, then W_{x-(p-1)} (each only if
    # that micro-batch exists). B lags F by p-1-s steps exactly as in 1F1B; W lags F
    # by p-1 on every rank, i.e. rank s holds back its W by s steps. So B reaches the
    # previous rank sooner than in 1F1B, and the held-back W fill the gaps at the
    # end. Every rank keeps at most p micro-batches between F and W, the peak of
    # 1F1B's first rank, so the peak activation memory is unchanged.
    ops: list[Op] = []
    for x in range(m + p - 1):
        for kind, i in (("F", x), ("B", x - (p - 1 - s)), ("W", x - (p - 1))):
            if 0 <= i < m:
                ops.append(Op(kind, i, 0, s))
    return ops


# --------------------------------------------------------------------------- public


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {value}")


def check_schedule_args(name: str, stages: int, microbatches: int, chunks: int = 1) -> None:
    """Raise the ValueError :func:`schedule` raises for these arguments, without
    building anything (cheap for any size)."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    _check_count("stages", stages)
    _check_count("microbatches", microbatches)
    _check_count("chunks", chunks)
    if name in _CHUNKED:
        if chunks < 2:
            raise ValueError(
                f"{name!r} needs chunks >= 2 model chunks per rank, got chunks={chunks}; "
                "for one chunk per rank use schedule('1f1b', ...)"
            )
        if microbatches % stages:
            p, m = stages, microbatches
            lower, upper = (m // p) * p, (m // p + 1) * p
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"{name!r} needs microbatches to be a multiple of stages ({p}), "
                f"got microbatches={m}; use {hint}"
            )
    elif chunks != 1:
        raise ValueError(
            f"{name!r} has one model chunk per rank; use chunks=1 "
            f"(or schedule('interleaved-1f1b', ..., chunks={chunks}) for {chunks} chunks)"
        )


def schedule(name: str, stages: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Build the pipeline schedule ``name`` for ``stages`` ranks and ``microbatches``.

    ``name`` is one of :data:`SCHEDULE_NAMES`:

    * ``"naive"``: one micro-batch at a time, no overlap; bubble (p-1)/p.
    * ``"gpipe"``: all forwards, then all backwards; bubble (p-1)/(m+p-1),
      all m micro-batches' activations held at once.
    * ``"1f1b"``: rank s runs min(p-1-s, m) warm-up forwards, then alternates one
      forward and one backward, then the remaining backwards; backwards in
      micro-batch order. Same bubble as GPipe, at most p-s micro-batches held.
    * ``"interleaved-1f1b"``: Megatron's interleaved 1F1B with ``chunks`` (>= 2)
      model chunks per rank; ``microbatches`` must be a multiple of ``stages``.
      With ``chunks=1`` use ``"1f1b"`` (this raises rather than silently giving a
      different schedule). Bubble (p-1)/(v*m+p-1).
    * ``"zb-h1"``: zero-bubble ZB-H1, backward split into B and W ops.

    Raises ValueError, saying what to change, for an unknown name, counts below 1,
    or a ``chunks``/``microbatches`` value that the schedule cannot use.
    """
    check_schedule_args(name, stages, microbatches, chunks)
    p, m, v = stages, microbatches, chunks
    if name == "naive":
        per_stage = [_naive(p, m, s) for s in range(p)]
    elif name == "gpipe":
        per_stage = [_gpipe(p, m, s) for s in range(p)]
    elif name == "1f1b":
        per_stage = [_one_f_one_b(p, m, s) for s in range(p)]
    elif name == "interleaved-1f1b":
        per_stage = [_interleaved(p, m, v, s) for s in range(p)]
    else:  # zb-h1
        per_stage = [_zb_h1(p, m, s) for s in range(p)]
    return Schedule(name, p, m, v, tuple(tuple(ops) for ops in per_stage))


def _run_order(sched: Schedule) -> list[int]:
    """Op numbers (see ``Schedule._graph``) in an order that respects every rank's
    own order and every dependency. ValueError if the schedule is malformed
    (see ``Schedule._graph``) or the ranks would deadlock."""
    # Each rank runs its ops in order; a rank whose next op lacks an input parks on
    # that missing op and is woken when it completes. Every op is looked at a
    # bounded number of times, so this is linear in the number of ops.
    flat, deps, ranges = sched._graph
    done = [False] * len(flat)
    order: list[int] = []
    pos = [r.start for r in ranges]
    parked: dict[int, list[int]] = {}
    ready = deque(range(sched.stages))
    while ready:
        s = ready.popleft()
        stop = ranges[s].stop
        i = pos[s]
        while i < stop:
            missing = -1
            for d in deps[i]:
                if not done[d]:
                    missing = d
                    break
            if missing >= 0:  # park this rank until the missing op is done
                parked.setdefault(missing, []).append(s)
                break
            done[i] = True
            order.append(i)
            i += 1
            woken = parked.pop(i - 1, None)
            if woken:
                ready.extend(woken)
        pos[s] = i
    if len(order) < len(flat):
        lines = []
        for s, r in enumerate(ranges):
            if pos[s] < r.stop:
                op = flat[pos[s]]
                waits = [
                    f"{d.label} on stage {d.stage}"
                    for d, n in zip(sched.deps(op), deps[pos[s]])
                    if not done[n]
                ]
                lines.append(f"stage {s} waits at {op.label} for {', '.join(waits)}")
        raise ValueError(f"schedule {sched.name!r} deadlocks: " + "; ".join(lines))
    return order


def execution_order(sched: Schedule) -> list[Op]:
    """All ops of ``sched`` in one order that respects both every rank's own order
    and every dependency: what the ranks could run if each waited for its inputs.

    Raises ValueError if the schedule is malformed (see :func:`validate_schedule`)
    or deadlocks (some rank's next op waits, directly or not, on an op that comes
    later on its own rank), naming the stuck ops.
    """
    flat = sched._graph[0]
    return [flat[i] for i in _run_order(sched)]


def validate_schedule(sched: Schedule) -> None:
    """Check that ``sched`` is a complete, runnable schedule; raise ValueError if not.

    * every op sits in the list of the rank it names, with chunk and micro-batch in range;
    * every (stage, chunk, micro-batch) has exactly one F and one B, and exactly one
      W if the schedule splits the backward (W anywhere means W everywhere);
    * running each rank's list in order, waiting for dependencies, never deadlocks.
    """
    _run_order(sched)
