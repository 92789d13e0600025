"""A real pipeline executor: one training step of a layer stack, split over ranks, run
op by op in the order of any schedule from :func:`shardlab.pipeline.schedule`.

Each rank holds its model chunks (Megatron layout: rank ``s`` holds virtual stages
``s, s+p, s+2p, ...``), walks ``sched.ops[rank]`` and, for every op:

* ``F``: runs its chunk on the micro-batch's input (the batch slice on virtual stage 0,
  the received activation elsewhere), sends the output on to the next virtual stage;
  the last virtual stage also computes the micro-batch's loss;
* ``B``: back-propagates the received output gradient (the loss on the last virtual
  stage) and sends the input gradient back. Without ``W`` ops this is the whole
  backward; in split schedules (``zb-h1``) it computes only the gradients that flow
  backwards (the input gradient and each layer's output gradient), keeping the graph;
* ``W``: the weight gradients from the output gradients that ``B`` stored: for every
  module that owns parameters, a backward from its output into its own parameters only
  (for a linear layer, the one weight-gradient GEMM), then the graph is freed.

Point-to-point messages, and why nothing deadlocks. Every message between two ranks
goes one way on its own channel: activations and gradients that go from a lower to a
higher rank use the world group, the others a second group (``pp-down``). On a channel
the receiver posts its ``irecv`` calls in the order the sender produces the messages
(every rank knows the whole schedule), and the sender never waits for an ``isend``
until the step ends. So a rank waits only for data that an op needs, and the ranks wait
on each other exactly as the schedule's dependencies say: the schedule's own deadlock
check (:func:`~shardlab.pipeline.execution_order`) covers the executor too. The same
code runs on gloo (mock devices) and NCCL. NCCL runs one channel's operations in the
order they were posted, which is why each direction gets its own channel (a channel
carrying both could stall), and a posted NCCL receive is a kernel that spins until its
data comes, which is why receives are posted only when an op needs them; gloo receives
are plain buffers, so on mock devices all of them are posted when the step starts and
data moves as soon as it is sent.

Measurements, per rank: a timestamp at the start of every op (once its input has
arrived) and at its end (on GPUs after synchronizing the compute stream), and the bytes
of activations held for the backward pass, counted with autograd's saved-tensor hooks:
a tensor counts from the moment an op saves it until autograd lets it go (parameters do
not count; each storage counts once).

>>> from shardlab import Cluster                                  # doctest: +SKIP
>>> from shardlab.pipeline import schedule, executor as ex         # doctest: +SKIP
>>> model = ex.block_stack(layers=8, hidden=16)                    # doctest: +SKIP
>>> x, y = ex.example_batch(model, batch=8)                        # doctest: +SKIP
>>> with Cluster(4) as cluster:                                    # doctest: +SKIP
...     run = ex.run_pipeline(cluster, model, x, y, schedule("1f1b", 4, 8))
>>> run.loss, run.peak_activations, run.bubble_fraction           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .schedules import Op, Schedule, execution_order, schedule as build_schedule
from .simulator import TimedOp

__all__ = [
    "MLPBlock",
    "TransformerBlock",
    "BlockStack",
    "block_stack",
    "example_batch",
    "partition_layers",
    "stage_layers",
    "Message",
    "messages",
    "StageReport",
    "PipelineRun",
    "train_step",
    "collect",
    "run_pipeline",
    "reference_step",
]


# --------------------------------------------------------------------------- a stage-able model


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block: ``x + W2 gelu(W1 norm(x))``. Shape in = shape out."""

    def __init__(self, hidden: int, ffn_mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn_mult * hidden)
        self.down = nn.Linear(ffn_mult * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention then an MLP, each with a residual.

    Input and output ``x_BSH`` (batch, sequence, hidden).
    """

    def __init__(self, hidden: int, heads: int = 4, ffn_mult: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = MLPBlock(hidden, ffn_mult)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        b, s, h = x_BSH.shape
        qkv = self.qkv(self.attn_norm(x_BSH)).view(b, s, 3, self.heads, h // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSH = x_BSH + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return self.mlp(x_BSH)


class BlockStack(nn.Module):
    """A stack of identical blocks in ``self.layers``: the model the executor splits.

    ``forward(x)`` applies the layers in order, which is the contract the executor
    relies on (any module whose ``layers`` are applied in order will do).
    """

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def block_stack(layers: int = 8, hidden: int = 32, *, kind: str = "mlp", heads: int = 4,
                ffn_mult: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> BlockStack:
    """A reproducible :class:`BlockStack` of ``layers`` blocks (``kind`` "mlp" or
    "transformer"), weights drawn from ``seed``."""
    if kind not in ("mlp", "transformer"):
        raise ValueError(f"kind must be 'mlp' or 'transformer', got {kind!r}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        make = (lambda: MLPBlock(hidden, ffn_mult)) if kind == "mlp" else \
            (lambda: TransformerBlock(hidden, heads, ffn_mult))
        model = BlockStack([make() for _ in range(layers)])
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(device=device, dtype=dtype)


def example_batch(model: nn.Module, batch: int, seq: int = 4, *, seed: int = 1):
    """Inputs and regression targets for :func:`block_stack` models: ``(x, target)``,
    shape (batch, hidden) for MLP stacks and (batch, seq, hidden) for transformer ones."""
    layers = _layers_of(model)[1]
    first = layers[0]
    hidden = first.norm.normalized_shape[0] if isinstance(first, MLPBlock) else \
        first.attn_norm.normalized_shape[0]
    shape = (batch, hidden) if isinstance(first, MLPBlock) else (batch, seq, hidden)
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(param.dtype)
    y = torch.randn(shape, generator=g).to(param.dtype)
    return x, y


# --------------------------------------------------------------------------- partition


def partition_layers(n_layers: int, virtual_stages: int) -> tuple[range, ...]:
    """Split ``n_layers`` into ``virtual_stages`` contiguous, balanced ranges (earlier
    ranges get the extra layer when it does not divide)."""
    if virtual_stages < 1 or n_layers < virtual_stages:
        raise ValueError(
            f"cannot split {n_layers} layers into {virtual_stages} model chunks: "
            f"use at least {virtual_stages} layers (stages x chunks)"
        )
    base, extra = divmod(n_layers, virtual_stages)
    out, start = [], 0
    for k in range(virtual_stages):
        n = base + (k < extra)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


def _layers_of(model) -> tuple[str, list[nn.Module]]:
    """The model's ordered layers and the name prefix of their parameters."""
    if isinstance(model, nn.Sequential):
        return "", list(model)
    if isinstance(model, nn.ModuleList):
        return "", list(model)
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)):
        covered = {id(p) for p in layers.parameters()}
        stray = [n for n, p in model.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(
                f"parameters outside model.layers cannot be placed on a stage: {stray[:3]}; "
                "put every layer (embedding and head included) into model.layers"
            )
        return "layers.", list(layers)
    raise ValueError(
        f"{type(model).__name__} has no `layers` ModuleList: pass an nn.Sequential, an "
        "nn.ModuleList, or a module whose forward applies self.layers in order"
    )


def stage_layers(model, stages: int, chunks: int, rank: int) -> dict[int, list[tuple[str, nn.Module]]]:
    """The layers rank ``rank`` holds, per chunk: ``{chunk: [(name, layer), ...]}``.

    Chunk ``c`` of rank ``s`` is virtual stage ``c * stages + s`` (Megatron layout).
    """
    prefix, layers = _layers_of(model)
    parts = partition_layers(len(layers), stages * chunks)
    return {c: [(f"{prefix}{i}", layers[i]) for i in parts[c * stages + rank]]
            for c in range(chunks)}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One point-to-point message of a schedule: an activation (``kind="act"``) sent
    after ``F`` to the next virtual stage, or an input gradient (``kind="grad"``) sent
    after ``B`` to the previous one."""

    kind: str
    microbatch: int
    src_virtual: int  # virtual stage that produces it
    dst_virtual: int  # virtual stage that consumes it
    src: int  # rank
    dst: int  # rank

    @property
    def direction(self) -> str:
        """``"up"`` (to a higher rank) or ``"down"``: each direction is its own channel."""
        return "up" if self.dst > self.src else "down"


def _message_after(sched: Schedule, op: Op) -> Message | None:
    """What ``op`` sends when it ends (None for W, the first B and the last F)."""
    p, nv = sched.stages, sched.virtual_stages
    k = sched.virtual_stage(op)
    if op.kind == "F" and k < nv - 1:
        return Message("act", op.microbatch, k, k + 1, op.stage, (k + 1) % p)
    if op.kind == "B" and k > 0:
        return Message("grad", op.microbatch, k, k - 1, op.stage, (k - 1) % p)
    return None


def _message_before(sched: Schedule, op: Op) -> Message | None:
    """What ``op`` needs from another virtual stage before it can start."""
    p, nv = sched.stages, sched.virtual_stages
    k = sched.virtual_stage(op)
    if op.kind == "F" and k > 0:
        return Message("act", op.microbatch, k - 1, k, (k - 1) % p, op.stage)
    if op.kind == "B" and k < nv - 1:
        return Message("grad", op.microbatch, k + 1, k, (k + 1) % p, op.stage)
    return None


def messages(sched: Schedule) -> dict[int, list[Message]]:
    """Every message each rank sends, in the order it sends them (its op order).

    Messages between virtual stages on the same rank (one rank with several chunks)
    are handed over in memory and are listed too (``src == dst``).
    """
    out: dict[int, list[Message]] = {s: [] for s in range(sched.stages)}
    for s, ops in enumerate(sched.ops):
        for op in ops:
            msg = _message_after(sched, op)
            if msg is not None:
                out[s].append(msg)
    return out


# --------------------------------------------------------------------------- activation meter


class _Saved:
    """What autograd stores instead of a saved tensor: the tensor plus a ticket that
    gives its bytes back when autograd drops it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class _ActivationMeter:
    """Bytes of tensors autograd holds for the backward pass, counted per storage."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [saved count, nbytes]
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage: not memory
            return t
        key = storage.data_ptr()
        if key in self.param_storages or key == 0:
            return t
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        # Keep the values without their autograd history: a node that saves its own
        # output (attention does) would otherwise sit in a reference cycle with it and
        # outlive the backward pass, which the count would then report as held.
        return _Saved(t.detach(), self, key)

    @staticmethod
    def _unpack(x):
        return x.tensor if isinstance(x, _Saved) else x

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


# --------------------------------------------------------------------------- the rank side


@dataclass(frozen=True)
class StageReport:
    """What one rank measured in :func:`train_step` (times in seconds of
    ``time.perf_counter``, a clock shared by the processes of one machine)."""

    rank: int
    device: str
    timeline: tuple[TimedOp, ...]
    loss: float | None  # sum of the micro-batch losses (last rank only)
    grads: dict  # parameter name -> gradient (CPU), for the parameters this rank holds
    peak_activation_bytes: int
    activation_unit_bytes: int  # bytes one F of one chunk saves (the first F measured)
    memory_trace: tuple[tuple[float, int], ...]  # (time, live activation bytes) at op ends
    comm: dict  # shardlab.comm.summary of the step's point-to-point traffic
    peak_memory_allocated: int | None = None  # torch.cuda.max_memory_allocated on GPUs
    send_seconds: tuple[float, ...] = ()  # per op: host time spent posting its send


_GROUPS: dict = {}


def _channels(p: int):
    """The two one-way channels (process groups): up (to higher ranks) and down."""
    from .. import comm

    if p not in _GROUPS:
        down = comm.new_group(list(range(p)), name="pp-down") if p > 1 else None
        _GROUPS[p] = {"up": None, "down": down, "warm": False}
    return _GROUPS[p]


def _warm_channels(groups, p: int, me: int, dev: torch.device) -> None:
    """Open every neighbour link once, pair by pair in one global order (NCCL creates a
    communicator per pair on first use, and that blocks until both ends arrive)."""
    if groups["warm"] or p == 1:
        return
    pairs = sorted({tuple(sorted((s, (s + 1) % p))) for s in range(p)})
    t = torch.zeros(1, device=dev)
    for a, b in pairs:
        if me not in (a, b):
            continue
        for direction, src, dst in (("up", a, b), ("down", b, a)):
            g = groups[direction]
            if me == src:
                dist.send(t, dst=dst, group=g)
            else:
                dist.recv(t, src=src, group=g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    groups["warm"] = True


def _param_owners(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def train_step(model, inputs: torch.Tensor, targets: torch.Tensor, sched: Schedule | str, *,
               microbatches: int | None = None, chunks: int = 1,
               loss_fn: Callable | None = None, sync_cuda: bool | None = None,
               return_grads: bool = True) -> StageReport:
    """Rank function: run one training step of ``model`` under ``sched`` on this rank.

    ``model``: an ``nn.Module`` (or a zero-argument function that builds one, so that a
    large model is built on each rank instead of shipped) whose ``layers`` are applied
    in order (see :class:`BlockStack`); every rank gets the same weights.
    ``inputs``/``targets``: the whole batch (dim 0), split into ``sched.microbatches``
    equal micro-batches. ``sched``: a :class:`Schedule` with ``stages == world_size``
    (or a schedule name, with ``microbatches`` and ``chunks``). ``loss_fn(output,
    target)``: mean-reduced (default MSE); micro-batch losses are divided by the number
    of micro-batches, so that gradients equal those of the whole batch's loss.
    ``sync_cuda``: synchronize the compute stream at every timestamp (default: on GPUs).
    ``return_grads=False`` leaves the gradients out of the report (benchmarks).
    """
    from .. import comm, runtime

    if isinstance(sched, str):
        if microbatches is None:
            raise ValueError("pass microbatches= with a schedule name (or pass a Schedule)")
        sched = build_schedule(sched, runtime.world_size(), microbatches, chunks)
    p, m, v = sched.stages, sched.microbatches, sched.chunks
    nv = p * v
    me, world = runtime.rank(), runtime.world_size()
    if p != world:
        raise ValueError(f"schedule has {p} stages but there are {world} ranks: build it with stages={world}")
    if inputs.shape[0] % m or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"a batch of {inputs.shape[0]} does not split into {m} equal micro-batches "
                         f"(targets: {targets.shape[0]}); use a batch that is a multiple of {m}")
    loss_fn = loss_fn or F.mse_loss
    dev = runtime.device()
    sync = (dev.type == "cuda") if sync_cuda is None else bool(sync_cuda)
    # On NCCL a posted receive is a kernel that spins until its data comes, and it can hold
    # up kernels queued behind it: post receives only when an op needs them. Gloo receives
    # are plain buffers, so post them all at once and let data move in the background.
    early = dev.type == "cpu"
    if callable(model) and not isinstance(model, nn.Module):
        model = model()

    # ---- this rank's chunks, on its device
    held = stage_layers(model, p, v, me)
    chunk_mod: dict[int, nn.Sequential] = {}
    names: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for c, layers in held.items():
        chunk_mod[c] = nn.Sequential(*[layer for _, layer in layers]).to(dev)
        names[c] = [(f"{n}.{pn}", prm) for n, layer in layers for pn, prm in layer.named_parameters()]
    params = [prm for c in names for _, prm in names[c]]
    for prm in params:
        prm.grad = None

    # ---- shapes of every virtual stage's output (messages), on the meta device
    mb = inputs.shape[0] // m
    out_specs = _output_specs(chunk_mod, p, nv, me, inputs[:mb], dev)
    x_mbs = [inputs[i * mb:(i + 1) * mb].to(dev).clone() for i in range(m)] if me == 0 else None
    y_mbs = [targets[i * mb:(i + 1) * mb].to(dev).clone() for i in range(m)] \
        if (nv - 1) % p == me else None

    # ---- channels and the receive plan: per sender, messages in production order
    groups = _channels(p)
    _warm_channels(groups, p, me, dev)
    produced = messages(sched)
    incoming = {s: [msg for msg in produced[s] if msg.dst == me and msg.src != me]
                for s in range(p) if s != me}
    posted = {s: 0 for s in incoming}
    recv_work: dict[Message, tuple] = {}
    local: dict[Message, torch.Tensor] = {}  # hand-overs between chunks of this rank
    sends: list[tuple] = []
    send_seconds: list[float] = []

    def post_until(msg: Message) -> None:
        queue = incoming[msg.src]
        while msg not in recv_work:
            nxt = queue[posted[msg.src]]
            posted[msg.src] += 1
            shape, dtype = out_specs[nxt.src_virtual]
            buf = torch.empty(shape, dtype=dtype, device=dev)
            work = comm.irecv(buf, src=nxt.src, group=groups[nxt.direction])
            recv_work[nxt] = (work, buf)

    def receive(msg: Message) -> torch.Tensor:
        if msg.src == me:
            return local.pop(msg)
        post_until(msg)
        work, buf = recv_work.pop(msg)
        work.wait()
        return buf

    def send(msg: Message, t: torch.Tensor) -> None:
        if msg.dst == me:
            local[msg] = t
            return
        t0 = time.perf_counter()
        t = t.detach().contiguous()
        sends.append((comm.isend(t, dst=msg.dst, group=groups[msg.direction]), t))
        # Drop finished sends so their buffers can go (GPU memory is measured).
        sends[:] = [(w, x) for w, x in sends if not w.is_completed()]
        send_seconds.append(time.perf_counter() - t0)

    def now() -> float:
        if sync:
            torch.cuda.current_stream().synchronize()
        return time.perf_counter()

    # ---- per-op work
    meter = _ActivationMeter(params)
    owners = {c: _param_owners(chunk_mod[c]) for c in chunk_mod}
    capture: list | None = None
    hooks = []
    for c, mods in owners.items():
        for mod in mods:
            def hook(module, args, output):
                if capture is not None:
                    capture.append((module, output))
            hooks.append(mod.register_forward_hook(hook))

    state: dict[tuple[int, int], dict] = {}
    loss_total = torch.zeros((), dtype=torch.float64)
    unit = 0
    split = sched.splits_backward

    def forward(op: Op) -> None:
        nonlocal capture, unit, loss_total
        k = sched.virtual_stage(op)
        if k == 0:
            x = x_mbs[op.microbatch]
        else:
            x = receive(_message_before(sched, op)).requires_grad_()
        t0 = now()
        before = meter.live
        capture = [] if split else None
        with meter.hooks():
            out = chunk_mod[op.chunk](x)
        captured, capture = capture, None
        if not unit:
            unit = meter.live - before
        st = {"x": x, "out": out, "captured": captured}
        if k == nv - 1:
            loss = loss_fn(out, y_mbs[op.microbatch]) / m
            st["root"], st["grad"] = loss, None
            loss_total += loss.detach().double().cpu()
        state[(op.chunk, op.microbatch)] = st
        t1 = now()
        msg = _message_after(sched, op)
        if msg is not None:
            send(msg, out)
        return t0, t1

    def backward(op: Op):
        k = sched.virtual_stage(op)
        st = state[(op.chunk, op.microbatch)]
        if k < nv - 1:
            st["root"], st["grad"] = st["out"], receive(_message_before(sched, op))
        t0 = now()
        x, root, grad = st["x"], st["root"], st["grad"]
        gx = None
        if not split:
            torch.autograd.backward(root, grad)
            if k > 0:
                gx = x.grad
            del state[(op.chunk, op.microbatch)]
        else:
            # Input gradient only (plus each parameter owner's output gradient, kept
            # for W): the engine skips the weight-gradient terms nobody asked for.
            mods = [(mod, out) for mod, out in st["captured"]
                    if isinstance(out, torch.Tensor) and out.requires_grad]
            want = ([x] if k > 0 else []) + [out for _, out in mods]
            grads = torch.autograd.grad(root, want, grad, retain_graph=True, allow_unused=True) \
                if want else ()
            if k > 0:
                gx, grads = grads[0], grads[1:]
            st["w"] = [(mod, out, g) for (mod, out), g in zip(mods, grads) if g is not None]
            covered = {id(prm) for mod, _ in mods for prm in mod.parameters(recurse=False)}
            st["rest"] = [prm for _, prm in names[op.chunk] if id(prm) not in covered]
        t1 = now()
        msg = _message_after(sched, op)
        if msg is not None:
            send(msg, gx)
        return t0, t1

    def weight(op: Op):
        t0 = now()
        st = state.pop((op.chunk, op.microbatch))
        for mod, out, g in st["w"]:
            torch.autograd.backward(out, g, inputs=list(mod.parameters(recurse=False)),
                                    retain_graph=True)
        if st["rest"]:  # parameters used outside their owner's output: the full path
            torch.autograd.backward(st["root"], st["grad"], inputs=st["rest"], retain_graph=True)
        del st  # the graph goes with the last reference: activations are freed here
        return t0, now()

    run = {"F": forward, "B": backward, "W": weight}
    timeline, trace = [], []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    comm.barrier()
    try:
        with comm.record() as log:
            if early:  # gloo: every receive posted up front, data moves as soon as it is sent
                for msgs in incoming.values():
                    if msgs:
                        post_until(msgs[-1])
            for op in sched.ops[me]:
                t0, t1 = run[op.kind](op)
                timeline.append(TimedOp(me, op, t0, t1))
                trace.append((t1, meter.live))
            for w, _ in sends:
                w.wait()
            sends.clear()
            if dev.type == "cuda":
                torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    peak_alloc = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    grads = {n: (prm.grad.detach().cpu().clone() if prm.grad is not None else None)
             for c in sorted(names) for n, prm in names[c]} if return_grads else {}
    comm_summary = comm.summary(log)
    return StageReport(
        rank=me,
        device=runtime.device_name(),
        timeline=tuple(timeline),
        loss=float(loss_total) if (nv - 1) % p == me else None,
        grads=grads,
        peak_activation_bytes=meter.peak,
        activation_unit_bytes=unit,
        memory_trace=tuple(trace),
        comm=comm_summary,
        peak_memory_allocated=peak_alloc,
        send_seconds=tuple(send_seconds),
    )


_SPECS: dict = {}


def _output_specs(chunk_mod: dict[int, nn.Module], p: int, nv: int, me: int,
                  x_mb: torch.Tensor, dev: torch.device) -> list[tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of one micro-batch's output of every virtual stage (the messages).

    Stage by stage, the rank that holds virtual stage k runs its chunk once, without
    autograd, on zeros shaped like its input, and tells every rank what came out. The
    answer is cached per process for the same layers, input and split.
    """
    key = (nv, tuple(x_mb.shape), x_mb.dtype,
           tuple((c, tuple((type(m).__name__, tuple(q.shape)) for m in mod.modules()
                           for q in m.parameters(recurse=False)))
                 for c, mod in sorted(chunk_mod.items())))
    if key in _SPECS:
        return _SPECS[key]
    spec = (tuple(x_mb.shape), x_mb.dtype)
    specs = []
    for k in range(nv):
        box = [None]
        if k % p == me:
            with torch.no_grad():
                out = chunk_mod[k // p](torch.zeros(spec[0], dtype=spec[1], device=dev))
            box = [(tuple(out.shape), out.dtype)]
        if p > 1:
            dist.broadcast_object_list(box, src=k % p)
        spec = box[0]
        specs.append((torch.Size(spec[0]), spec[1]))
    _SPECS[key] = specs
    return specs


# --------------------------------------------------------------------------- the caller side


@dataclass(frozen=True)
class PipelineRun:
    """One measured pipeline step, all ranks together (see :func:`collect`).

    ``timeline`` uses the simulator's :class:`TimedOp` (seconds from the first op's
    start), so the same figures draw both. ``peak_activations`` is the measured peak in
    units of one F's saved activations (one micro-batch through one chunk), the
    simulator's unit.
    """

    schedule: Schedule = field(repr=False)
    loss: float
    grads: dict = field(repr=False)
    timeline: tuple[TimedOp, ...] = field(repr=False)
    makespan: float
    bubble_fraction: float
    peak_activations: tuple[float, ...]
    peak_activation_bytes: tuple[int, ...]
    activation_unit_bytes: tuple[int, ...]
    devices: tuple[str, ...]
    reports: tuple[StageReport, ...] = field(repr=False)

    def stage_timeline(self, stage: int) -> tuple[TimedOp, ...]:
        return tuple(t for t in self.timeline if t.stage == stage)

    def op_times(self, skip_first: bool = True) -> dict[str, float]:
        """Median duration of each op kind, scaled to one micro-batch through a rank's
        whole share of layers (times ``chunks``), the unit :func:`simulate` takes.
        ``skip_first`` ignores each rank's first op of a kind (warm-up effects)."""
        per: dict[str, list[float]] = defaultdict(list)
        seen = set()
        for t in self.timeline:
            key = (t.stage, t.op.kind)
            if skip_first and key not in seen:
                seen.add(key)
                continue
            per[t.op.kind].append(t.end - t.start)
        out = {}
        for kind, xs in per.items():
            xs.sort()
            out[kind] = xs[len(xs) // 2] * self.schedule.chunks
        return out


    def hop_latency(self) -> float:
        """Median time from the end of an op on one rank to the start of the op on the
        next rank that was waiting for its output: the cost of one p2p hop as measured
        (transfer, synchronization and host overhead), for ``simulate(t_p2p=...)``.
        0.0 when no op waited."""
        end = {t.op: t.end for t in self.timeline}
        gaps = []
        for s in range(self.schedule.stages):
            prev_end = 0.0
            for t in self.stage_timeline(s):
                remote = [end[d] for d in self.schedule.deps(t.op) if d.stage != s]
                if remote and remote[0] >= prev_end:  # the rank sat idle for this input
                    gaps.append(t.start - remote[0])
                prev_end = t.end
        gaps.sort()
        return gaps[len(gaps) // 2] if gaps else 0.0


    def replay(self, t_p2p: float = 0.0) -> tuple[TimedOp, ...]:
        """The schedule re-timed with every op's *measured* duration but nothing between
        ops: no communication time (unless ``t_p2p`` per cross-rank hop), no host
        overhead. Compared with the measured timeline it shows what the gaps cost;
        compared with :func:`simulate` (one duration per kind) what uneven stages cost."""
        dur = {t.op: t.end - t.start for t in self.timeline}
        sched = self.schedule
        free = [0.0] * sched.stages
        end: dict[Op, float] = {}
        out = []
        for op in execution_order(sched):
            s = op.stage
            start = free[s]
            for d in sched.deps(op):
                start = max(start, end[d] + (t_p2p if d.stage != s else 0.0))
            end[op] = free[s] = start + dur[op]
            out.append(TimedOp(s, op, start, end[op]))
        out.sort(key=lambda t: (t.stage, t.start))
        return tuple(out)

    def replay_bubble(self, t_p2p: float = 0.0) -> float:
        """Bubble fraction of :meth:`replay`."""
        tl = self.replay(t_p2p)
        makespan = max(t.end for t in tl)
        return 1 - sum(t.end - t.start for t in tl) / (self.schedule.stages * makespan)


def collect(sched: Schedule, reports: Sequence[StageReport]) -> PipelineRun:
    """Merge the per-rank reports of :func:`train_step` into one :class:`PipelineRun`."""
    reports = tuple(sorted(reports, key=lambda r: r.rank))
    t0 = min(t.start for r in reports for t in r.timeline)
    timeline = tuple(TimedOp(t.stage, t.op, t.start - t0, t.end - t0) for r in reports for t in r.timeline)
    makespan = max(t.end for t in timeline)
    busy = sum(t.end - t.start for t in timeline)
    bubble = 1 - busy / (sched.stages * makespan) if makespan > 0 else 0.0
    grads = {}
    for r in reports:
        grads.update(r.grads)
    losses = [r.loss for r in reports if r.loss is not None]
    peaks = tuple(r.peak_activation_bytes / r.activation_unit_bytes if r.activation_unit_bytes else 0.0
                  for r in reports)
    return PipelineRun(
        schedule=sched,
        loss=losses[0],
        grads=grads,
        timeline=timeline,
        makespan=makespan,
        bubble_fraction=bubble,
        peak_activations=peaks,
        peak_activation_bytes=tuple(r.peak_activation_bytes for r in reports),
        activation_unit_bytes=tuple(r.activation_unit_bytes for r in reports),
        devices=tuple(r.device for r in reports),
        reports=reports,
    )


def run_pipeline(cluster, model, inputs, targets, sched: Schedule, *, loss_fn=None,
                 sync_cuda=None, warmup: int = 0, timeout: float | None = None) -> PipelineRun:
    """Run :func:`train_step` on every rank of ``cluster`` and :func:`collect` the result.

    ``warmup`` steps run first and are thrown away: a fresh rank's first step also pays
    one-time costs (autograd's worker threads, first-touch memory, new links) that would
    distort its timeline."""
    for _ in range(warmup):
        cluster.run(train_step, model, inputs, targets, sched, loss_fn=loss_fn,
                    sync_cuda=sync_cuda, return_grads=False, timeout=timeout)
    reports = cluster.run(train_step, model, inputs, targets, sched, loss_fn=loss_fn,
                          sync_cuda=sync_cuda, timeout=timeout)
    return collect(sched, reports)


def reference_step(model, inputs, targets, *, microbatches: int = 1, loss_fn: Callable | None = None):
    """The single-device step the pipeline must reproduce: ``(loss, grads)``.

    The loss of the whole batch (mean-reduced ``loss_fn``, default MSE) and the gradient
    of every parameter, by name; ``model`` itself is not touched (a copy runs).
    ``microbatches`` > 1 accumulates micro-batch losses divided by their number
    instead (the same value, summed in the pipeline's order).
    """
    loss_fn = loss_fn or F.mse_loss
    if callable(model) and not isinstance(model, nn.Module):
        model = model()
    ref = copy.deepcopy(model)
    for prm in ref.parameters():
        prm.grad = None
    n = inputs.shape[0] // microbatches
    total = 0.0
    for i in range(microbatches):
        sl = slice(i * n, (i + 1) * n)
        loss = loss_fn(ref(inputs[sl]), targets[sl]) / microbatches
        loss.backward()
        total += float(loss.detach())
    grads = {name: (prm.grad.detach().clone() if prm.grad is not None else None)
             for name, prm in ref.named_parameters()}
    return total, grads
