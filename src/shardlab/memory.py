"""Memory arithmetic: model shapes, parameter counts, and the bytes they turn into.

Everything here is plain arithmetic on a :class:`ModelSpec` (no process group, no GPU), so a
notebook or the planner can ask "does it fit?" in microseconds. Only
:func:`meta_parameter_count` / :func:`build_skeleton` touch torch, and they import it lazily:
they build the real layers on the ``meta`` device (shapes, no storage) to prove that the
analytic count is the count of a real model.

Layer shapes follow the Llama / Mixtral family (Hugging Face configs):

* attention: ``q_proj`` (hidden x heads*head_dim), ``k_proj`` and ``v_proj``
  (hidden x kv_heads*head_dim, grouped-query attention), ``o_proj`` (heads*head_dim x hidden),
  no biases;
* MLP: SwiGLU, three matrices (gate, up: hidden x ffn; down: ffn x hidden), no biases; with
  ``experts > 1`` one such MLP per expert plus a router (hidden x experts);
* RMSNorm: two per layer (before attention and before the MLP) and one final, ``hidden``
  weights each;
* token embedding (vocab x hidden) and an LM head (hidden x vocab), untied unless
  ``tied_embeddings``.

Byte counts are returned as ``int`` (rounded up: int4 packs two values per byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._presets import lookup

__all__ = [
    "ModelSpec",
    "MODELS",
    "get_model",
    "DTYPE_BYTES",
    "dtype_bytes",
    "parameter_count",
    "active_parameter_count",
    "parameter_breakdown",
    "layer_parameter_count",
    "layer_breakdown",
    "build_skeleton",
    "meta_parameter_count",
    "weight_bytes",
    "kv_cache_bytes",
    "kv_heads_per_rank",
    "hidden_state_bytes",
    "activation_bytes",
    "ADAM_MIXED_PRECISION",
    "training_state_bytes",
    "MemoryReport",
    "memory_per_gpu",
]


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer (Llama / Mixtral family).

    ``ffn`` is the intermediate size of one (expert) MLP. ``experts`` > 1 makes every layer a
    mixture-of-experts layer with ``experts`` SwiGLU MLPs of which ``top_k`` run per token.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    experts: int = 1
    top_k: int = 1
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for attr in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "experts", "top_k"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec {self.name!r}: {attr} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: hidden ({self.hidden}) must be divisible by heads "
                f"({self.heads}); change one of them"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads "
                f"({self.kv_heads}) for grouped-query attention"
            )
        if self.top_k > self.experts:
            raise ValueError(
                f"ModelSpec {self.name!r}: top_k ({self.top_k}) cannot exceed experts ({self.experts})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 1


# Reference shapes from the Hugging Face configs (SYLLABUS.md, "Reference shapes").
MODELS: dict[str, ModelSpec] = {
    "llama2-70b": ModelSpec("Llama-2-70B", layers=80, hidden=8192, heads=64, kv_heads=8,
                            ffn=28672, vocab=32000),
    "llama3-8b": ModelSpec("Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8,
                           ffn=14336, vocab=128256),
    "llama3-70b": ModelSpec("Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8,
                            ffn=28672, vocab=128256),
    "llama3-405b": ModelSpec("Llama-3-405B", layers=126, hidden=16384, heads=128, kv_heads=8,
                             ffn=53248, vocab=128256),
    "mixtral-8x7b": ModelSpec("Mixtral-8x7B", layers=32, hidden=4096, heads=32, kv_heads=8,
                              ffn=14336, vocab=32000, experts=8, top_k=2),
    # Tiny shapes that really run on a CPU (mock devices): same structure, toy sizes.
    # 8 heads / 4 KV heads / 4 experts divide evenly for TP and EP degrees 1, 2 and 4.
    "tiny": ModelSpec("tiny", layers=4, hidden=64, heads=8, kv_heads=4, ffn=176, vocab=512),
    "tiny-moe": ModelSpec("tiny-moe", layers=2, hidden=64, heads=8, kv_heads=4, ffn=128,
                          vocab=512, experts=4, top_k=2),
}


def get_model(model: str | ModelSpec) -> ModelSpec:
    """Return ``model`` itself if it is a spec, else look the key up in :data:`MODELS`."""
    return lookup(model, MODELS, ModelSpec, "model")


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------
# Bytes per stored value. int4 packs two values in a byte (quantization scales not counted).
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}

# Other spellings learners type (torch / numpy names), mapped to the canonical keys above.
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "f32": "fp32",
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "qint8": "int8", "uint8": "int8",
    "quint4x2": "int4", "uint4": "int4",
}


def dtype_bytes(dtype: str | object) -> float:
    """Bytes per value of ``dtype``: a key of :data:`DTYPE_BYTES`, a torch name such as
    ``"bfloat16"`` / ``"torch.float16"``, or a ``torch.dtype`` (matched by its name)."""
    key = str(dtype).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)} "
            f"(or a torch name such as float16, bfloat16, float32)"
        )
    return DTYPE_BYTES[key]


def _nbytes(count: float, dtype: str | object) -> int:
    # Round up: a half-filled byte (int4) is still a byte of memory.
    return int(math.ceil(count * dtype_bytes(dtype)))


def _positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------
def layer_breakdown(model: str | ModelSpec) -> dict[str, int]:
    """Parameters of one decoder layer by component: attention, mlp (all experts), router, norms."""
    spec = get_model(model)
    h, hd = spec.hidden, spec.head_dim
    q_and_o = 2 * h * spec.heads * hd
    k_and_v = 2 * h * spec.kv_heads * hd  # GQA: only kv_heads key/value heads
    one_mlp = 3 * h * spec.ffn  # SwiGLU: gate, up, down
    return {
        "attention": q_and_o + k_and_v,
        "mlp": spec.experts * one_mlp,
        "router": h * spec.experts if spec.is_moe else 0,
        "norms": 2 * h,
    }


def parameter_breakdown(model: str | ModelSpec) -> dict[str, int]:
    """Parameters by component for the whole model.

    Keys: ``embedding``, ``attention``, ``mlp`` (all experts), ``router``, ``norms`` (per-layer
    and final RMSNorms), ``lm_head`` (0 when tied). Values sum to :func:`parameter_count`.
    """
    spec = get_model(model)
    layer = layer_breakdown(spec)
    embedding = spec.vocab * spec.hidden
    return {
        "embedding": embedding,
        "attention": spec.layers * layer["attention"],
        "mlp": spec.layers * layer["mlp"],
        "router": spec.layers * layer["router"],
        "norms": spec.layers * layer["norms"] + spec.hidden,  # + final norm
        "lm_head": 0 if spec.tied_embeddings else embedding,
    }


def layer_parameter_count(model: str | ModelSpec) -> int:
    """Parameters in one decoder layer (attention, MLP or experts, router, two norms)."""
    return sum(layer_breakdown(get_model(model)).values())


def parameter_count(model: str | ModelSpec) -> int:
    """Exact number of parameters of ``model`` (a spec or a :data:`MODELS` key)."""
    return sum(parameter_breakdown(model).values())


def active_parameter_count(model: str | ModelSpec) -> int:
    """Parameters used for one token: in a MoE layer only ``top_k`` of the experts run.

    The router and all shared parts (attention, norms, embedding, head) always count.
    The embedding counts in full, by the usual convention, although a token reads one row.
    """
    spec = get_model(model)
    parts = parameter_breakdown(spec)
    parts["mlp"] = parts["mlp"] * spec.top_k // spec.experts
    return sum(parts.values())


# --------------------------------------------------------------------------------------------
# Real layers on the meta device
# --------------------------------------------------------------------------------------------
def build_skeleton(model: str | ModelSpec, layers: int | None = None, device: str = "meta"):
    """Build the model's real parameter-holding modules (``nn.Linear``, ``nn.Embedding``,
    ``nn.RMSNorm``) as an ``nn.ModuleDict``; no forward pass, just shapes.

    On ``device="meta"`` nothing is allocated, so even the 405B model builds instantly.
    ``layers`` limits how many decoder layers are built (default: all).
    """
    import torch
    from torch import nn

    spec = get_model(model)
    n_layers = spec.layers if layers is None else _positive_int("layers", layers)
    h, hd = spec.hidden, spec.head_dim

    def mlp() -> nn.ModuleDict:
        return nn.ModuleDict({
            "gate_proj": nn.Linear(h, spec.ffn, bias=False),
            "up_proj": nn.Linear(h, spec.ffn, bias=False),
            "down_proj": nn.Linear(spec.ffn, h, bias=False),
        })

    def layer() -> nn.ModuleDict:
        parts = {
            "input_layernorm": nn.RMSNorm(h),
            "q_proj": nn.Linear(h, spec.heads * hd, bias=False),
            "k_proj": nn.Linear(h, spec.kv_heads * hd, bias=False),
            "v_proj": nn.Linear(h, spec.kv_heads * hd, bias=False),
            "o_proj": nn.Linear(spec.heads * hd, h, bias=False),
            "post_attention_layernorm": nn.RMSNorm(h),
        }
        if spec.is_moe:
            parts["router"] = nn.Linear(h, spec.experts, bias=False)
            parts["experts"] = nn.ModuleList(mlp() for _ in range(spec.experts))
        else:
            parts["mlp"] = mlp()
        return nn.ModuleDict(parts)

    with torch.device(device):
        embed = nn.Embedding(spec.vocab, h)
        skeleton = nn.ModuleDict({
            "embed_tokens": embed,
            "layers": nn.ModuleList(layer() for _ in range(n_layers)),
            "norm": nn.RMSNorm(h),
        })
        if spec.tied_embeddings:
            skeleton["lm_head"] = nn.Linear(h, spec.vocab, bias=False)
            skeleton["lm_head"].weight = embed.weight  # shared tensor: counted once below
        else:
            skeleton["lm_head"] = nn.Linear(h, spec.vocab, bias=False)
    return skeleton


def meta_parameter_count(model: str | ModelSpec, layers: int | None = None) -> int:
    """Count the parameters of the real modules built on the ``meta`` device.

    ``layers`` decoder layers are actually built (default: all); since every layer has the
    same shapes, the full model's count is extrapolated from them. The result is the whole
    model's count either way and should equal :func:`parameter_count`.
    """
    spec = get_model(model)
    built = spec.layers if layers is None else min(_positive_int("layers", layers), spec.layers)
    skeleton = build_skeleton(spec, layers=built)
    # model.parameters() deduplicates shared tensors, so a tied head counts once.
    total = sum(p.numel() for p in skeleton.parameters())
    per_layer = sum(p.numel() for p in skeleton["layers"][0].parameters())
    return total + (spec.layers - built) * per_layer


# --------------------------------------------------------------------------------------------
# Bytes: weights, KV cache, activations
# --------------------------------------------------------------------------------------------
def weight_bytes(model: str | ModelSpec, dtype: str = "fp16") -> int:
    """Bytes of all weights stored in ``dtype`` (70B-class in fp16: about 140 GB)."""
    return _nbytes(parameter_count(model), dtype)


def kv_heads_per_rank(model: str | ModelSpec, tp: int) -> int:
    """KV heads each of ``tp`` tensor-parallel ranks stores.

    With ``tp <= kv_heads`` the KV heads are split evenly; with ``tp > kv_heads`` each KV head
    is replicated on ``tp / kv_heads`` ranks (every rank still needs the KV head its query
    heads attend with), so each rank holds one.
    """
    spec = get_model(model)
    _positive_int("tp", tp)
    if spec.heads % tp:
        raise ValueError(f"tp={tp} must divide the {spec.heads} attention heads of {spec.name}")
    if tp <= spec.kv_heads:
        if spec.kv_heads % tp:
            raise ValueError(f"tp={tp} must divide the {spec.kv_heads} KV heads of {spec.name}")
        return spec.kv_heads // tp
    if tp % spec.kv_heads:
        raise ValueError(
            f"tp={tp} exceeds the {spec.kv_heads} KV heads of {spec.name}; it must then be a "
            f"multiple of {spec.kv_heads} so each KV head is replicated evenly"
        )
    return 1


def kv_cache_bytes(model: str | ModelSpec, batch: int, seq_len: int, dtype: str = "fp16") -> int:
    """Bytes of the KV cache: 2 (K and V) x layers x kv_heads x head_dim x batch x seq_len values.

    Grouped-query attention stores ``kv_heads``, not ``heads``: for the 70B models in fp16 that
    is 327,680 bytes per token instead of 2.6 MB.
    """
    spec = get_model(model)
    _positive_int("batch", batch)
    _positive_int("seq_len", seq_len)
    values = 2 * spec.layers * spec.kv_heads * spec.head_dim * batch * seq_len
    return _nbytes(values, dtype)


def hidden_state_bytes(batch: int, seq_len: int, hidden: int, dtype: str = "fp16") -> int:
    """Bytes of one hidden-state tensor (batch x seq_len x hidden): one layer's input.

    At 128k tokens x 8192 x 2 bytes that is about 2.1 GB, before any intermediate.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("hidden", hidden)):
        _positive_int(name, value)
    return _nbytes(batch * seq_len * hidden, dtype)


