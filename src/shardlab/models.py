"""Small trainable models that every chapter shards: a Llama-shaped transformer and an MLP.

`TinyTransformer` has the layer shapes of the `shardlab.memory` specs (grouped-query
attention with `q_proj`/`k_proj`/`v_proj`/`o_proj`, a SwiGLU MLP with `gate_proj`/`up_proj`/
`down_proj`, RMSNorm, untied embedding and LM head, no biases), so its parameter count equals
`memory.parameter_count(spec)` for the same shape. It is small enough to train on a CPU.

The pieces are laid out for sharding:

* `model.blocks` is an `nn.ModuleList`: a pipeline stage is a slice of it;
* `model.embed(tokens)` and `model.head(x)` are the first and last stage's extra work;
* attention and MLP keep their head counts and sizes as attributes (`n_heads`,
  `n_kv_heads`, `head_dim`), so a tensor-parallel rank can hold a slice of the heads;
* rotary position embeddings are computed on the fly: no buffer to shard or broadcast.

Weights are initialised per parameter from `(seed, full parameter name)`
(`init_parameters`), so any subset of the model, built alone on any rank with
`materialize`, holds exactly the values the whole model would hold.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention", "SwiGLU", "Block", "TinyTransformer", "TinyMLP",
    "init_parameters", "materialize", "make_batch", "make_mlp_batch",
    "lm_loss", "mse_loss", "count_parameters", "parameter_bytes", "rope",
]

INIT_STD = 0.02  # GPT-2 / Llama initialisation of every matrix


# --------------------------------------------------------------------------- layers

def rope(x_BNSD: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of queries or keys, shape (B, heads, S, D).

    Pairs (x[..., i], x[..., i + D/2]) are rotated by angle pos * base^(-2i/D).
    """
    s, d = x_BNSD.shape[-2], x_BNSD.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x_BNSD.device) * 2 / d)
    angles = torch.arange(s, dtype=torch.float32, device=x_BNSD.device)[:, None] * freqs
    cos, sin = angles.cos().to(x_BNSD.dtype), angles.sin().to(x_BNSD.dtype)
    x1, x2 = x_BNSD[..., :half], x_BNSD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention: `n_heads` query heads share `n_kv_heads` K/V heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, **factory):
        super().__init__()
        if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
            raise ValueError(f"need hidden ({hidden}) divisible by heads ({heads}), heads divisible "
                             f"by kv_heads ({kv_heads}) and an even head size for rotary embeddings")
        self.n_heads, self.n_kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False, **factory)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSH.shape
        # n_heads / n_kv_heads are read at call time: a TP rank may hold fewer of them.
        q = self.q_proj(x_BSH).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSH).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # each K/V head serves `group` query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False, **factory)
        self.up_proj = nn.Linear(hidden, ffn, bias=False, **factory)
        self.down_proj = nn.Linear(ffn, hidden, bias=False, **factory)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BSH)) * self.up_proj(x_BSH))


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int, **factory):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-5, **factory)
        self.attn = Attention(hidden, heads, kv_heads, **factory)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-5, **factory)
        self.mlp = SwiGLU(hidden, ffn, **factory)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_BSH = x_BSH + self.attn(self.input_layernorm(x_BSH))
        return x_BSH + self.mlp(self.post_attention_layernorm(x_BSH))


