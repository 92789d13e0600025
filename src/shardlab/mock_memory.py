"""Mock devices with a memory capacity: run real code and fail the way a full GPU does.

A mock device (one CPU process per rank) has the host's memory, so on its own nothing ever
runs out. `MockMemory(capacity_bytes)` gives a block of code a budget: inside
`with MockMemory(...)`, every tensor that any torch operation creates (parameters, activations,
gradients, optimizer state, receive buffers) is counted while it is alive, and an operation
that would take the live total past the capacity raises `MockOutOfMemory`, naming the rank,
the operation, the request and the capacity, much like CUDA's "out of memory" error.

How it counts: a `TorchDispatchMode` sees the outputs of every operation. Each output's
*storage* is counted once (views share it) and forgotten when the storage is freed (a weak
reference tells). Tensors created before the block are not counted unless passed to
`track`. Meta tensors have no storage and cost nothing, which is how a rank can hold the
shape of a whole model and the memory of only its own part.

`staged_forward` is the chapter 1 demonstration as a rank function: a model that does not
fit on one mock device, split into one stage of layers per rank, does.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MockOutOfMemory", "MockMemory", "format_bytes", "stage_layers", "stage_modules",
           "staged_forward"]


def format_bytes(n: float) -> str:
    """Bytes in binary units, as CUDA's error messages print them: '24.00 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class MockOutOfMemory(MemoryError):
    """A mock device ran out of its capacity. Attributes: `device`, `op`, `requested`,
    `in_use` (bytes live before the request), `capacity`."""

    def __init__(self, device: str, op: str, requested: int, in_use: int, capacity: int):
        self.device, self.op = device, op
        self.requested, self.in_use, self.capacity = requested, in_use, capacity
        super().__init__(
            f"{device} is out of memory: {op} tried to allocate {format_bytes(requested)} "
            f"with {format_bytes(in_use)} of {format_bytes(capacity)} in use "
            f"({format_bytes(capacity - in_use)} free). Shard the model over more ranks, "
            "use a smaller dtype, or shrink the batch."
        )

    def __reduce__(self):  # picklable, so that a rank can return or re-raise it
        return (type(self), (self.device, self.op, self.requested, self.in_use, self.capacity))


def _default_device_name() -> str:
    from .runtime import _CONTEXT

    return _CONTEXT.device_name if _CONTEXT is not None else "cpu"


class MockMemory(TorchDispatchMode):
    """A memory budget for the code inside `with MockMemory(capacity_bytes):`.

    `used` is the live bytes counted now, `peak` the most at any time, `allocations` the
    number of storages counted. Reusable: entering again keeps counting what is still alive.
    """

    def __init__(self, capacity_bytes: float, device_name: str | None = None):
        super().__init__()
        if not capacity_bytes > 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes!r}")
        self.capacity = int(capacity_bytes)
        self.device_name = device_name or _default_device_name()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.used = 0
        self.peak = 0
        self.allocations = 0

    # -- accounting
    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.used -= self._live.pop(key)[1]

    def _charge(self, tensors: Iterable[torch.Tensor], op: str) -> None:
        self._sweep()
        new: dict[int, tuple[StorageWeakRef, int]] = {}
        extra = 0
        for t in tensors:
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            old = self._live.get(key) or new.get(key)
            grown = nbytes - (old[1] if old else 0)
            if grown > 0:  # a new storage, or one that an op resized
                extra += grown
                new[key] = (StorageWeakRef(storage), nbytes)
        if not extra:
            return
        if self.used + extra > self.capacity:
            raise MockOutOfMemory(self.device_name, op, extra, self.used, self.capacity)
        for key, entry in new.items():
            self.allocations += key not in self._live
            self._live[key] = entry
        self.used += extra
        self.peak = max(self.peak, self.used)

    def track(self, *objs) -> "MockMemory":
        """Count tensors (or every parameter and buffer of modules) made outside the block."""
        tensors = []
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                tensors += list(obj.parameters()) + list(obj.buffers())
            else:
                tensors.append(obj)
        self._charge(tensors, "track")
        return self

    @property
    def free(self) -> int:
        self._sweep()
        return self.capacity - self.used

    def live_bytes(self) -> int:
        """Bytes alive now (frees are noticed lazily; this sweeps first)."""
        self._sweep()
        return self.used

    def __repr__(self) -> str:
        return (f"MockMemory({self.device_name}: {format_bytes(self.live_bytes())} used, "
                f"peak {format_bytes(self.peak)}, capacity {format_bytes(self.capacity)})")

    # -- the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if tensors:
            self._charge(tensors, str(func.overloadpacket))
        return out