def activation_bytes(
    model: str | ModelSpec,
    batch: int,
    seq_len: int,
    dtype: str = "fp16",
    training: bool = False,
    tp: int = 1,
    sp: bool = False,
    flash_attention: bool = False,
    layers: int | None = None,
) -> int:
    """Activation bytes of a forward pass over ``seq_len`` tokens per sequence, on one TP rank.

    **Training** keeps every layer's activations for the backward pass. Per layer we use
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eqs. 2-5 (fp16/bf16 values, 1-byte dropout masks, no recomputation)::

        no parallelism:       s*b*h * (34 + 5*a*s/h)
        tensor parallel t:    s*b*h * (10 + 24/t + 5*a*s/(h*t))
        TP + sequence par.:   s*b*h * (34/t + 5*a*s/(h*t))

    The ``5*a*s/h`` term is the materialised attention scores, softmax output and its dropout
    mask; ``flash_attention=True`` drops it (the fused kernel recomputes scores in backward).
    The paper's layer is GPT-style (4h MLP, dropout, LayerNorm); for Llama shapes (SwiGLU,
    no dropout, GQA) it is an estimate of the right order, not an exact count. Other dtypes
    scale the formula by ``dtype_bytes(dtype) / 2``. Without TP, ``sp`` changes nothing.

    **Inference** keeps roughly one layer's working set at a time (the KV cache is counted
    separately): the residual stream and its normalised copy (``2*s*b*h``, or ``/t`` with
    sequence parallelism), plus the larger of the attention intermediates (Q, K, V, the
    attention output, and the ``a*s*s`` score matrix unless ``flash_attention``) and the MLP
    intermediates (gate, up, and their product: ``3*s*b*ffn``, times ``top_k`` for MoE),
    both split ``/t`` over TP ranks.

    ``layers`` (training only) is the number of layers whose activations a rank keeps;
    default all of them.
    """
    spec = get_model(model)
    for name, value in (("batch", batch), ("seq_len", seq_len), ("tp", tp)):
        _positive_int(name, value)
    s, b, h, a, t = seq_len, batch, spec.hidden, spec.heads, tp
    scale = dtype_bytes(dtype) / 2  # the formulas below are in bytes for 2-byte values
    sbh = s * b * h
    if training:
        scores = 0.0 if flash_attention else 5 * a * s / (h * t)
        if t > 1 and sp:
            per_layer = sbh * (34 / t + scores)
        else:
            per_layer = sbh * (10 + 24 / t + scores) if t > 1 else sbh * (34 + scores)
        n_layers = spec.layers if layers is None else _positive_int("layers", layers)
        return int(math.ceil(per_layer * scale * n_layers))
    # Inference: counted in elements, then converted (2 bytes each at scale 1).
    replicated = 2 * s * b * h / (t if sp else 1)
    qkv = s * b * (spec.heads + 2 * spec.kv_heads) * spec.head_dim
    attn = (qkv + sbh + (0 if flash_attention else b * a * s * s)) / t
    mlp = 3 * s * b * spec.ffn * spec.top_k / t
    return int(math.ceil((replicated + max(attn, mlp)) * 2 * scale))


