"""Pipeline parallelism: schedules as data and a simulator that times them.

>>> from shardlab.pipeline import schedule, simulate
>>> r = simulate(schedule("1f1b", stages=4, microbatches=16))
>>> round(r.bubble_fraction, 4)  # (p-1)/(m+p-1) = 3/19
0.1579

Only the standard library and numpy are imported here (no torch), so the
calculators stay fast to import and can run in an in-browser Python.
"""

from .schedules import (
    SCHEDULE_NAMES,
    Op,
    Schedule,
    check_schedule_args,
    execution_order,
    schedule,
    validate_schedule,
)
from .simulator import (
    SimResult,
    TimedOp,
    bubble_fraction_closed_form,
    min_microbatches_for_bubble,
    simulate,
)

__all__ = [
    "SCHEDULE_NAMES",
    "Op",
    "Schedule",
    "SimResult",
    "TimedOp",
    "bubble_fraction_closed_form",
    "check_schedule_args",
    "execution_order",
    "min_microbatches_for_bubble",
    "schedule",
    "simulate",
    "validate_schedule",
]
