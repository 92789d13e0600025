"""Expert-parallel all-to-all on real GPUs: the dispatch of a Mixtral-like MoE layer.

    PYTHONPATH=src python3 benchmarks/alltoall.py --out $OUT/alltoall.json   # 2 GPUs, < 2 min
    python benchmarks/alltoall.py --cpu                                      # mock devices

Each rank holds ``tokens`` tokens of ``hidden`` values (default 4096 x 4096 in bf16, a
Mixtral-8x7B layer's input at a 4096-token batch per GPU) and routes them top-2 over 8
experts with synthetic router logits (seeded, so every rank knows every rank's routing).
The rows are sorted by expert, exactly as :class:`shardlab.expert_parallel.ExpertParallelMoE`
does, which gives uneven splits. Timed with CUDA events around back-to-back calls after a
warm-up, median over repeats of the slowest rank; the host time to issue the calls is
stored too (``*_host_s``: close to the device time means the loop was limited by Python
and launches, not by the GPUs):

* ``count_exchange``: the all-to-all of the per-expert counts (a few bytes: pure latency),
  and ``count_exchange_raw``, the same with ``torch.distributed.all_to_all_single``;
* ``dispatch``: the data all-to-all, split sizes known (``shardlab.comm.all_to_all``);
* ``dispatch_raw``: the same with ``torch.distributed.all_to_all_single`` on preallocated
  buffers (the floor shardlab's logging wrapper is compared with);
* ``dispatch_with_counts``: what a layer really pays: count exchange, a device-to-host read
  of the counts, then the data;
* ``round_trip``: dispatch then combine (the inverse all-to-all), as one MoE layer's forward.

Before timing, a round trip is checked to return every row bit for bit. Bytes per rank are
the rows that leave the GPU; ``shardlab.cost.alltoall_time`` on the ``nvlink-h100`` preset is
stored next to each measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()

CASES = ("count_exchange", "count_exchange_raw", "dispatch", "dispatch_raw",
         "dispatch_with_counts", "round_trip")


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def routing_splits(rank: int, p: int, tokens: int, experts: int, top_k: int, seed: int = 0):
    """Per-expert counts and the rows-per-destination splits of rank ``rank``'s tokens."""
    import torch

    from shardlab.expert_parallel import route, send_counts_per_rank

    g = torch.Generator().manual_seed(seed + 7919 * rank)
    logits = torch.randn(tokens, experts, generator=g)
    r = route(logits, top_k)
    counts = r.tokens_per_expert
    return counts, send_counts_per_rank(counts, p)


