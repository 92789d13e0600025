"""A real 3D-parallel training run: tensor x pipeline x data parallelism on one rank grid.

Each rank of a :class:`shardlab.mesh.ParallelDims` grid holds

* along **PP**: one pipeline *stage*, a contiguous slice of the layers (the first stage
  also the embedding, the last the final norm, the LM head and the loss);
* along **TP**: its shard of every layer of that stage (:class:`ParallelBlock`: heads and
  FFN columns split, optionally with sequence parallelism);
* along **DP**: its share of the global batch; the gradients are averaged over the DP
  group once per step, before the optimizer runs.

The pipeline runs a GPipe schedule taken from :func:`shardlab.pipeline.schedule` (all
forwards, then all backwards), with blocking ``send``/``recv`` between the ranks that share
(tp, dp) coordinates on adjacent stages. Per micro-batch the loss is scaled by
``1 / microbatches`` and the DP average divides by ``dp``: the sum is the mean loss over the
whole global batch, so the run follows the single-device run step for step
(:func:`train_reference`), up to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import comm, memory, models
from .mesh import MeshGroups, ParallelDims
from .pipeline import schedule
from .sequence_parallel import ParallelBlock

__all__ = ["TrainConfig", "build_model", "global_batch", "train_reference", "stage_layers",
           "PipelineStage", "train_3d"]


@dataclass(frozen=True)
class TrainConfig:
    """What to train: a dense :data:`shardlab.memory.MODELS` shape, the batch, the optimizer."""

    model: str = "tiny"
    steps: int = 4
    batch: int = 8  # sequences per step, over all DP replicas
    seq_len: int = 16
    microbatches: int = 2  # per DP replica, per step
    lr: float = 1e-2  # Adam
    seed: int = 0
    sequence_parallel: bool = False

    def check(self, dims: ParallelDims) -> None:
        spec = memory.get_model(self.model)
        if self.batch % (dims.dp * self.microbatches):
            raise ValueError(f"batch={self.batch} must split into dp={dims.dp} replicas x "
                             f"{self.microbatches} micro-batches: choose a multiple of "
                             f"{dims.dp * self.microbatches}")
        if dims.pp > spec.layers:
            raise ValueError(f"pp={dims.pp} exceeds the {spec.layers} layers of {spec.name}")
        if self.sequence_parallel and self.seq_len % dims.tp:
            raise ValueError(f"seq_len={self.seq_len} must be divisible by tp={dims.tp} for "
                             "sequence parallelism")


def build_model(cfg: TrainConfig) -> models.TinyTransformer:
    """The whole model, initialised from ``cfg.seed`` (the same values on every rank)."""
    return models.TinyTransformer.from_spec(cfg.model, seed=cfg.seed)


def global_batch(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The (tokens, targets) of every step, the same on every rank. One batch, seen again at
    every step (the classic "overfit one batch" check): the loss must fall within a few steps."""
    vocab = memory.get_model(cfg.model).vocab
    return models.make_batch(cfg.seed, batch=cfg.batch, seq_len=cfg.seq_len, vocab=vocab)


