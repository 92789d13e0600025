"""Expert parallelism: a mixture-of-experts layer whose experts live on different ranks.

A MoE layer replaces the one MLP of a transformer layer with ``experts`` MLPs and a
*router* (a linear layer, hidden -> experts) that picks ``top_k`` of them for each token
(Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; Mixtral).
Only the chosen experts run, so the layer holds many parameters but spends the compute of
``top_k`` MLPs per token.

Expert parallelism puts ``experts / ep`` whole experts on each of ``ep`` ranks (rank r
holds the contiguous block ``r*E/ep .. (r+1)*E/ep - 1``). Every rank routes its own tokens,
then the tokens travel to the ranks that hold their experts and back:

1. **route** (local): softmax over the router logits, top-k, optional *capacity* per expert
   (assignments beyond it are *dropped*: the token skips that expert, the residual stream
   carries it on);
2. **count exchange**: an all-to-all of the per-expert counts, so every rank learns how many
   rows each peer will send it (the data all-to-all has uneven splits);
3. **dispatch**: an all-to-all of the token rows, sorted by expert;
4. **expert compute** on the rows received, grouped by local expert;
5. **combine**: the inverse all-to-all brings each result back to the token's rank, where it
   is scaled by the router weight and summed over the token's ``top_k`` experts.

The dispatch and combine go through :func:`shardlab.comm.all_to_all_autograd`, whose
backward is the inverse all-to-all, so gradients flow back to the tokens' ranks and into
the experts' owners without any extra code. The router (like attention and the norms) is
replicated on every rank of the EP group and sees only the local tokens: its gradients are
partial sums, all-reduced by :meth:`ExpertParallelMoE.allreduce_replicated_grads`.

Shapes: ``x_TH`` is a flat batch of T tokens with H hidden values; ``_TE`` router
logits/probabilities; ``_TK`` the top-k choices of each token.

The routing and capacity functions take tensors and need no process group, so the
notebooks and tests use them directly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import comm, memory

__all__ = [
    "Routing",
    "expert_capacity",
    "capacity_mask",
    "route",
    "load_balancing_loss",
    "SwiGLUExpert",
    "MoELayer",
    "ExpertParallelMoE",
    "experts_of_rank",
    "owner_of_expert",
    "send_counts_per_rank",
    "dispatch_order",
    "moe_parameters",
    "ep_weight_bytes_per_gpu",
    "make_tokens",
    "compare_moe",
]


# --------------------------------------------------------------------------------------------
# Routing (plain tensor functions)
# --------------------------------------------------------------------------------------------
def expert_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * tokens * top_k / experts)``.

    ``tokens * top_k / experts`` is what each expert would get under perfectly even routing;
    the capacity factor is the headroom over that (Switch Transformer, section 2.2).
    """
    for name, value in (("tokens", tokens), ("experts", experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if top_k > experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed the number of experts ({experts})")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor!r}")
    return int(math.ceil(capacity_factor * tokens * top_k / experts))


def capacity_mask(expert_idx_TK: torch.Tensor, experts: int, capacity: int | None) -> torch.Tensor:
    """Which assignments fit in their expert's ``capacity`` slots (bool, shape ``[T, k]``).

    Priority follows GShard: every token's first choice is served before any second choice,
    and within one choice rank earlier tokens come first. ``capacity=None`` keeps everything
    (dropless).
    """
    if capacity is None:
        return torch.ones_like(expert_idx_TK, dtype=torch.bool)
    T, k = expert_idx_TK.shape
    by_priority = expert_idx_TK.t().reshape(-1)  # choice 0 of all tokens, then choice 1, ...
    onehot = F.one_hot(by_priority, experts)  # [k*T, E]
    position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based slot in the chosen expert
    keep = position <= capacity
    return keep.reshape(k, T).t()


@dataclass(frozen=True)
class Routing:
    """The router's decisions for T tokens.

    ``weights_TK`` are the combine weights: the top-k probabilities, renormalised to sum to 1
    per token when the router normalises (Mixtral), else raw (Switch). ``keep_TK`` is False
    for assignments that the capacity dropped.
    """

    probs_TE: torch.Tensor
    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    keep_TK: torch.Tensor
    capacity: int | None

    @property
    def experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """Assignments each expert was chosen for, before capacity (int64, ``[E]``)."""
        return torch.bincount(self.expert_idx_TK.reshape(-1), minlength=self.experts)

    @property
    def kept_per_expert(self) -> torch.Tensor:
        """Assignments each expert actually processes (after capacity)."""
        return torch.bincount(self.expert_idx_TK[self.keep_TK], minlength=self.experts)

    @property
    def dropped_assignments(self) -> int:
        """(token, expert) pairs that the capacity turned away."""
        return int((~self.keep_TK).sum())

    @property
    def dropped_tokens(self) -> int:
        """Tokens that lost *all* their experts: the layer passes them through unchanged."""
        return int((~self.keep_TK).all(dim=-1).sum())


def route(logits_TE: torch.Tensor, top_k: int, capacity_factor: float | None = None,
          normalize: bool = True) -> Routing:
    """Top-k routing with an optional capacity (``capacity_factor=None``: dropless)."""
    if logits_TE.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be between 1 and the {E} experts, got {top_k}")
    probs = torch.softmax(logits_TE.float(), dim=-1)  # routing decisions in fp32
    top_p, top_i = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True) if normalize else top_p
    capacity = None if capacity_factor is None or T == 0 else \
        expert_capacity(T, E, top_k, capacity_factor)
    return Routing(probs, top_i, weights, capacity_mask(top_i, E, capacity), capacity)


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*k assignments that chose expert e (not differentiable),
    ``P_e`` the mean router probability of expert e (differentiable). It is 1 for perfectly
    uniform routing and grows up to E when one expert takes everything, so adding
    ``alpha * loss`` (alpha ~ 0.01) to the training loss pushes the router towards balance.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype) / expert_idx_TK.numel()
    P = probs_TE.mean(dim=0)
    return E * (f * P).sum()