def rank_measure(tokens_list: list[int], hidden: int, experts: int, top_k: int, dtype_name: str,
                 repeats: int, warmup: int, iters: int) -> list[dict]:
    """Time every case at every token count. Runs on every rank."""
    import torch
    import torch.distributed as dist

    import shardlab
    from shardlab import comm

    _quiet()
    dev, r, p = shardlab.device(), shardlab.rank(), shardlab.world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    per_rank = experts // p
    out = []
    for tokens in tokens_list:
        counts, send = routing_splits(r, p, tokens, experts, top_k)
        # What each peer sends me: recomputed from its seed (the count exchange's answer).
        recv = [sum(routing_splits(q, p, tokens, experts, top_k)[0][r * per_rank:(r + 1) * per_rank].tolist())
                for q in range(p)]
        rows = sum(send)
        x = torch.randn(rows, hidden, device=dev).to(dtype)
        counts_dev = counts.to(dev)
        counts_out = torch.empty_like(counts_dev)
        recv_buf = torch.empty(sum(recv), hidden, dtype=dtype, device=dev)
        split = [per_rank] * p

        # Correctness: the count exchange gives `recv`, a round trip returns every row.
        got = comm.all_to_all(counts_dev, split, split).reshape(p, per_rank).sum(1).tolist()
        back = comm.all_to_all(comm.all_to_all(x, send, recv), recv, send)
        prov.synchronize(dev)
        ok = got == recv and torch.equal(back, x)

        def count_exchange():
            return comm.all_to_all(counts_dev, split, split)

        def count_exchange_raw():
            dist.all_to_all_single(counts_out, counts_dev)

        def dispatch():
            return comm.all_to_all(x, send, recv)

        def dispatch_raw():
            dist.all_to_all_single(recv_buf, x, recv, send)

        def dispatch_with_counts():
            c = comm.all_to_all(counts_dev, split, split).reshape(p, per_rank).sum(1).tolist()
            return comm.all_to_all(x, send, c)

        def round_trip():
            y = comm.all_to_all(x, send, recv)
            return comm.all_to_all(y, recv, send)

        fns = {"count_exchange": count_exchange, "count_exchange_raw": count_exchange_raw,
               "dispatch": dispatch, "dispatch_raw": dispatch_raw,
               "dispatch_with_counts": dispatch_with_counts, "round_trip": round_trip}
        times = {k: [] for k in fns}
        host = {k: [] for k in fns}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for rep in range(repeats):
            order = list(fns) if rep % 2 == 0 else list(reversed(fns))
            for name in order:
                t = torch.zeros(1, device=dev)
                dist.all_reduce(t)  # line the ranks up
                prov.synchronize(dev)
                device_s, host_s = prov.time_calls(fns[name], iters, dev)
                times[name].append(device_s)
                host[name].append(host_s)
        row_bytes = hidden * x.element_size()
        out.append({"tokens": tokens, "rows": rows, "send": send, "recv": recv, "ok": ok,
                    "bytes_out": (rows - send[r]) * row_bytes, "buffer_bytes": rows * row_bytes,
                    "times": times, "host": host})
        del x, recv_buf, back
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def merge_ranks(per_rank: list[list[dict]], p: int, link: str = "nvlink-h100") -> list[dict]:
    """One record per token count: each repeat's time is its slowest rank's."""
    from shardlab import cost

    merged = []
    for records in zip(*per_rank):
        first = records[0]
        rec = {"tokens_per_rank": first["tokens"], "rows_per_rank": [rr["rows"] for rr in records],
               "send_splits": [rr["send"] for rr in records], "ok": all(rr["ok"] for rr in records),
               "max_bytes_out": max(rr["bytes_out"] for rr in records),
               "max_buffer_bytes": max(rr["buffer_bytes"] for rr in records)}
        for case in CASES:
            reps = [max(rr["times"][case][i] for rr in records)
                    for i in range(len(first["times"][case]))]
            rec[f"{case}_s"] = prov.median(reps)
            rec[f"{case}_spread"] = prov.spread(reps)
            rec[f"{case}_host_s"] = prov.median(
                [max(rr["host"][case][i] for rr in records) for i in range(len(reps))])
        rec["dispatch_out_GBps"] = rec["max_bytes_out"] / rec["dispatch_s"] / 1e9
        rec["model_dispatch_s"] = cost.alltoall_time(rec["max_buffer_bytes"], p, link)
        rec["model_link"] = link
        merged.append(rec)
    return merged


def summarize(doc: dict) -> dict:
    """The headline: the Mixtral-like case (4096 tokens per GPU) and what a forward pass pays."""
    cfg = doc["config"]
    rows = doc["results"]["measurements"]
    if not rows:
        return {}
    main = min(rows, key=lambda m: abs(m["tokens_per_rank"] - cfg["headline_tokens"]))
    per_layer = main["round_trip_s"]
    return {
        "tokens_per_rank": main["tokens_per_rank"], "hidden": cfg["hidden"], "dtype": cfg["dtype"],
        "top_k": cfg["top_k"], "experts": cfg["experts"], "world_size": cfg["world_size"],
        "dispatch_ms": main["dispatch_s"] * 1e3, "dispatch_raw_ms": main["dispatch_raw_s"] * 1e3,
        "count_exchange_us": main["count_exchange_s"] * 1e6,
        "count_exchange_raw_us": main["count_exchange_raw_s"] * 1e6,
        "count_exchange_host_us": main["count_exchange_host_s"] * 1e6,
        "dispatch_with_counts_ms": main["dispatch_with_counts_s"] * 1e3,
        "round_trip_ms": per_layer * 1e3, "bytes_out_per_rank": main["max_bytes_out"],
        "dispatch_out_GBps": main["dispatch_out_GBps"],
        "model_dispatch_ms": main["model_dispatch_s"] * 1e3,
        "moe_layers": cfg["moe_layers"],
        "forward_alltoall_ms": per_layer * cfg["moe_layers"] * 1e3,
    }