class TinyTransformer(nn.Module):
    """A decoder-only language model with Llama's layer shapes, at any (small) size.

    >>> model = TinyTransformer(vocab=256, hidden=64, heads=8, layers=4, ffn=176, kv_heads=4)
    >>> tokens, targets = make_batch(0, batch=2, seq_len=16, vocab=256)
    >>> model(tokens).shape
    torch.Size([2, 16, 256])

    `device="meta"` builds the shapes only (no memory); `materialize` then fills in any part.
    """

    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, ffn: int,
                 kv_heads: int | None = None, *, tied_embeddings: bool = False, seed: int = 0,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("vocab", vocab), ("hidden", hidden), ("heads", heads),
                            ("layers", layers), ("ffn", ffn), ("kv_heads", kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab, self.hidden, self.heads, self.kv_heads = vocab, hidden, heads, kv_heads
        self.ffn, self.n_layers, self.tied_embeddings = ffn, layers, tied_embeddings
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(vocab, hidden, **factory)
        self.blocks = nn.ModuleList(Block(hidden, heads, kv_heads, ffn, **factory)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-5, **factory)
        self.lm_head = nn.Linear(hidden, vocab, bias=False, **factory)
        if tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if torch.device(device if device is not None else "cpu").type != "meta":
            init_parameters(self, seed)

    @classmethod
    def from_spec(cls, spec, **kwargs) -> "TinyTransformer":
        """Build the model a `shardlab.memory.ModelSpec` (or MODELS key) describes."""
        from .memory import get_model

        spec = get_model(spec)
        if spec.is_moe:
            raise ValueError(f"{spec.name} is a mixture of experts; TinyTransformer is dense")
        return cls(spec.vocab, spec.hidden, spec.heads, spec.layers, spec.ffn, spec.kv_heads,
                   tied_embeddings=spec.tied_embeddings, **kwargs)

    def embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """First stage's work: token ids -> hidden states (B, S, H)."""
        return self.embed_tokens(tokens_BS)

    def head(self, x_BSH: torch.Tensor) -> torch.Tensor:
        """Last stage's work: final norm and LM head -> logits (B, S, vocab)."""
        return self.lm_head(self.norm(x_BSH))

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TinyMLP(nn.Module):
    """Linear -> GELU -> ... -> Linear, with `dims = (in, hidden..., out)`; `layers` is an
    `nn.ModuleList` of the linear layers."""

    def __init__(self, dims: Sequence[int] = (16, 64, 16), *, bias: bool = True, seed: int = 0,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        dims = list(dims)
        if len(dims) < 2 or any(not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"dims must be at least two positive ints, got {dims!r}")
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias, device=device, dtype=dtype)
                                    for a, b in zip(dims, dims[1:]))
        if torch.device(device if device is not None else "cpu").type != "meta":
            init_parameters(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


# --------------------------------------------------------------------------- initialisation

def _generator(seed: int, name: str) -> torch.Generator:
    # The CPU generator (mt19937) keeps only 32 bits of its seed: hash seed and name together.
    return torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}/{name}".encode()))


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int = 0, prefix: str = "") -> nn.Module:
    """Initialise every parameter from `(seed, prefix + its name)`: norms (1-D weights named
    `*norm*`) to one, biases to zero, matrices N(0, 0.02^2).

    Because each value depends only on the seed and the full name, building a part of a model
    (a pipeline stage, one rank's layers) gives exactly the values of the whole model. Pass the
    part's name in the whole model as `prefix` (e.g. "blocks.3").
    """
    for name, p in module.named_parameters(prefix=prefix):
        if p.device.type == "meta":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.zero_()
        elif p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            # Drawn on the CPU in fp32 whatever the device and dtype: the same values everywhere.
            values = torch.empty(p.shape).normal_(0.0, INIT_STD, generator=_generator(seed, name))
            p.copy_(values)
    return module


def materialize(model: nn.Module, names: Iterable[str], device=None, seed: int = 0) -> nn.Module:
    """Allocate and initialise only the submodules `names` of a model built on `meta`.

    `names` are paths such as "embed_tokens", "blocks.2", "lm_head". Each is moved off the
    meta device with `to_empty` and initialised as the whole model would be.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    for name in names:
        sub = model.get_submodule(name)
        sub.to_empty(device=device)
        init_parameters(sub, seed, prefix=name)
    return model


# --------------------------------------------------------------------------- data and losses

def make_batch(seed: int, batch: int = 8, seq_len: int = 32, vocab: int = 256,
               max_step: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, learnable language-modelling batch: (tokens, targets), both (B, S) int64.

    Each sequence counts modulo `vocab` from a random start with a random stride in
    [1, max_step): x[t+1] = (x[t] + stride) % vocab. The target is the next token, which a
    model can predict once it has seen two tokens of the sequence. Same seed, same batch.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("vocab", vocab)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    g = torch.Generator().manual_seed(int(seed))
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(1, max(2, max_step), (batch, 1), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def make_mlp_batch(seed: int, batch: int = 32, in_dim: int = 16,
                   out_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch for `TinyMLP`: x ~ N(0, 1), y = tanh(x @ W_teacher)
    with a fixed teacher matrix (seeded by the dims, not by `seed`, so every batch shares it)."""
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(batch, in_dim, generator=g)
    teacher = torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(
        1000 * in_dim + out_dim)) / math.sqrt(in_dim)
    return x, torch.tanh(x @ teacher)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `(tokens, targets)`."""
    tokens, targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of `model` on `(x, y)`."""
    x, y = batch
    return F.mse_loss(model(x), y)


# --------------------------------------------------------------------------- counting

# module.parameters() yields a shared (tied) tensor once, so it is counted once.

def count_parameters(module: nn.Module) -> int:
    """Number of parameters (a tied matrix counts once); works on the meta device too."""
    return sum(p.numel() for p in module.parameters())


def parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters occupy in their current dtype (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
