"""Hiding the tensor-parallel all-reduce behind computation: the 70B MLP at prefill, TP=2.

    python benchmarks/overlap.py             # 2 GPUs over NCCL, about 30 seconds
    python benchmarks/overlap.py --cpu       # mock devices, toy shapes: checks the code path

Each rank holds its shard of Llama-3-70B's SwiGLU MLP (hidden 8192, FFN 28672; gate/up
column-parallel and fused, down row-parallel) and runs a prompt of 4096 or 8192 tokens.
The row-parallel product leaves partial sums that one all-reduce adds up. Variants:

=================  ===========================================================================
compute_only       the MLP alone (no all-reduce): what overlap could at best shrink the time to
allreduce_only     the all-reduce alone, of the full (tokens x hidden) output
sequential         MLP, then the all-reduce (what a plain RowParallelLinear does)
chunked x n        tokens cut into n chunks, each MLP then its all-reduce, no overlap: the
                   cost of chunking alone
async_op x n       each chunk's all-reduce issued with ``async_op=True`` (NCCL's own stream)
                   while the next chunk computes; wait for all at the end
side_stream x n    the same through ``shardlab.comm.all_reduce`` on a side CUDA stream
=================  ===========================================================================

Only the last chunk's all-reduce stays exposed, so the gain is at most the all-reduce time
minus 1/n of it; NCCL's kernels also take SMs from the concurrent matrix products, which is
why the measured gain is smaller. Every variant is checked against the sequential output
and a float32 reference on fresh random input; times are CUDA events around back-to-back
calls, median of repeats, variants interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()

GPU_CONFIG = dict(hidden=8192, ffn=28672, tokens=[4096, 8192], chunks=[2, 4, 8], dtype="bf16",
                  iters=3, repeats=5, warmup=2, check_tolerance=2e-2, seed=0)
CPU_CONFIG = dict(GPU_CONFIG, hidden=256, ffn=512, tokens=[64, 128], chunks=[2, 4], iters=2,
                  repeats=2, warmup=1)


def _barrier(dev) -> None:
    import torch
    import torch.distributed as dist

    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    prov.synchronize(dev)


def rank_overlap(cfg: dict) -> dict:
    """Check, then time, every variant at every token count. Runs on every rank."""
    import warnings

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import shardlab
    from shardlab import comm

    warnings.filterwarnings("ignore", category=FutureWarning)
    dev, p, r = shardlab.device(), shardlab.world_size(), shardlab.rank()
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["dtype"]]
    h, f = cfg["hidden"], cfg["ffn"] // p
    torch.manual_seed(cfg["seed"] + r)  # each rank its own shard of a random MLP
    w_gu = (torch.randn(2 * f, h, device=dev) * h ** -0.5).to(dtype)  # [gate_r; up_r]
    w_down = (torch.randn(h, f, device=dev) * (p * f) ** -0.5).to(dtype)
    side = torch.cuda.Stream(device=dev) if cuda else None

    def mlp(xc, oc):
        g, u = (xc @ w_gu.t()).chunk(2, dim=-1)
        torch.matmul(F.silu(g) * u, w_down.t(), out=oc)

    def make_variants(x, out):
        def compute_only():
            mlp(x, out)

        def allreduce_only():
            comm.all_reduce(out)

        def sequential():
            mlp(x, out)
            comm.all_reduce(out)

        def chunked(n):
            for xc, oc in zip(x.chunk(n), out.chunk(n)):
                mlp(xc, oc)
                comm.all_reduce(oc)

        def async_op(n):
            works = []
            for xc, oc in zip(x.chunk(n), out.chunk(n)):
                mlp(xc, oc)
                works.append(dist.all_reduce(oc, async_op=True))
            for w in works:
                w.wait()

        def side_stream(n):
            cur = torch.cuda.current_stream()
            for xc, oc in zip(x.chunk(n), out.chunk(n)):
                mlp(xc, oc)
                side.wait_stream(cur)  # the chunk's partial sums are ready
                with torch.cuda.stream(side):
                    comm.all_reduce(oc)
            cur.wait_stream(side)

        v = {("compute_only", 1): compute_only, ("allreduce_only", 1): allreduce_only,
             ("sequential", 1): sequential}
        for n in cfg["chunks"]:
            v[("chunked", n)] = (lambda n=n: chunked(n))
            v[("async_op", n)] = (lambda n=n: async_op(n))
            if cuda:
                v[("side_stream", n)] = (lambda n=n: side_stream(n))
        return v

    result = {"checks": [], "measurements": [],
              "skipped": [] if cuda else [{"variant": "side_stream", "why": "needs CUDA streams"}]}
    for tokens in cfg["tokens"]:
        x = torch.randn(tokens, h, device=dev, dtype=torch.float32).to(dtype)
        dist.broadcast(x, src=0)  # the MLP's input is replicated over the TP group
        out = torch.empty(tokens, h, device=dev, dtype=dtype)
        variants = make_variants(x, out)
        # Correctness: a float32 reference (every rank's partial sums, all-reduced).
        ref = None
        if tokens == cfg["tokens"][0]:
            g, u = (x.float() @ w_gu.float().t()).chunk(2, dim=-1)
            ref = (F.silu(g) * u) @ w_down.float().t()
            dist.all_reduce(ref)
        expected = None
        for key, fn in variants.items():
            if key[0] in ("compute_only", "allreduce_only"):
                continue
            out.fill_(float("nan"))
            fn()
            prov.synchronize(dev)
            y = out.float()
            if expected is None:
                expected = y.clone()
            finite = bool(torch.isfinite(y).all())
            err = float((y - expected).norm() / expected.norm()) if finite else float("inf")
            check = {"tokens": tokens, "variant": key[0], "chunks": key[1], "vs_sequential": err}
            if ref is not None:
                check["vs_float32"] = float((y - ref).norm() / ref.norm()) if finite else float("inf")
            check["ok"] = err <= cfg["check_tolerance"] and check.get("vs_float32", 0) <= cfg["check_tolerance"]
            result["checks"].append(check)
        del ref, expected
        out.normal_()
        for fn in variants.values():
            for _ in range(cfg["warmup"]):
                fn()
        times = {key: [] for key in variants}
        for rep in range(cfg["repeats"]):
            keys = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for key in keys:
                _barrier(dev)
                times[key].append(prov.time_calls(variants[key], cfg["iters"], dev)[0])
        for (name, n), reps in times.items():
            result["measurements"].append({"tokens": tokens, "variant": name, "chunks": n,
                                           "repeats_s": reps})
        del x, out, variants
        if cuda:
            torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_common_arguments(parser)
    parser.add_argument("--tokens", default=None, help="prompt lengths, e.g. 4096,8192")
    parser.add_argument("--chunks", default=None, help="chunk counts, e.g. 2,4,8")
    args = parser.parse_args(argv)

    cfg = dict(CPU_CONFIG if args.cpu else GPU_CONFIG)
    if args.tokens:
        cfg["tokens"] = [int(v) for v in args.tokens.split(",")]
    if args.chunks:
        cfg["chunks"] = [int(v) for v in args.chunks.split(",")]
    cfg["world_size"] = args.world_size
    out = args.out or prov.default_out("overlap", args.cpu)

    backend = prov.backend_for(args.cpu, args.world_size)
    from shardlab import Cluster
    from shardlab.results import format_overlap, summarize_overlap

    t_start = time.perf_counter()
    doc = prov.envelope("overlap", prov.capture(backend, args.world_size), cfg)
    res = doc["results"] = {"checks": [], "measurements": [], "skipped": []}
    with Cluster(args.world_size, backend, timeout=300) as cluster:
        doc["provenance"]["devices"] = cluster.devices
        try:
            per_rank = cluster.run(rank_overlap, cfg, timeout=240)
            for recs in zip(*[pr["checks"] for pr in per_rank]):
                c = dict(recs[0])
                for k in ("vs_sequential", "vs_float32"):
                    if k in c:
                        c[k] = max(rc[k] for rc in recs)
                c["ok"] = all(rc["ok"] for rc in recs)
                res["checks"].append(c)
            for recs in zip(*[pr["measurements"] for pr in per_rank]):
                m = {k: v for k, v in recs[0].items() if k != "repeats_s"}
                reps = [max(rm["repeats_s"][i] for rm in recs) for i in range(len(recs[0]["repeats_s"]))]
                m.update(repeats_s=reps, seconds=prov.median(reps), spread=prov.spread(reps))
                res["measurements"].append(m)
            res["skipped"] = per_rank[0]["skipped"]
        except Exception as e:  # noqa: BLE001
            doc["errors"].append({"error": f"{type(e).__name__}: {e}"[-4000:]})
            print(f"[overlap] failed: {type(e).__name__}: {str(e)[-1500:]}", file=sys.stderr)
    bad = [c for c in res["checks"] if not c["ok"]]
    for c in bad:
        print(f"[overlap] check failed: {c}", file=sys.stderr)
    doc["config"]["seconds"] = time.perf_counter() - t_start
    if res["measurements"]:
        doc["summary"] = summarize_overlap(doc)
        doc["summary"]["checks_ok"] = not bad
    doc["complete"] = not doc["errors"]
    prov.write(out, doc)
    if doc["summary"]:
        print(format_overlap(doc))
    print(f"[overlap] wrote {out} in {doc['config']['seconds']:.0f} s"
          + ("" if doc["complete"] else " with errors"))
    return 0 if doc["complete"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