def format_summary(s: dict) -> str:
    if not s:
        return "no measurements"
    return (f"{s['tokens_per_rank']} tokens x {s['hidden']} ({s['dtype']}) per rank, top-{s['top_k']} "
            f"of {s['experts']} experts, {s['world_size']} ranks:\n"
            f"  count exchange        {s['count_exchange_us']:8.1f} us   raw torch "
            f"{s['count_exchange_raw_us']:.1f} us, host issue time {s['count_exchange_host_us']:.1f} us\n"
            f"  dispatch (shardlab)   {s['dispatch_ms']:8.3f} ms   raw torch {s['dispatch_raw_ms']:.3f} ms, "
            f"{s['dispatch_out_GBps']:.0f} GB/s out of each GPU, model {s['model_dispatch_ms']:.3f} ms\n"
            f"  dispatch with counts  {s['dispatch_with_counts_ms']:8.3f} ms\n"
            f"  dispatch + combine    {s['round_trip_ms']:8.3f} ms per MoE layer, "
            f"x {s['moe_layers']} layers = {s['forward_alltoall_ms']:.1f} ms per forward pass")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_common_arguments(parser)
    parser.add_argument("--tokens", default=None,
                        help="comma-separated tokens per rank (default 512,1024,2048,4096,8192)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --cpu)")
    args = parser.parse_args(argv)

    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = [64, 256] if args.cpu else [512, 1024, 2048, 4096, 8192]
    hidden = args.hidden or (256 if args.cpu else 4096)
    repeats = args.repeats or (3 if args.cpu else 7)
    warmup, iters = (1, 2) if args.cpu else (3, 10)
    if args.experts % args.world_size:
        parser.error(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")
    out = args.out or prov.default_out("alltoall", args.cpu)

    backend = prov.backend_for(args.cpu, args.world_size)
    from shardlab import Cluster, memory

    t_start = time.perf_counter()
    doc = prov.envelope("alltoall", prov.capture(backend, args.world_size), {
        "tokens_per_rank": tokens, "hidden": hidden, "experts": args.experts, "top_k": args.top_k,
        "dtype": args.dtype, "world_size": args.world_size, "repeats": repeats, "warmup": warmup,
        "iters": iters, "headline_tokens": 4096,
        "moe_layers": memory.MODELS["mixtral-8x7b"].layers,
        "routing": "synthetic N(0,1) router logits, seeded per rank; rows sorted by expert",
        "timing": ("cuda events around back-to-back calls; median over repeats of the slowest "
                   "rank") if not args.cpu else "host clock (mock devices)"})
    doc["results"] = {"measurements": []}
    try:
        with Cluster(args.world_size, backend, timeout=300) as cluster:
            doc["provenance"]["devices"] = cluster.devices
            per_rank = cluster.run(rank_measure, tokens, hidden, args.experts, args.top_k,
                                   args.dtype, repeats, warmup, iters, timeout=300)
            doc["results"]["measurements"] = merge_ranks(per_rank, args.world_size)
        bad = [m["tokens_per_rank"] for m in doc["results"]["measurements"] if not m["ok"]]
        if bad:
            doc["errors"].append({"error": f"round trip or count exchange wrong at tokens {bad}"})
        doc["summary"] = summarize(doc)
    except Exception as e:  # noqa: BLE001 - write what we have, with the error
        doc["errors"].append({"error": f"{type(e).__name__}: {e}"[-4000:]})
        print(f"[alltoall] failed: {type(e).__name__}: {str(e)[-800:]}", file=sys.stderr)
    doc["config"]["seconds"] = time.perf_counter() - t_start
    doc["complete"] = not doc["errors"]
    prov.write(out, doc)
    print(format_summary(doc["summary"]))
    print(f"[alltoall] wrote {out} in {doc['config']['seconds']:.0f} s"
          + ("" if doc["complete"] else f" with {len(doc['errors'])} errors"))
    return 0 if doc["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