# --------------------------------------------------------------------------------------------
# The single-device MoE layer (the reference)
# --------------------------------------------------------------------------------------------
class SwiGLUExpert(nn.Module):
    """One expert: the Llama/Mixtral MLP ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    """A mixture-of-experts MLP on one device: router + ``experts`` SwiGLU experts.

    ``forward(x)`` takes ``[..., hidden]`` and returns the same shape. After a call,
    ``.routing`` holds the decisions and ``.aux_loss`` the load-balancing loss (a tensor in
    the graph: add ``alpha * layer.aux_loss`` to the loss you backpropagate).
    """

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int = 2,
                 capacity_factor: float | None = None, normalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be between 1 and experts={experts}, got {top_k}")
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, experts, top_k
        self.capacity_factor, self.normalize = capacity_factor, normalize
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, ffn) for _ in range(experts))
        self.routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_spec(cls, model, capacity_factor: float | None = None, seed: int | None = 0) -> "MoELayer":
        """The MoE layer of a :class:`shardlab.memory.ModelSpec` with experts (e.g. ``"tiny-moe"``)."""
        spec = memory.get_model(model)
        if not spec.is_moe:
            raise ValueError(f"{spec.name} has no experts; use a MoE spec such as 'tiny-moe'")
        if seed is not None:
            torch.manual_seed(seed)
        return cls(spec.hidden, spec.ffn, spec.experts, spec.top_k, capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, self.hidden)
        routing = route(self.router(x_TH), self.top_k, self.capacity_factor, self.normalize)
        y_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero((routing.expert_idx_TK == e) & routing.keep_TK, as_tuple=True)
            if tok.numel():
                w = routing.weights_TK[tok, slot].unsqueeze(-1).to(x_TH.dtype)
                y_TH = y_TH.index_add(0, tok, w * expert(x_TH[tok]))
        self.routing = routing
        self.aux_loss = load_balancing_loss(routing.probs_TE, routing.expert_idx_TK)
        return y_TH.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Placement arithmetic (no process group)
# --------------------------------------------------------------------------------------------
def _check_ep(experts: int, ep: int) -> int:
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep (expert-parallel degree) must be a positive int, got {ep!r}")
    if experts % ep:
        raise ValueError(f"ep={ep} must divide the {experts} experts: choose ep among "
                         f"{[d for d in range(1, experts + 1) if experts % d == 0]}")
    return experts // ep


def experts_of_rank(rank: int, experts: int, ep: int) -> list[int]:
    """The contiguous block of experts rank ``rank`` of the EP group holds."""
    n = _check_ep(experts, ep)
    if not 0 <= rank < ep:
        raise ValueError(f"rank {rank} is outside the EP group of {ep} ranks")
    return list(range(rank * n, (rank + 1) * n))


def owner_of_expert(expert: int, experts: int, ep: int) -> int:
    """The EP rank that holds ``expert``."""
    return expert // _check_ep(experts, ep)


def send_counts_per_rank(tokens_per_expert: torch.Tensor | list, ep: int) -> list[int]:
    """Rows a rank sends to each EP rank: its per-expert counts summed over each owner's block."""
    counts = torch.as_tensor(tokens_per_expert).reshape(-1)
    n = _check_ep(counts.numel(), ep)
    return [int(c) for c in counts.reshape(ep, n).sum(1).tolist()]


