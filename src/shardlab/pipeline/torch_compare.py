"""Our schedules next to PyTorch's ``torch.distributed.pipelining``.

PyTorch ships the same schedules under other names:

=====================  ====================================  ===========================
shardlab               torch.distributed.pipelining          stages per rank
=====================  ====================================  ===========================
``gpipe``              ``ScheduleGPipe``                     1 (``PipelineStage``)
``1f1b``               ``Schedule1F1B`` (needs m >= p)       1
``interleaved-1f1b``   ``ScheduleInterleaved1F1B``           v, "loop" layout (ours)
``zb-h1``              ``ScheduleInterleavedZeroBubble``     1 here (it takes v >= 1)
=====================  ====================================  ===========================

and a few that have no counterpart here (``ScheduleLoopedBFS``: all micro-batches
through one chunk before the next; ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV``:
two chunks per rank in a "V" layout, rank s holding stages s and 2p-1-s). Its
vocabulary: a *stage* is one model chunk (our virtual stage), ``I`` is the
input-gradient backward (our ``B`` in ``zb-h1``), ``W`` the weight gradient, ``B`` a
full backward.

Two ways to compare, both rank functions for a :class:`~shardlab.Cluster` whose size
is the number of ranks (``p``):

* :func:`torch_train_step` really runs PyTorch's schedule (gloo works), records the
  order in which each rank ran its forward/backward calls, and returns the loss and
  the gradients, to hold against :func:`~shardlab.pipeline.executor.reference_step`;
* the same call also returns each rank's ``pipeline_order``: the schedule PyTorch plans
  as data (it is only data for the multi-stage schedules; for ``ScheduleGPipe`` and
  ``Schedule1F1B`` the run itself is a loop and ``pipeline_order`` is a picture).

The public API used (``PipelineStage(module, stage_index, num_stages, device)``, the
schedule classes, ``step``) is the same in torch 2.11 to 2.13; ``pipeline_order`` and
the action names are internal and could change.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .schedules import Schedule

__all__ = [
    "TORCH_SCHEDULES",
    "TORCH_ONLY",
    "torch_train_step",
    "order_labels",
    "compare_orders",
]

#: Our schedule name -> the torch.distributed.pipelining class that runs the same schedule.
TORCH_SCHEDULES: dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zb-h1": "ScheduleInterleavedZeroBubble",
}

#: torch.distributed.pipelining schedules with no counterpart here, and what they do.
TORCH_ONLY: dict[str, str] = {
    "ScheduleLoopedBFS": "v chunks per rank, breadth first: every micro-batch through a chunk "
                         "before the next chunk",
    "ScheduleZBVZeroBubble": "zero bubble with 2 chunks per rank in a V layout "
                             "(rank s holds stages s and 2p-1-s)",
    "ScheduleDualPipeV": "DualPipe's V schedule: 2 chunks per rank, forward and backward "
                         "of different micro-batches overlapped",
}

_KIND = {"F": "F", "B": "B", "I": "B", "W": "W"}


def _stage_indices(cls_name: str, p: int, chunks: int, rank: int) -> list[int]:
    if cls_name in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
        return [rank, 2 * p - 1 - rank]
    return [c * p + rank for c in range(chunks)]


def torch_train_step(model, inputs, targets, name: str, microbatches: int, chunks: int = 1, *,
                     loss_fn: Callable | None = None) -> dict:
    """Rank function: one training step with PyTorch's schedule for ``name`` (one of
    :data:`TORCH_SCHEDULES`, or a class name from :data:`TORCH_ONLY`).

    The model is split as the executor splits it (:func:`~shardlab.pipeline.executor.
    partition_layers`, ``stages * chunks`` chunks; 2 chunks per rank for the V schedules).
    Returns ``{"order": [...], "pipeline_order": {...}, "loss": float | None, "grads":
    {...}}``: ``order`` the labels of the compute calls this rank made, in our notation
    (``F3``, ``B3c1``, ``W0``: chunk = position of the stage among this rank's stages).
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed import pipelining as pp

    from .. import runtime
    from .executor import _layers_of, partition_layers

    p, me = runtime.world_size(), runtime.rank()
    cls_name = TORCH_SCHEDULES.get(name, name)
    cls = getattr(pp, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown schedule {name!r}: use one of {sorted(TORCH_SCHEDULES)} or "
                         f"{sorted(TORCH_ONLY)}")
    single = cls_name in ("ScheduleGPipe", "Schedule1F1B")
    if cls_name in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
        chunks = 2
    if single and chunks != 1:
        raise ValueError(f"{cls_name} runs one stage per rank: use chunks=1")
    dev = runtime.device()
    loss_fn = loss_fn or F.mse_loss
    if callable(model) and not isinstance(model, nn.Module):
        model = model()
    prefix, layers = _layers_of(model)
    nstages = p * chunks
    parts = partition_layers(len(layers), nstages)
    mine = _stage_indices(cls_name, p, chunks, me)

    order: list[str] = []
    stages, names = [], []
    for local, idx in enumerate(mine):
        sub = nn.Sequential(*[layers[i] for i in parts[idx]]).to(dev)
        names.append([(f"{prefix}{i}.{n}", prm) for i in parts[idx]
                      for n, prm in layers[i].named_parameters()])
        stage = pp.PipelineStage(sub, idx, nstages, dev)
        suffix = f"c{local}" if local else ""
        _record(stage, order, suffix)
        stages.append(stage)

    kwargs = {}
    sched = cls(stages[0] if single else stages, microbatches, loss_fn=loss_fn, **kwargs)
    first, last = 0 in mine, (nstages - 1) in mine
    losses: list = []
    args = (inputs.to(dev),) if first else ()
    step_kw = {}
    if last:
        step_kw = {"target": targets.to(dev), "losses": losses}
    sched.step(*args, **step_kw)

    pipeline_order = {r: order_labels(actions, p, chunks, cls_name)
                      for r, actions in (sched.pipeline_order or {}).items()}
    grads = {n: (prm.grad.detach().cpu().clone() if prm.grad is not None else None)
             for group in names for n, prm in group}
    loss = float(sum(float(x.detach()) for x in losses) / len(losses)) if last else None
    return {"order": order, "pipeline_order": pipeline_order, "loss": loss, "grads": grads,
            "class": cls_name, "torch": torch.__version__}


def _record(stage, order: list[str], suffix: str) -> None:
    """Wrap one stage's compute calls so that each appends its label to ``order``."""
    fwd, bwd, wgt = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

    def forward_one_chunk(mb, *args, **kwargs):
        order.append(f"F{mb}{suffix}")
        return fwd(mb, *args, **kwargs)

    def backward_one_chunk(mb, *args, **kwargs):
        # A full backward ("B") or its input-gradient part ("I"): our zb-h1 calls the
        # latter "B" too, so both get the same label.
        order.append(f"B{mb}{suffix}")
        return bwd(mb, *args, **kwargs)

    def backward_weight_one_chunk(mb, *args, **kwargs):
        order.append(f"W{mb}{suffix}")
        return wgt(mb, *args, **kwargs)

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def order_labels(actions: Sequence, p: int, chunks: int = 1, cls_name: str = "") -> list[str]:
    """PyTorch schedule actions (``_Action`` or their strings such as ``"2F0"``) as our
    op labels: compute actions only (idle steps, communication and gradient reduction
    dropped), ``I`` written ``B``, the chunk from the stage index."""
    out = []
    for a in actions:
        if a is None:
            continue
        kind = getattr(getattr(a, "computation_type", None), "value", None)
        if kind is None:
            continue
        if kind not in _KIND:
            continue
        idx, mb = a.stage_index, a.microbatch_index
        if cls_name in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
            chunk = 0 if idx < p else 1
        else:
            chunk = idx // p
        out.append(f"{_KIND[kind]}{mb}" + (f"c{chunk}" if chunk else ""))
    return out


def compare_orders(ours: Schedule, theirs: dict[int, Sequence[str]]) -> dict[int, str]:
    """Per rank: ``"same"`` or where the two op orders first differ."""
    out = {}
    for s in range(ours.stages):
        a, b = ours.labels(s), list(theirs[s])
        if a == b:
            out[s] = "same"
            continue
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out[s] = (f"differ at op {i}: ours {' '.join(a[i:i + 4])} ... / "
                  f"torch {' '.join(b[i:i + 4])} ...")
    return out