# --------------------------------------------------------------------------- stages

def stage_layers(layers: int, stage: int, stages: int) -> range:
    """Layers of `stage` when `layers` are split into `stages` contiguous groups, the first
    stages taking one extra layer when they do not divide evenly."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage must be in 0..{stages - 1}, got {stage}")
    if stages > layers:
        raise ValueError(f"cannot split {layers} layers into {stages} stages; use at most {layers}")
    base, extra = divmod(layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def stage_modules(layers: int, stage: int, stages: int) -> list[str]:
    """Submodule names of a `TinyTransformer` held by `stage`: its blocks, plus the embedding
    on the first stage and the final norm and LM head on the last."""
    names = [f"blocks.{i}" for i in stage_layers(layers, stage, stages)]
    if stage == 0:
        names.insert(0, "embed_tokens")
    if stage == stages - 1:
        names += ["norm", "lm_head"]
    return names


def staged_forward(spec, capacity_bytes: float, tokens: torch.Tensor, *, split: bool = True,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Rank function: hold a `TinyTransformer(spec)` on mock devices of `capacity_bytes`
    each and run one forward pass over `tokens`.

    `split=False`: every rank tries to hold the whole model (one device's view).
    `split=True`: rank r holds stage r of `world_size()` stages (`stage_modules`); hidden
    states travel from rank to rank (`comm.send` / `comm.recv`), and the last rank computes
    the logits. Returns this rank's `fits`, `error` (the `MockOutOfMemory` message or None),
    `weight_bytes`, `peak_bytes`, `capacity_bytes`, `layers` and, on the last rank, `logits`.
    """
    from . import comm
    from .memory import get_model
    from .models import TinyTransformer, materialize
    from .runtime import device, rank, world_size

    spec = get_model(spec)
    r, p = (rank(), world_size()) if split else (0, 1)
    names = stage_modules(spec.layers, r, p)
    dev = device()
    model = TinyTransformer.from_spec(spec, device="meta", dtype=dtype)
    mem = MockMemory(capacity_bytes)
    result = {"rank": rank(), "device": mem.device_name, "capacity_bytes": mem.capacity,
              "layers": list(stage_layers(spec.layers, r, p)), "fits": True, "error": None,
              "weight_bytes": None, "peak_bytes": None, "logits": None}
    try:
        with mem:
            materialize(model, names, dev, seed)
            result["weight_bytes"] = mem.live_bytes()
    except MockOutOfMemory as e:
        result.update(fits=False, error=str(e))
    if split:  # every stage must hold its weights before activations can flow
        ok = torch.tensor([float(result["fits"])], device=dev)
        comm.all_reduce(ok, op="min")
        if ok.item() == 0:
            result["peak_bytes"] = mem.peak
            return result
    elif not result["fits"]:
        result["peak_bytes"] = mem.peak
        return result

    b, s = tokens.shape
    x = None
    try:
        with mem, torch.no_grad():
            if r == 0:
                x = model.embed(tokens.to(dev))
            else:
                x = comm.recv(torch.empty(b, s, spec.hidden, device=dev, dtype=dtype), src=r - 1)
            for i in result["layers"]:
                x = model.blocks[i](x)
            if r == p - 1:
                result["logits"] = model.head(x)
    except MockOutOfMemory as e:
        result.update(fits=False, error=str(e))
        x = torch.full((b, s, spec.hidden), float("nan"), device=dev, dtype=dtype)  # outside the budget
    if split and r < p - 1:
        comm.send(x, dst=r + 1)  # the next stage waits for it even after a failure here
    result["peak_bytes"] = mem.peak
    return result
