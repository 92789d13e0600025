"""A 70B-shaped transformer layer at TP=1 and TP=2: shardlab against PyTorch DTensor, and the
roofline of every shape.

    python benchmarks/tp_layer.py            # 2 GPUs over NCCL, about 1.5 minutes
    python benchmarks/tp_layer.py --cpu      # mock devices, toy shapes: checks the code path

The layer is Llama-3-70B's (hidden 8192, 64 query heads, 8 KV heads of 128, SwiGLU FFN
28672, RMSNorm, RoPE, bf16) with the QKV and the gate/up projections fused, so a layer is
four matrix products. It runs

* decode: one new token for a batch of 1, 8, 32, 64 sequences with a KV cache of 1024
  positions (attention over 1025), and
* prefill: one prompt of 512, 2048, 4096, 8192 tokens (causal attention),

as these variants, every one checked against the one-GPU layer on fresh random input:

=================  ====  ==============================================================
tp1                1     the plain layer (``nn.Linear``), eager
tp1-graph          1     the same, captured in a CUDA graph (decode)
shardlab           2     `shardlab.tensor_parallel` Column/RowParallelLinear.from_linear
shardlab-graph     2     the same, the whole forward with both NCCL all-reduces in one
                         CUDA graph (decode)
shardlab-overlap   2     row-parallel products cut into token chunks; each chunk's
                         all-reduce (shardlab.comm, side stream) overlaps the next chunk's
                         product (prefill)
dtensor            2     ``parallelize_module`` with ColwiseParallel / RowwiseParallel
dtensor-graph      2     the same in a CUDA graph (decode; its own phase, last)
=================  ====  ==============================================================

The fused weights are laid out rank-major ([q_0 k_0 v_0 | q_1 k_1 v_1], [gate_0 up_0 |
gate_1 up_1]) so that the contract's contiguous column split, and DTensor's Shard(0), hand
each rank its own heads' Q, K, V and its own slice of gate and up.

Roofline per shape and rank: weight + KV-cache bytes over the bandwidth of a measured
device-to-device copy, FLOPs over the measured rate of an 8192^3 bf16 matrix product
(`shardlab.cost.roofline_time` with those two ceilings), plus at TP=2 the two all-reduces
of the layer, timed here at their exact sizes. Times are CUDA events around back-to-back
calls (graphs: replays), the median of repeats, the variants interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()


@dataclasses.dataclass(frozen=True)
class LayerShape:
    hidden: int = 8192
    heads: int = 64
    kv_heads: int = 8
    ffn: int = 28672
    eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


GPU_CONFIG = dict(shape=dataclasses.asdict(LayerShape()), dtype="bf16", context=1024,
                  decode_batches=[1, 8, 32, 64], prefill_tokens=[512, 2048, 4096, 8192],
                  graph_layers=4, decode_iters=10, prefill_iters=2, repeats=5, warmup=2,
                  overlap_chunks=4, overlap_min_rows=512, copy_bytes=2**30, matmul_n=8192,
                  check_tolerance=3e-2, seed=0)
# Toy shape for mock devices: still grouped-query attention (16 query heads on 8 KV heads),
# so that TP up to 8 splits the KV heads as it does on the real 70B layer.
CPU_CONFIG = dict(GPU_CONFIG, shape=dataclasses.asdict(LayerShape(512, 16, 8, 512)), context=16,
                  decode_batches=[1, 4], prefill_tokens=[16, 32], graph_layers=2,
                  decode_iters=2, prefill_iters=1, repeats=2, warmup=1, overlap_min_rows=8,
                  copy_bytes=2**22, matmul_n=256)
PHASES = {"ceilings": 90, "decode": 150, "prefill": 150, "decode-dtensor-graph": 90}


# --------------------------------------------------------------------------- the layer

def _nn():
    import torch
    import torch.nn.functional as F
    from torch import nn

    return torch, F, nn


def rope_tables(positions, head_dim: int, theta: float, dtype):
    """cos and sin of rotary embeddings, shaped (tokens, 1, head_dim) for (b, t, heads, d)."""
    torch, _, _ = _nn()
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    f = positions.float()[:, None] * inv[None]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x, cos, sin):
    torch, _, _ = _nn()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_layer_class():
    """The decoder layer (defined in a function so that torch is imported on the ranks only)."""
    torch, F, nn = _nn()

    class DecoderLayer(nn.Module):
        """Pre-norm Llama layer with fused QKV and gate/up. The forward pass reads the number
        of heads on this rank from the projections' output widths, so the very same code
        runs the full layer and any rank's shard of it."""

        def __init__(self, shape: LayerShape, device=None, dtype=None):
            super().__init__()
            h, hd = shape.hidden, shape.head_dim
            kw = dict(bias=False, device=device, dtype=dtype)
            self.shape = shape
            self.attn_norm = nn.Parameter(torch.ones(h, device=device, dtype=dtype))
            self.mlp_norm = nn.Parameter(torch.ones(h, device=device, dtype=dtype))
            self.qkv = nn.Linear(h, (shape.heads + 2 * shape.kv_heads) * hd, **kw)
            self.o = nn.Linear(shape.heads * hd, h, **kw)
            self.gate_up = nn.Linear(h, 2 * shape.ffn, **kw)
            self.down = nn.Linear(shape.ffn, h, **kw)

        def forward(self, x_BTH, cos, sin, cache=None, pos: int = 0):
            b, t, h = x_BTH.shape
            s = self.shape
            hd, group = s.head_dim, s.group
            a = F.rms_norm(x_BTH, (h,), self.attn_norm, s.eps)
            qkv = self.qkv(a)
            kv = qkv.shape[-1] // ((group + 2) * hd)  # KV heads on this rank
            nq = group * kv
            q, k, v = qkv.view(b, t, nq + 2 * kv, hd).split([nq, kv, kv], dim=2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is None:  # prefill: causal attention within the prompt
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                if group > 1:
                    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                o = o.transpose(1, 2).reshape(b, t, nq * hd)
            else:  # decode (t == 1): store this token's K, V at `pos`, attend over 0..pos
                k_cache, v_cache = cache  # (b, kv, positions, hd)
                k_cache[:, :, pos] = k[:, 0]
                v_cache[:, :, pos] = v[:, 0]
                # GQA without copying K/V: a KV head's `group` query heads act as its queries.
                qg = q.reshape(b, kv, group, hd)
                o = F.scaled_dot_product_attention(qg, k_cache[:, :, :pos + 1],
                                                   v_cache[:, :, :pos + 1])
                o = o.reshape(b, 1, nq * hd)
            x = x_BTH + self.o(o)
            m = F.rms_norm(x, (h,), self.mlp_norm, s.eps)
            g, u = self.gate_up(m).chunk(2, dim=-1)
            return x + self.down(F.silu(g) * u)

    return DecoderLayer


def make_overlap_class():
    torch, F, nn = _nn()
    from shardlab import comm

    class OverlappedRowParallel(nn.Module):
        """A row-parallel product whose all-reduce hides behind its own matmul.

        The tokens are cut into `chunks`; chunk i's partial sums are all-reduced through
        shardlab.comm on a side stream while chunk i+1 is multiplied on the main stream, so
        only the last chunk's all-reduce is exposed. Below `min_rows` rows per chunk it
        falls back to one product and one all-reduce (small products lose efficiency).
        """

        def __init__(self, row, chunks: int, min_rows: int):
            super().__init__()
            self.weight, self.group = row.weight, row.group
            self.chunks, self.min_rows = chunks, min_rows
            self.stream = torch.cuda.Stream(device=row.weight.device) if row.weight.is_cuda else None

        def forward(self, x):
            lead, rows = x.shape[:-1], x[..., 0].numel()
            x2 = x.reshape(rows, x.shape[-1])
            out = torch.empty(rows, self.weight.shape[0], dtype=x.dtype, device=x.device)
            n = max(1, min(self.chunks, rows // self.min_rows))
            cur = torch.cuda.current_stream() if self.stream is not None else None
            for xc, oc in zip(x2.chunk(n), out.chunk(n)):
                torch.matmul(xc, self.weight.t(), out=oc)
                if cur is None:
                    comm.all_reduce(oc, group=self.group)
                    continue
                self.stream.wait_stream(cur)
                with torch.cuda.stream(self.stream):
                    comm.all_reduce(oc, group=self.group)
            if cur is not None:
                cur.wait_stream(self.stream)
            return out.view(*lead, -1)

    return OverlappedRowParallel


def interleave_rows(weight, parts: list[int], degree: int):
    """Rows [A; B; C] (heights `parts`) -> [A_0 B_0 C_0 | A_1 B_1 C_1 | ...]: a contiguous
    1/degree split of the result gives rank r the r-th slice of every part."""
    torch, _, _ = _nn()
    pieces = [blk.chunk(degree, 0) for blk in weight.split(parts, 0)]
    return torch.cat([pieces[i][r] for r in range(degree) for i in range(len(parts))], 0)


def _staged(linear, parts: list[int] | None, degree: int):
    """A copy of `linear` (rank-major rows if `parts`), to be sharded."""
    _, _, nn = _nn()
    w = linear.weight.detach()
    out = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    out.weight = nn.Parameter(interleave_rows(w, parts, degree) if parts else w.clone())
    return out


def build_reference(shape: LayerShape, device, dtype, seed: int):
    """The one-GPU layer, identical on every rank (seeded, then broadcast from rank 0)."""
    torch, _, nn = _nn()
    import torch.distributed as dist

    torch.manual_seed(seed)
    layer = make_layer_class()(shape, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                nn.init.normal_(p, std=p.shape[1] ** -0.5)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(p.data, src=0)
    return layer.eval()


def _parts(shape: LayerShape):
    hd = shape.head_dim
    return [shape.heads * hd, shape.kv_heads * hd, shape.kv_heads * hd], [shape.ffn, shape.ffn]


def _shell(ref):
    """A layer on the meta device carrying copies of `ref`'s norms: sub-modules come next."""
    torch, _, nn = _nn()
    layer = make_layer_class()(ref.shape, device="meta")
    layer.attn_norm = nn.Parameter(ref.attn_norm.detach().clone())
    layer.mlp_norm = nn.Parameter(ref.mlp_norm.detach().clone())
    return layer


def build_shardlab(ref, degree: int, overlap: tuple[int, int] | None = None):
    """The layer on this rank through shardlab's contract: Column/RowParallelLinear.from_linear."""
    from shardlab.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    qkv_parts, gu_parts = _parts(ref.shape)
    layer = _shell(ref)
    layer.qkv = ColumnParallelLinear.from_linear(_staged(ref.qkv, qkv_parts, degree), gather_output=False)
    layer.o = RowParallelLinear.from_linear(ref.o, input_is_parallel=True)
    layer.gate_up = ColumnParallelLinear.from_linear(_staged(ref.gate_up, gu_parts, degree),
                                                     gather_output=False)
    layer.down = RowParallelLinear.from_linear(ref.down, input_is_parallel=True)
    if overlap:
        chunks, min_rows = overlap
        cls = make_overlap_class()
        layer.o, layer.down = cls(layer.o, chunks, min_rows), cls(layer.down, chunks, min_rows)
    return layer.eval()


def build_dtensor(ref, degree: int, device_type: str):
    """The layer on this rank through PyTorch's own TP: parallelize_module on a device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    qkv_parts, gu_parts = _parts(ref.shape)
    layer = _shell(ref)
    layer.qkv = _staged(ref.qkv, qkv_parts, degree)
    layer.o = _staged(ref.o, None, degree)
    layer.gate_up = _staged(ref.gate_up, gu_parts, degree)
    layer.down = _staged(ref.down, None, degree)
    mesh = init_device_mesh(device_type, (degree,))
    parallelize_module(layer, mesh, {"qkv": ColwiseParallel(), "o": RowwiseParallel(),
                                     "gate_up": ColwiseParallel(), "down": RowwiseParallel()})
    return layer.eval()


# --------------------------------------------------------------------------- rank side

def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")


def _barrier(dev) -> None:
    import torch
    import torch.distributed as dist

    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    prov.synchronize(dev)


def _rel_err(y, ref, x) -> float:
    """Error of the layer's update (output minus the residual input), relative to its norm."""
    import torch

    d, dr = (y.float() - x.float()), (ref.float() - x.float())
    if not torch.isfinite(d).all():
        return float("inf")
    return float((d - dr).norm() / dr.norm())


def _capture(fn, dev):
    """A CUDA graph of `fn()`: warm-up on a side stream, then capture (thread-local mode, so
    that NCCL's watchdog thread may query its events meanwhile). Returns (graph, output)."""
    import torch

    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def _interleaved(variants: dict, iters: int, repeats: int, warmup: int, dev) -> dict:
    """Time every variant's call `iters` times per repeat, variants round-robin."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {name: [] for name in variants}
    for rep in range(repeats):
        names = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in names:
            _barrier(dev)
            times[name].append(prov.time_calls(variants[name], iters, dev)[0])
    return times


def _ceilings(cfg: dict, dev) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate of this GPU,
    and the time of an all-reduce at every message size the layer sends."""
    import torch

    from shardlab import comm

    dtype = torch.bfloat16
    n = cfg["copy_bytes"] // 2
    x, y = torch.randn(n, device=dev, dtype=dtype), torch.empty(n, device=dev, dtype=dtype)
    copy_t = [prov.time_calls(lambda: y.copy_(x), 10, dev)[0] for _ in range(cfg["repeats"])]
    del x, y
    m = cfg["matmul_n"]
    a = torch.randn(m, m, device=dev, dtype=dtype)
    b = torch.randn(m, m, device=dev, dtype=dtype)
    c = torch.empty(m, m, device=dev, dtype=dtype)
    torch.mm(a, b, out=c)
    mm_t = [prov.time_calls(lambda: torch.mm(a, b, out=c), 10, dev)[0] for _ in range(cfg["repeats"])]
    del a, b, c
    hidden = cfg["shape"]["hidden"]
    sizes = sorted({b * hidden * 2 for b in cfg["decode_batches"]}
                   | {t * hidden * 2 for t in cfg["prefill_tokens"]})
    ar = []
    for nbytes in sizes:
        buf = torch.randn(nbytes // 2, device=dev, dtype=dtype)
        iters = 50 if nbytes < 2**22 else 10
        for _ in range(3):
            comm.all_reduce(buf)
        reps = []
        for _ in range(cfg["repeats"]):
            buf.normal_()
            _barrier(dev)
            reps.append(prov.time_calls(lambda: comm.all_reduce(buf), iters, dev)[0])
        ar.append({"bytes": nbytes, "repeats_s": reps})
        del buf
    return {"copy_repeats_s": copy_t, "copy_bytes": 2 * n * 2,
            "matmul_repeats_s": mm_t, "matmul_flops": 2 * m ** 3, "allreduce": ar}


def rank_phase(phase: str, cfg: dict) -> dict:
    """One phase on every rank: 'ceilings', 'decode', 'prefill' or 'decode-dtensor-graph'."""
    import torch

    import shardlab

    _quiet()
    dev, p = shardlab.device(), shardlab.world_size()
    if phase == "ceilings":
        return _ceilings(cfg, dev)
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["dtype"]]
    shape = LayerShape(**cfg["shape"])
    rank = shardlab.rank()
    out = {"checks": [], "measurements": [], "skipped": []}
    torch.manual_seed(cfg["seed"] + 1000 * (1 + rank))  # inputs: fresh per rank, then shared
    with torch.no_grad():
        ref = build_reference(shape, dev, dtype, cfg["seed"])
        layers = {"tp1": ref}
        if phase in ("decode", "prefill"):
            layers["shardlab"] = build_shardlab(ref, p)
        if phase == "prefill":
            layers["shardlab-overlap"] = build_shardlab(
                ref, p, (cfg["overlap_chunks"], cfg["overlap_min_rows"]))
        layers["dtensor"] = build_dtensor(ref, p, dev.type)
        if phase == "prefill":
            _prefill(cfg, shape, layers, dev, dtype, p, out)
        else:
            _decode(cfg, shape, layers, dev, dtype, p, out, phase, cuda)
    return out


def _shared_randn(*size, dev, dtype):
    """Random input identical on every rank (drawn on rank 0, broadcast): TP needs the
    replicated activations to be the same."""
    import torch
    import torch.distributed as dist

    # Drawn by the CPU generator: a failed CUDA-graph capture can leave the CUDA generator
    # in capture mode, and every later torch.randn on the GPU would then raise.
    x = torch.randn(*size, dtype=torch.float32).to(device=dev, dtype=dtype)
    dist.broadcast(x, src=0)
    return x


def _tp_of(name: str, p: int) -> int:
    return 1 if name.startswith("tp1") else p


def _decode(cfg, shape, layers, dev, dtype, p, out, phase, cuda):
    import torch

    import shardlab

    rank = shardlab.rank()
    cos, sin = rope_tables(torch.tensor([cfg["context"]], device=dev), shape.head_dim,
                           shape.rope_theta, dtype)
    if not cuda:
        out["skipped"].append({"phase": phase, "variants": ["tp1-graph", "shardlab-graph"]
                               if phase == "decode" else ["dtensor-graph"],
                               "why": "CUDA graphs need a GPU"})
    for b in cfg["decode_batches"]:
        try:
            _decode_batch(cfg, shape, layers, dev, dtype, p, out, phase, cuda, b, cos, sin)
        except Exception as e:  # noqa: BLE001 - keep the other batches' numbers
            msg = f"{type(e).__name__}: {e}"[:2000]
            out["checks"].append({"phase": phase, "batch": b, "error": msg, "ok": False})
            print(f"[tp_layer] rank {rank} {phase} batch {b} failed: {msg}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.empty_cache()


def _decode_batch(cfg, shape, layers, dev, dtype, p, out, phase, cuda, b, cos, sin):
    import torch

    import shardlab

    rank, ctx, hd, kvh = shardlab.rank(), cfg["context"], shape.head_dim, shape.kv_heads
    pos, n_layers = ctx, cfg["graph_layers"]
    # The cache holds `ctx` earlier positions and this token's slot; TP ranks hold their
    # own KV heads' slice of the same cache.
    k_full = _shared_randn(b, kvh, ctx + 1, hd, dev=dev, dtype=dtype)
    v_full = _shared_randn(b, kvh, ctx + 1, hd, dev=dev, dtype=dtype)
    local = slice(rank * kvh // p, (rank + 1) * kvh // p)
    caches = {1: (k_full, v_full), p: (k_full[:, local].clone(), v_full[:, local].clone())}
    x = _shared_randn(b, 1, shape.hidden, dev=dev, dtype=dtype)

    def chain(layer, cache, x_in=x):
        y = x_in
        for _ in range(n_layers):
            y = layer(y, cos, sin, cache, pos)
        return y

    variants, names = {}, []
    if phase == "decode":
        names = ["tp1", "shardlab", "dtensor"] + (["tp1-graph", "shardlab-graph"] if cuda else [])
    elif cuda:
        names = ["dtensor-graph"]
    ref_y = chain(layers["tp1"], caches[1])
    for name in names:
        base = name.removesuffix("-graph")
        layer, cache = layers[base], caches[_tp_of(name, p)]
        try:
            if name.endswith("-graph"):
                static_x = x.clone()
                graph, y_static = _capture(lambda l=layer, c=cache, s=static_x: chain(l, c, s), dev)
                fresh = _shared_randn(b, 1, shape.hidden, dev=dev, dtype=dtype)
                static_x.copy_(fresh)
                y_static.fill_(float("nan"))  # poison: the replay must rewrite it
                graph.replay()
                err = _rel_err(y_static, chain(layers["tp1"], caches[1], fresh), fresh)
                static_x.copy_(x)
                variants[name] = graph.replay
            else:
                err = _rel_err(chain(layer, cache), ref_y, x)
                variants[name] = (lambda l=layer, c=cache: chain(l, c))
            out["checks"].append({"phase": "decode", "batch": b, "variant": name, "rel_err": err,
                                  "ok": err <= cfg["check_tolerance"]})
        except Exception as e:  # noqa: BLE001 - report it and time the others
            msg = f"{type(e).__name__}: {e}"[:2000]
            out["checks"].append({"phase": "decode", "batch": b, "variant": name,
                                  "error": msg, "ok": False})
            print(f"[tp_layer] rank {rank} decode b={b} {name} failed: {msg}",
                  file=sys.stderr, flush=True)
    times = _interleaved(variants, cfg["decode_iters"], cfg["repeats"], cfg["warmup"], dev)
    for name, reps in times.items():
        out["measurements"].append({
            "phase": "decode", "batch": b, "tokens": 1, "context": ctx, "variant": name,
            "tp": _tp_of(name, p), "layers_per_call": n_layers,
            "repeats_s": [t / n_layers for t in reps]})
    del variants, caches, k_full, v_full


def _prefill(cfg, shape, layers, dev, dtype, p, out):
    import torch

    for t in cfg["prefill_tokens"]:
        cos, sin = rope_tables(torch.arange(t, device=dev), shape.head_dim, shape.rope_theta, dtype)
        x = _shared_randn(1, t, shape.hidden, dev=dev, dtype=dtype)
        ref_y = layers["tp1"](x, cos, sin)
        variants = {}
        for name, layer in layers.items():
            try:
                y = ref_y if name == "tp1" else layer(x, cos, sin)
                err = 0.0 if name == "tp1" else _rel_err(y, ref_y, x)
                out["checks"].append({"phase": "prefill", "tokens": t, "variant": name,
                                      "rel_err": err, "ok": err <= cfg["check_tolerance"]})
                variants[name] = (lambda l=layer: l(x, cos, sin))
            except Exception as e:  # noqa: BLE001
                out["checks"].append({"phase": "prefill", "tokens": t, "variant": name,
                                      "error": f"{type(e).__name__}: {e}"[:2000], "ok": False})
        del ref_y
        times = _interleaved(variants, cfg["prefill_iters"], cfg["repeats"], cfg["warmup"], dev)
        for name, reps in times.items():
            out["measurements"].append({"phase": "prefill", "batch": 1, "tokens": t, "context": 0,
                                        "variant": name, "tp": _tp_of(name, p),
                                        "layers_per_call": 1, "repeats_s": reps})
        del variants, x
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- driver

def _merge_measurements(per_rank: list[list[dict]]) -> list[dict]:
    merged = []
    for records in zip(*per_rank):
        rec = {k: v for k, v in records[0].items() if k != "repeats_s"}
        reps = [max(r["repeats_s"][i] for r in records) for i in range(len(records[0]["repeats_s"]))]
        rec.update(repeats_s=reps, seconds=prov.median(reps), spread=prov.spread(reps))
        merged.append(rec)
    return merged


def _merge_checks(per_rank: list[list[dict]]) -> list[dict]:
    merged = []
    for records in zip(*per_rank):
        rec = dict(records[0])
        errs = [r.get("rel_err") for r in records]
        rec["rel_err"] = None if None in errs else max(errs)
        rec["ok"] = all(r.get("ok") for r in records)
        errors = [r["error"] for r in records if r.get("error")]
        if errors:
            rec["error"] = errors[0]
        merged.append(rec)
    return merged


def add_roofline(doc: dict) -> None:
    """Predicted time of every measured shape at TP=1 and TP=p with the measured ceilings."""
    from shardlab import cost
    from shardlab.hardware import GPUSpec
    from shardlab.memory import ModelSpec

    res, cfg = doc["results"], doc["config"]
    ceil = res.get("ceilings")
    if not ceil:
        return
    s = cfg["shape"]
    spec = ModelSpec("layer", layers=1, hidden=s["hidden"], heads=s["heads"],
                     kv_heads=s["kv_heads"], ffn=s["ffn"], vocab=1)
    gpu = GPUSpec(doc["provenance"].get("gpu") or "mock", 0.0, ceil["hbm_bandwidth"],
                  ceil["bf16_peak"], "nvlink-h100")
    ar = {a["bytes"]: a["seconds"] for a in res.get("allreduce", [])}
    p = cfg["world_size"]
    shapes = sorted({(m["phase"], m["batch"], m["tokens"], m["context"]) for m in res["measurements"]})
    res["roofline"] = []
    for phase, batch, tokens, context in shapes:
        for tp in sorted({1, p}):
            c = cost.roofline_time(spec, gpu, batch=batch, new_tokens=tokens, context_len=context,
                                   dtype=cfg["dtype"], tp=tp, per_layer=True)
            nbytes = batch * tokens * s["hidden"] * 2
            comm_s = 2 * ar[nbytes] if tp > 1 and nbytes in ar else 0.0
            res["roofline"].append({"phase": phase, "batch": batch, "tokens": tokens, "tp": tp,
                                    "flops": c.flops, "bytes": c.bytes, "compute_s": c.compute_time,
                                    "memory_s": c.memory_time, "allreduce_s": comm_s,
                                    "bound": c.bound, "time_s": c.time + comm_s})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_common_arguments(parser)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--decode-batches", default=None, help="e.g. 1,8,32,64")
    parser.add_argument("--prefill-tokens", default=None, help="e.g. 512,2048,4096,8192")
    parser.add_argument("--context", type=int, default=None, help="KV-cache length for decode")
    parser.add_argument("--overlap-chunks", type=int, default=None, help="chunks of shardlab-overlap")
    args = parser.parse_args(argv)

    cfg = dict(CPU_CONFIG if args.cpu else GPU_CONFIG)
    if args.decode_batches:
        cfg["decode_batches"] = [int(v) for v in args.decode_batches.split(",")]
    if args.prefill_tokens:
        cfg["prefill_tokens"] = [int(v) for v in args.prefill_tokens.split(",")]
    if args.context:
        cfg["context"] = args.context
    if args.overlap_chunks:
        cfg["overlap_chunks"] = args.overlap_chunks
    phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    if any(ph not in PHASES for ph in phases):
        parser.error(f"unknown phase in {phases}; choose from {', '.join(PHASES)}")
    cfg["world_size"] = args.world_size
    shape = LayerShape(**cfg["shape"])
    for what, n in (("KV heads", shape.kv_heads), ("query heads", shape.heads),
                    ("FFN width", shape.ffn)):
        if n % args.world_size:
            parser.error(f"TP={args.world_size} does not divide the layer's {n} {what}: "
                         f"use a --world-size that divides {shape.kv_heads}")
    out = args.out or prov.default_out("tp_layer", args.cpu)

    backend = prov.backend_for(args.cpu, args.world_size)
    from shardlab import Cluster
    from shardlab.results import format_tp_layer, summarize_tp_layer

    t_start = time.perf_counter()
    doc = prov.envelope("tp_layer", prov.capture(backend, args.world_size), cfg)
    res = doc["results"] = {"ceilings": {}, "allreduce": [], "checks": [], "measurements": [],
                            "roofline": [], "skipped": []}
    with Cluster(args.world_size, backend, timeout=300) as cluster:
        doc["provenance"]["devices"] = cluster.devices
        for phase in phases:
            t0 = time.perf_counter()
            try:
                per_rank = cluster.run(rank_phase, phase, cfg, timeout=PHASES[phase])
                if phase == "ceilings":
                    mm = [prov.median(r["matmul_repeats_s"]) for r in per_rank]
                    copy = [prov.median(r["copy_repeats_s"]) for r in per_rank]
                    bw = [per_rank[0]["copy_bytes"] / t for t in copy]
                    flops = [per_rank[0]["matmul_flops"] / t for t in mm]
                    # The slowest GPU bounds a TP layer: take the smaller ceiling.
                    res["ceilings"] = {"copy_bytes_per_s": bw, "matmul_flops_per_s": flops,
                                       "hbm_bandwidth": min(bw), "bf16_peak": min(flops),
                                       "copy_bytes": per_rank[0]["copy_bytes"],
                                       "matmul_n": cfg["matmul_n"]}
                    res["allreduce"] = []
                    for recs in zip(*[r["allreduce"] for r in per_rank]):
                        reps = [max(r["repeats_s"][i] for r in recs) for i in range(len(recs[0]["repeats_s"]))]
                        res["allreduce"].append({"bytes": recs[0]["bytes"], "seconds": prov.median(reps),
                                                 "repeats_s": reps})
                else:
                    res["checks"] += _merge_checks([r["checks"] for r in per_rank])
                    res["measurements"] += _merge_measurements([r["measurements"] for r in per_rank])
                    res["skipped"] += per_rank[0]["skipped"]
            except Exception as e:  # noqa: BLE001 - keep the other phases' numbers
                doc["errors"].append({"phase": phase, "error": f"{type(e).__name__}: {e}"[-4000:]})
                print(f"[tp_layer] {phase} failed: {type(e).__name__}: {str(e)[-1500:]}",
                      file=sys.stderr, flush=True)
            print(f"[tp_layer] {phase}: {time.perf_counter() - t0:.1f} s", flush=True)
            prov.write(out, doc)
    bad = [c for c in res["checks"] if not c["ok"]]
    for c in bad:
        print(f"[tp_layer] check failed: {c}", file=sys.stderr)
    add_roofline(doc)
    doc["config"]["seconds"] = time.perf_counter() - t_start
    try:
        doc["summary"] = summarize_tp_layer(doc)
        doc["summary"]["checks_ok"] = not bad
    except Exception as e:  # noqa: BLE001
        doc["errors"].append({"phase": "summary", "error": f"{type(e).__name__}: {e}"})
    doc["complete"] = not doc["errors"]
    prov.write(out, doc)
    if doc["summary"]:
        print(format_tp_layer(doc))
    print(f"[tp_layer] wrote {out} in {doc['config']['seconds']:.0f} s"
          + ("" if doc["complete"] else f" with {len(doc['errors'])} errors"))
    return 0 if doc["complete"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
