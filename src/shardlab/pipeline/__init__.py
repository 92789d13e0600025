"""Pipeline parallelism: schedules as data and a simulator that times them.

>>> from shardlab.pipeline import schedule, simulate
>>> r = simulate(schedule("1f1b", stages=4, microbatches=16))
>>> round(r.bubble_fraction, 4)  # (p-1)/(m+p-1) = 3/19
0.1579

Only the standard library and numpy are imported here (no torch), so the
calculators stay fast to import and can run in an in-browser Python.

The real executor (:mod:`shardlab.pipeline.executor`: a model split over ranks and
trained op by op under any of these schedules) and the comparison with
``torch.distributed.pipelining`` (:mod:`shardlab.pipeline.torch_compare`) need torch;
their main names are loaded on first use (``pipeline.run_pipeline``, ...).
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

# Loaded on first use: these modules import torch.
_LAZY = {
    "executor": ("executor", None),
    "torch_compare": ("torch_compare", None),
    "run_pipeline": ("executor", "run_pipeline"),
    "train_step": ("executor", "train_step"),
    "reference_step": ("executor", "reference_step"),
    "PipelineRun": ("executor", "PipelineRun"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod if attr is None else getattr(mod, attr)