# --------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------
# Mixed-precision Adam (Rajbhandari et al. 2020, ZeRO, section 3.1): fp16/bf16 weights and
# gradients (2 + 2 bytes) and fp32 master weights, momentum and variance (4 + 4 + 4 bytes).
ADAM_MIXED_PRECISION = {"weights": 2, "gradients": 2, "optimizer": 12}


def training_state_bytes(
    model: str | ModelSpec,
    weight_bytes_per_param: float = ADAM_MIXED_PRECISION["weights"],
    grad_bytes_per_param: float = ADAM_MIXED_PRECISION["gradients"],
    optimizer_bytes_per_param: float = ADAM_MIXED_PRECISION["optimizer"],
) -> int:
    """Bytes of weights + gradients + optimizer state for the whole model, before activations.

    Defaults are mixed-precision Adam: 2 + 2 + 12 = 16 bytes per parameter.
    """
    per_param = weight_bytes_per_param + grad_bytes_per_param + optimizer_bytes_per_param
    if per_param <= 0:
        raise ValueError("bytes per parameter must add up to a positive number")
    return int(math.ceil(parameter_count(model) * per_param))


# --------------------------------------------------------------------------------------------
# Per-GPU report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryReport:
    """Bytes on the most loaded GPU of a TP x PP x DP layout."""

    weights: int
    kv_cache: int
    activations: int
    gradients: int = 0
    optimizer: int = 0
    layout: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.gradients + self.optimizer

    def fits(self, capacity_bytes: float) -> bool:
        """True when the total fits in ``capacity_bytes`` (leave headroom for the runtime)."""
        return self.total <= capacity_bytes

    def as_gb(self) -> dict[str, float]:
        """The breakdown in GB (1e9 bytes), rounded to 0.01, for tables."""
        names = ("weights", "kv_cache", "activations", "gradients", "optimizer", "total")
        return {n: round(getattr(self, n) / 1e9, 2) for n in names}