def dispatch_order(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept (token, slot) assignments sorted by expert (stable: token order within one).

    Returns ``(token_idx, slot_idx, expert_idx)``, one entry per row of the send buffer.
    Sorting by expert also sorts by destination rank, because experts sit in contiguous
    blocks: the buffer is then ready for an all-to-all.
    """
    tok, slot = torch.nonzero(routing.keep_TK, as_tuple=True)
    expert = routing.expert_idx_TK[tok, slot]
    order = torch.sort(expert, stable=True).indices
    return tok[order], slot[order], expert[order]


# --------------------------------------------------------------------------------------------
# The expert-parallel layer
# --------------------------------------------------------------------------------------------
class ExpertParallelMoE(nn.Module):
    """A :class:`MoELayer` whose experts are spread over the ranks of ``group``.

    Build it from a single-device layer with the same weights on every rank
    (``ExpertParallelMoE.from_moe(moe, group)``): each rank keeps the router and its own
    block of experts. ``forward(x)`` takes *this rank's* tokens; the result equals
    ``moe(x)`` on the same tokens, and the gradients (after
    :meth:`allreduce_replicated_grads`) equal those of the single-device layer run on every
    rank's tokens.

    After a call: ``.routing`` and ``.aux_loss`` as in :class:`MoELayer`; ``.send_counts``
    (rows sent to each rank), ``.recv_counts_SE`` (rows received from each source rank for
    each local expert).
    """

    def __init__(self, router: nn.Linear, local_experts: list[nn.Module], num_experts: int,
                 top_k: int, capacity_factor: float | None = None, normalize: bool = True,
                 group=None):
        super().__init__()
        self.group = group
        self.ep = comm.group_size(group)
        self.ep_rank = comm.group_rank(group)
        self.num_local = _check_ep(num_experts, self.ep)
        if len(local_experts) != self.num_local:
            raise ValueError(f"rank {self.ep_rank} needs {self.num_local} local experts "
                             f"({num_experts} over {self.ep} ranks), got {len(local_experts)}")
        self.hidden = router.in_features
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.normalize = capacity_factor, normalize
        self.router = router
        self.experts = nn.ModuleList(local_experts)
        self.first_expert = self.ep_rank * self.num_local
        self.routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None
        self.send_counts: list[int] = []
        self.recv_counts_SE: torch.Tensor | None = None

    @classmethod
    def from_moe(cls, moe: MoELayer, group=None) -> "ExpertParallelMoE":
        """Keep the router (replicated) and this rank's block of experts (copies)."""
        ep, r = comm.group_size(group), comm.group_rank(group)
        mine = experts_of_rank(r, moe.num_experts, ep)
        return cls(copy.deepcopy(moe.router), [copy.deepcopy(moe.experts[e]) for e in mine],
                   moe.num_experts, moe.top_k, moe.capacity_factor, moe.normalize, group)

    @property
    def local_experts(self) -> list[int]:
        """Global indices of the experts this rank holds."""
        return list(range(self.first_expert, self.first_expert + self.num_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, self.hidden)
        routing = route(self.router(x_TH), self.top_k, self.capacity_factor, self.normalize)
        tok, slot, expert = dispatch_order(routing)

        # 2. count exchange: each rank sends every owner its per-expert counts.
        counts_E = torch.bincount(expert, minlength=self.num_experts)
        split = [self.num_local] * self.ep
        recv_SE = comm.all_to_all(counts_E, split, split, group=self.group).reshape(self.ep, self.num_local)
        send = send_counts_per_rank(counts_E, self.ep)
        recv = [int(c) for c in recv_SE.sum(1).tolist()]

        # 3. dispatch: rows sorted by expert, so contiguous per destination rank.
        x_recv = comm.all_to_all_autograd(x_TH[tok], send, recv, group=self.group)

        # 4. the received rows are grouped by (source rank, local expert): regroup by expert.
        local_of_row = torch.arange(self.num_local, device=x_TH.device).repeat(self.ep)
        local_of_row = local_of_row.repeat_interleave(recv_SE.reshape(-1))
        perm = torch.sort(local_of_row, stable=True).indices
        per_expert = recv_SE.sum(0).tolist()
        outs = [expert_fn(chunk) for expert_fn, chunk
                in zip(self.experts, torch.split(x_recv[perm], per_expert))]
        y_recv = torch.cat(outs)[torch.argsort(perm)]

        # 5. combine: the inverse all-to-all, then weight and sum over each token's experts.
        y_back = comm.all_to_all_autograd(y_recv, recv, send, group=self.group)
        w = routing.weights_TK[tok, slot].unsqueeze(-1).to(x_TH.dtype)
        y_TH = torch.zeros_like(x_TH).index_add(0, tok, w * y_back)

        self.routing, self.send_counts, self.recv_counts_SE = routing, send, recv_SE
        self.aux_loss = load_balancing_loss(routing.probs_TE, routing.expert_idx_TK)
        return y_TH.reshape(x.shape)

    def allreduce_replicated_grads(self) -> None:
        """Sum the router's gradients over the EP group: each rank saw only its own tokens."""
        for p in self.router.parameters():
            if p.grad is not None:
                comm.all_reduce(p.grad, group=self.group)


# --------------------------------------------------------------------------------------------
# Parameters and memory
# --------------------------------------------------------------------------------------------
def moe_parameters(model) -> dict[str, int]:
    """Total vs active parameters of a MoE model (:mod:`shardlab.memory` counts).

    Keys: ``total``, ``active`` (per token: top_k of the experts), ``experts`` (all expert
    MLPs), ``shared`` (everything else: attention, router, norms, embedding, head).
    """
    spec = memory.get_model(model)
    parts = memory.parameter_breakdown(spec)
    total = memory.parameter_count(spec)
    return {"total": total, "active": memory.active_parameter_count(spec),
            "experts": parts["mlp"], "shared": total - parts["mlp"]}


def ep_weight_bytes_per_gpu(model, ep: int, dtype: str = "bf16") -> dict[str, int]:
    """Weight bytes on each GPU when ``ep`` ranks split the experts and replicate the rest.

    Keys: ``experts`` (this rank's experts), ``shared`` (replicated), ``total``.
    """
    spec = memory.get_model(model)
    _check_ep(spec.experts, ep)
    p = moe_parameters(spec)
    experts = int(math.ceil(p["experts"] / ep * memory.dtype_bytes(dtype)))
    shared = int(math.ceil(p["shared"] * memory.dtype_bytes(dtype)))
    return {"experts": experts, "shared": shared, "total": experts + shared}


# --------------------------------------------------------------------------------------------
# A rank function: the MoE layer, spread over ranks vs on one device
# --------------------------------------------------------------------------------------------
def make_tokens(model, tokens: int, rank: int, seed: int = 0, skew: float = 0.0,
                router: nn.Linear | None = None) -> torch.Tensor:
    """Rank ``rank``'s ``tokens`` hidden vectors (deterministic).

    ``skew`` > 0 tilts every token towards router row 0, so that expert 0 is chosen more
    often: the imbalance real routers show, which capacity and the balancing loss fight.
    """
    spec = memory.get_model(model)
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(tokens, spec.hidden, generator=g)
    if skew and router is not None:
        w = router.weight[0].detach().float().cpu()
        x = x + skew * w / w.norm() * math.sqrt(spec.hidden)
    return x


def compare_moe(model: str = "tiny-moe", *, tokens: int = 32, capacity_factor: float | None = None,
                skew: float = 0.0, seed: int = 0, aux_weight: float = 0.01, group=None) -> dict:
    """Rank function: :class:`ExpertParallelMoE` vs :class:`MoELayer` with the same weights.

    Each rank routes its own ``tokens`` tokens; the reference runs every rank's tokens
    through the single-device layer (capacity is per rank's batch in both). The loss is
    ``sum(y**2) + aux_weight * aux_loss``, summed over ranks. Returns the largest differences
    (this rank's outputs and input gradients, absolute; the gradients of the router and of
    this rank's experts, relative to the largest entry), the routing counts, the all-to-all splits and the collectives logged.
    """
    from .runtime import device

    dev = device()
    ep, r = comm.group_size(group), comm.group_rank(group)
    moe = MoELayer.from_spec(model, capacity_factor=capacity_factor, seed=seed).to(dev)
    xs = [make_tokens(model, tokens, q, seed, skew, moe.router).to(dev) for q in range(ep)]

    loss = 0.0
    ref_out, ref_x = [], []
    for x in xs:
        xr = x.clone().requires_grad_()
        y = moe(xr)
        loss = loss + (y ** 2).sum() + aux_weight * moe.aux_loss
        ref_out.append(y.detach())
        ref_x.append(xr)
    loss.backward()

    layer = ExpertParallelMoE.from_moe(moe, group)
    for p in layer.parameters():
        p.grad = None
    x = xs[r].clone().requires_grad_()
    with comm.record() as log:
        y = layer(x)
        ((y ** 2).sum() + aux_weight * layer.aux_loss).backward()
    with comm.record() as sync_log:
        layer.allreduce_replicated_grads()

    ref_params = dict(moe.named_parameters())

    def diff(p, ref) -> float:  # relative; an expert that got no token has no gradient: zero
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    errs = [diff(p, ref_params["router." + n]) for n, p in layer.router.named_parameters()]
    for le, e in enumerate(layer.local_experts):
        for n, p in layer.experts[le].named_parameters():
            errs.append(diff(p, ref_params[f"experts.{e}.{n}"]))
    routing = layer.routing
    return {
        "out_err": (y - ref_out[r]).abs().max().item(),
        "grad_x_err": (x.grad - ref_x[r].grad).abs().max().item(),
        "param_grad_err": max(errs),
        "local_experts": layer.local_experts,
        "tokens_per_expert": routing.tokens_per_expert.cpu().tolist(),
        "kept_per_expert": routing.kept_per_expert.cpu().tolist(),
        "capacity": routing.capacity,
        "dropped_assignments": routing.dropped_assignments,
        "dropped_tokens": routing.dropped_tokens,
        "send_counts": layer.send_counts,
        "recv_counts": layer.recv_counts_SE.cpu().tolist(),
        "aux_loss": layer.aux_loss.item(),
        "comm": comm.summary(log),
        "comm_log": [(rec.op, rec.group, tuple(rec.shape), rec.dtype, rec.sent_bytes) for rec in log],
        "comm_grad_sync": comm.summary(sync_log),
    }