def train_reference(cfg: TrainConfig = TrainConfig()) -> list[float]:
    """The same training on one device: the losses the 3D run must reproduce."""
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses, batch = [], global_batch(cfg)
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = models.lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def stage_layers(layers: int, stage: int, stages: int) -> range:
    """Layers of ``stage`` out of ``stages`` contiguous groups (first stages take the remainder)."""
    base, extra = divmod(layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class PipelineStage(nn.Module):
    """This rank's part of the model: its stage's layers, each sharded over the TP group."""

    def __init__(self, model: models.TinyTransformer, groups: MeshGroups, sequence_parallel: bool = False):
        super().__init__()
        dims, c = groups.dims, groups.coord
        self.groups, self.sequence_parallel = groups, sequence_parallel
        self.layers = stage_layers(len(model.blocks), c.pp, dims.pp)
        self.blocks = nn.ModuleList(
            ParallelBlock(model.blocks[i], groups.tp, sequence_parallel=sequence_parallel)
            for i in self.layers)
        # Embedding, final norm and head are replicated over the TP group (small here; a
        # large vocabulary would be split over it too).
        self.embed_tokens = model.embed_tokens if groups.is_first_stage else None
        self.norm = model.norm if groups.is_last_stage else None
        self.lm_head = model.lm_head if groups.is_last_stage else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or received hidden states -> hidden states or logits."""
        tp = self.groups.tp
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
            if self.sequence_parallel:  # keep my slice of the sequence (all-gather backward)
                x = comm.scatter_to_parallel_region(x, tp, dim=1)
        for block in self.blocks:
            x = block(x)
        if self.lm_head is not None:
            if self.sequence_parallel:  # whole sequence for the replicated head (split backward)
                x = comm.gather_from_parallel_region(x, tp, dim=1)
            x = self.lm_head(self.norm(x))
        return x

    def finish_grads(self) -> None:
        """Sequence-parallel norm gradients are partial over TP: sum them."""
        for block in self.blocks:
            block.allreduce_sequence_parallel_grads()


def _allreduce_mean(params: list[nn.Parameter], group, n: int) -> None:
    """Average gradients over a DP group of ``n`` ranks in one flat all-reduce (one bucket)."""
    grads = [p.grad for p in params if p.grad is not None]
    if n == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=group)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _gpipe_step(stage: PipelineStage, groups: MeshGroups, micro: list[tuple], cfg: TrainConfig,
                hidden: int) -> float | None:
    """Run one GPipe step over the micro-batches; return this replica's loss (last stage)."""
    dims, c = groups.dims, groups.coord
    m = len(micro)
    sched = schedule("gpipe", stages=dims.pp, microbatches=m)
    dev = next(stage.parameters()).device
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    total = 0.0
    for op in sched.ops[c.pp]:
        tokens, targets = micro[op.microbatch]
        b, s = tokens.shape
        shape = (b, s // dims.tp if cfg.sequence_parallel else s, hidden)
        if op.kind == "F":
            if groups.is_first_stage:
                x = tokens.to(dev)
            else:
                x = comm.recv(torch.empty(shape, device=dev), groups.prev_stage_rank, group=groups.pp)
                x.requires_grad_()
            inputs[op.microbatch] = x
            y = stage(x)
            if groups.is_last_stage:
                loss = F.cross_entropy(y.flatten(0, 1).float(), targets.to(dev).flatten())
                total += loss.item() / m
                outputs[op.microbatch] = loss / m
            else:
                comm.send(y.detach(), groups.next_stage_rank, group=groups.pp)
                outputs[op.microbatch] = y
        elif op.kind == "B":
            y = outputs.pop(op.microbatch)
            if groups.is_last_stage:
                y.backward()
            else:
                grad = comm.recv(torch.empty(shape, device=dev), groups.next_stage_rank, group=groups.pp)
                y.backward(grad)
            x = inputs.pop(op.microbatch)
            if not groups.is_first_stage:
                comm.send(x.grad, groups.prev_stage_rank, group=groups.pp)
    return total if groups.is_last_stage else None


def train_3d(dims: ParallelDims, cfg: TrainConfig = TrainConfig()) -> dict:
    """Rank function: train ``cfg`` on the ``dims`` grid; return this rank's view.

    Returns ``rank``, ``coord`` (dict), ``layers`` (of its stage), ``parameters`` (held
    here), ``losses`` (the global-batch loss per step, on last-stage ranks; else None) and
    ``comm`` (per group name, the calls and bytes of the whole run).
    """
    cfg.check(dims)
    groups = dims.build_groups()
    c = groups.coord
    model = build_model(cfg)
    stage = PipelineStage(model, groups, cfg.sequence_parallel)
    params = list(stage.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_replica = cfg.batch // dims.dp
    losses = []
    tokens, targets = global_batch(cfg)
    with comm.record() as log:
        for _ in range(cfg.steps):
            mine = slice(c.dp * per_replica, (c.dp + 1) * per_replica)
            micro = list(zip(tokens[mine].chunk(cfg.microbatches), targets[mine].chunk(cfg.microbatches)))
            opt.zero_grad()
            loss = _gpipe_step(stage, groups, micro, cfg, model.hidden)
            stage.finish_grads()
            _allreduce_mean(params, groups.dp, dims.dp)
            opt.step()
            if loss is not None:  # the mean over the global batch: average the replicas
                t = torch.tensor([loss], dtype=torch.float64, device=params[0].device)
                losses.append(comm.all_reduce(t, group=groups.dp).item() / dims.dp)
    by_group: dict[str, dict] = {}
    for rec in log:
        g = by_group.setdefault(rec.group, {})
        s = g.setdefault(rec.op, {"calls": 0, "bytes": 0, "sent_bytes": 0})
        s["calls"] += 1
        s["bytes"] += rec.nbytes
        s["sent_bytes"] += rec.sent_bytes
    return {"rank": groups.rank, "coord": asdict(c), "layers": list(stage.layers),
            "parameters": sum(p.numel() for p in params),
            "losses": losses if groups.is_last_stage else None, "comm": by_group}