def _stage_parameters(spec: ModelSpec, tp: int, pp: int) -> int:
    """Parameters on the most loaded GPU: layers split over ``pp`` stages (the first stages
    take the remainder), the embedding on the first stage and the final norm and LM head on
    the last; matrices split ``/tp`` (embedding and head vocab-parallel), norms and the MoE
    router replicated on every TP rank."""
    parts = layer_breakdown(spec)
    per_layer = (parts["attention"] + parts["mlp"]) / tp + parts["router"] + parts["norms"]
    layers_max = math.ceil(spec.layers / pp)
    layers_last = spec.layers // pp
    embed = spec.vocab * spec.hidden / tp
    head = 0 if spec.tied_embeddings else embed
    if pp == 1:
        return int(math.ceil(per_layer * spec.layers + embed + head + spec.hidden))
    first = per_layer * layers_max + embed
    last = per_layer * layers_last + head + spec.hidden
    if spec.tied_embeddings:  # the last stage keeps its own copy of the tied matrix
        last += embed
    return int(math.ceil(max(first, last)))


def memory_per_gpu(
    model: str | ModelSpec,
    *,
    dtype: str = "fp16",
    batch: int = 1,
    seq_len: int = 2048,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    workload: str = "inference",
    zero: int = 0,
    flash_attention: bool = False,
    sp: bool = False,
    grad_bytes_per_param: float = ADAM_MIXED_PRECISION["gradients"],
    optimizer_bytes_per_param: float = ADAM_MIXED_PRECISION["optimizer"],
) -> MemoryReport:
    """Memory on the most loaded GPU of a ``tp x pp x dp`` layout (each component is its
    maximum over pipeline stages: first stage for layers, KV cache and activations; first or
    last for weights, which hold the embedding and the LM head).

    ``batch`` is the number of sequences per model replica (per micro-batch in training) and
    ``seq_len`` their length (prompt plus generated tokens for inference).

    * inference: weights (sharded by TP and PP), KV cache for ``batch x seq_len`` tokens of the
      stage's layers (KV heads split by TP, replicated when TP exceeds them), one layer's
      activations.
    * training: weights in ``dtype``, gradients and optimizer state (default mixed-precision
      Adam: 2 + 12 bytes per parameter); ``zero`` = 1 shards the optimizer state over ``dp``,
      2 also the gradients, 3 also the weights (ZeRO stages). Activations follow
      :func:`activation_bytes`; with 1F1B the first stage keeps ``pp`` micro-batches of its
      ``layers/pp`` layers in flight, i.e. about all layers of one micro-batch. No KV cache.
    """
    spec = get_model(model)
    for name, value in (("batch", batch), ("seq_len", seq_len), ("tp", tp), ("pp", pp), ("dp", dp)):
        _positive_int(name, value)
    if workload not in ("inference", "training"):
        raise ValueError(f"workload must be 'inference' or 'training', got {workload!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be a ZeRO stage 0, 1, 2 or 3, got {zero!r}")
    if pp > spec.layers:
        raise ValueError(f"pp={pp} exceeds the {spec.layers} layers of {spec.name}; use pp <= {spec.layers}")
    kv_per_rank = kv_heads_per_rank(spec, tp)  # also validates tp against the head counts
    if spec.ffn % tp:
        raise ValueError(f"tp={tp} must divide the FFN size {spec.ffn} of {spec.name}")
    params = _stage_parameters(spec, tp, pp)
    stage_layers = math.ceil(spec.layers / pp)
    layout = {"model": spec.name, "tp": tp, "pp": pp, "dp": dp, "workload": workload,
              "dtype": dtype, "batch": batch, "seq_len": seq_len, "zero": zero}

    if workload == "inference":
        kv_values = 2 * stage_layers * kv_per_rank * spec.head_dim * batch * seq_len
        return MemoryReport(
            weights=_nbytes(params, dtype),
            kv_cache=_nbytes(kv_values, dtype),
            activations=activation_bytes(spec, batch, seq_len, dtype, training=False, tp=tp,
                                         sp=sp, flash_attention=flash_attention),
            layout=layout,
        )

    # ZeRO stage k shards the first k of (optimizer, gradients, weights) over the DP group.
    shard = lambda stage: dp if zero >= stage else 1  # noqa: E731
    # 1F1B: stage 0 holds min(pp, micro-batches) micro-batches x stage_layers; we assume at
    # least pp micro-batches, so pp * stage_layers layers' worth of one micro-batch.
    kept_layers = min(spec.layers, pp * stage_layers)
    return MemoryReport(
        weights=int(math.ceil(params * dtype_bytes(dtype) / shard(3))),
        kv_cache=0,
        activations=activation_bytes(spec, batch, seq_len, dtype, training=True, tp=tp, sp=sp,
                                     flash_attention=flash_attention, layers=kept_layers),
        gradients=int(math.ceil(params * grad_bytes_per_param / shard(2))),
        optimizer=int(math.ceil(params * optimizer_bytes_per_param / shard(1))),
        layout=layout,
    )
