"""The 70B-shaped SwiGLU MLP block on one GPU and split over two (TP=2), timed with NCCL.

    PYTHONPATH=src python3 benchmarks/tp_mlp.py --out $OUT/tp_mlp.json   # 2 GPUs, under a minute
    python3 benchmarks/tp_mlp.py --cpu                                     # mock devices, toy shape

The block is Llama-3-70B's MLP (hidden 8192, FFN 28672, no biases, bf16):
``down(silu(gate(x)) * up(x))``, built as `shardlab.tensor_parallel.SwiGLUMLP` and split
with `tp.from_reference` (gate and up column-parallel, down row-parallel: one all-reduce).
Each rank holds the whole reference block too, so the same process times

* ``tp1``: the whole block on this rank's GPU (no communication), and
* ``tp2``: this rank's shards plus the block's all-reduce over NCCL,

for decode (1, 8 and 32 tokens: one new token for each of 1, 8, 32 sequences) and prefill
(one prompt of 4096 tokens). Before timing, every TP output is checked against the one-GPU
output on the same input (relative Frobenius error). Then the raw all-reduce
(``torch.distributed.all_reduce``) is timed alone at each message size the block sends
(tokens x hidden x 2 bytes).

Timing: CUDA events around ``iters`` back-to-back calls after a warm-up, repeated; the two
variants alternate between repeats; a barrier starts every repeat on all ranks together.
A measurement's time is the median over repeats, and for TP the slower rank's median (the
rank that finishes last decides when the layer's output exists). The JSON (see
``benchmarks/provenance.py``) records the GPUs, ``nvidia-smi topo -m``, driver, CUDA, NCCL
and torch versions and the date. Nothing here needs CUDA at import time.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()

NAME = "tp_mlp"


def config(cpu: bool) -> dict:
    if cpu:  # toy shape on mock devices: checks the code path in seconds, times mean nothing
        return {"hidden": 64, "ffn": 224, "dtype": "fp32", "decode_tokens": [1, 8, 32],
                "prefill_tokens": [64], "warmup": 1, "decode_iters": 3, "prefill_iters": 2,
                "allreduce_iters": 3, "repeats": 3, "seed": 0, "check_tolerance": 1e-5}
    return {"hidden": 8192, "ffn": 28672, "dtype": "bf16", "decode_tokens": [1, 8, 32],
            "prefill_tokens": [4096], "warmup": 5, "decode_iters": 50, "prefill_iters": 5,
            "allreduce_iters": 100, "repeats": 7, "seed": 0,
            # bf16 products summed in a different order: a few bf16 ulps (2^-8) of difference
            "check_tolerance": 2e-2}


# --------------------------------------------------------------------------- on every rank

def _barrier(dev) -> None:
    import torch
    import torch.distributed as dist

    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    prov.synchronize(dev)


def _shared_randn(*size, dev, dtype):
    """Random values identical on every rank (rank 0's, broadcast)."""
    import torch
    import torch.distributed as dist

    x = torch.randn(*size, device=dev, dtype=torch.float32).to(dtype)
    dist.broadcast(x, src=0)
    return x


def rank_main(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    import shardlab
    from shardlab import tensor_parallel as tp

    dev, p, rank = shardlab.device(), shardlab.world_size(), shardlab.rank()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["dtype"]]
    h, f = cfg["hidden"], cfg["ffn"]
    torch.manual_seed(cfg["seed"] + rank)
    out: dict = {"checks": [], "measurements": [], "allreduce": []}
    with torch.inference_mode():
        # The reference block, allocated directly on the GPU, with rank 0's weights everywhere.
        with torch.device("meta"):
            ref = tp.SwiGLUMLP(h, f)
        ref = ref.to_empty(device=dev).to(dtype)
        for name, w in ref.named_parameters():
            w.normal_(0.0, w.shape[1] ** -0.5)  # unit-scale activations, like nn.Linear's init
            dist.broadcast(w, src=0)
        par = tp.from_reference(ref)  # TP = p over all ranks
        variants = {"tp1": ref, f"tp{p}": par}

        phases = [("decode", t, cfg["decode_iters"]) for t in cfg["decode_tokens"]] + \
                 [("prefill", t, cfg["prefill_iters"]) for t in cfg["prefill_tokens"]]
        for phase, tokens, iters in phases:
            x = _shared_randn(tokens, h, dev=dev, dtype=dtype)
            y_ref = ref(x).float()
            y_tp = par(x).float()
            err = float((y_tp - y_ref).norm() / y_ref.norm())
            out["checks"].append({"phase": phase, "tokens": tokens, "variant": f"tp{p}",
                                  "rel_err": err, "ok": err <= cfg["check_tolerance"]})
            del y_ref, y_tp
            fns = {name: (lambda m=m: m(x)) for name, m in variants.items()}
            for fn in fns.values():
                for _ in range(cfg["warmup"]):
                    fn()
            times: dict = {name: [] for name in fns}
            for rep in range(cfg["repeats"]):
                for name in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
                    _barrier(dev)
                    times[name].append(prov.time_calls(fns[name], iters, dev)[0])
            for name, reps in times.items():
                degree = 1 if name == "tp1" else p
                out["measurements"].append({
                    "phase": phase, "tokens": tokens, "variant": name, "tp": degree,
                    "iters": iters, "repeats_s": reps,
                    "flops": 2 * 3 * h * f * tokens / degree,
                    "weight_bytes": 3 * h * f * x.element_size() / degree})
            del x, fns
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        # The raw collective at every message size the block sends.
        for tokens in cfg["decode_tokens"] + cfg["prefill_tokens"]:
            buf = torch.randn(tokens * h, device=dev, dtype=torch.float32).to(dtype)
            iters = cfg["allreduce_iters"] if tokens * h * buf.element_size() < 2**22 else 10
            for _ in range(cfg["warmup"]):
                dist.all_reduce(buf)
            reps = []
            for _ in range(cfg["repeats"]):
                _barrier(dev)
                reps.append(prov.time_calls(lambda b=buf: dist.all_reduce(b), iters, dev)[0])
            out["allreduce"].append({"tokens": tokens, "bytes": buf.numel() * buf.element_size(),
                                     "iters": iters, "repeats_s": reps})
            del buf
    return out


# --------------------------------------------------------------------------- in the caller

def merge(per_rank: list[dict], p: int) -> dict:
    """One record per measurement: per-rank medians, and the slowest rank's as ``seconds``."""
    res: dict = {"checks": [], "measurements": [], "allreduce": []}
    for key in res:
        for i, rec in enumerate(per_rank[0][key]):
            merged = {k: v for k, v in rec.items() if k not in ("repeats_s", "rel_err", "ok")}
            if key == "checks":
                errs = [r[key][i]["rel_err"] for r in per_rank]
                merged.update(rel_err=max(errs), ok=all(r[key][i]["ok"] for r in per_rank))
            else:
                reps = [r[key][i]["repeats_s"] for r in per_rank]
                medians = [prov.median(x) for x in reps]
                merged.update(repeats_s=reps, median_s_per_rank=medians, seconds=max(medians),
                              spread=max(prov.spread(x) for x in reps))
            res[key].append(merged)
    return res


def summarize(res: dict, cfg: dict, p: int) -> dict:
    from shardlab import cost

    rows = []
    by = {(m["phase"], m["tokens"], m["tp"]): m for m in res["measurements"]}
    ar = {a["tokens"]: a for a in res["allreduce"]}
    for phase, tokens, tp in sorted(by):
        if tp != 1:
            continue
        one, many = by[(phase, tokens, 1)], by.get((phase, tokens, p))
        if many is None:
            continue
        a = ar.get(tokens)
        rows.append({
            "phase": phase, "tokens": tokens,
            "tp1_s": one["seconds"], f"tp{p}_s": many["seconds"],
            "speedup": one["seconds"] / many["seconds"],
            "allreduce_s": a["seconds"] if a else None,
            "allreduce_bytes": a["bytes"] if a else None,
            "allreduce_bus_bandwidth": cost.bus_bandwidth(a["bytes"], a["seconds"], p) if a else None,
            "allreduce_model_nvlink_h100_s": cost.allreduce_time(a["bytes"], p, "nvlink-h100") if a else None,
            # what the split leaves beyond perfect scaling: communication plus overheads
            "tp_overhead_s": many["seconds"] - one["seconds"] / p,
            "tp1_tflops": one["flops"] / one["seconds"] / 1e12,
            "tp1_weight_gbps": one["weight_bytes"] / one["seconds"] / 1e9,
        })
    return {"rows": rows, "checks_ok": all(c["ok"] for c in res["checks"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.world_size < 2:
        parser.error("--world-size must be at least 2: the point is TP=1 against TP>1")
    out = args.out or prov.default_out(NAME, args.cpu)
    backend = prov.backend_for(args.cpu, args.world_size)
    cfg = config(args.cpu)
    doc = prov.envelope(NAME, prov.capture(backend, args.world_size), cfg)
    from shardlab import Cluster

    try:
        with Cluster(args.world_size, backend, timeout=300) as cluster:
            per_rank = cluster.run(rank_main, cfg)
        doc["results"] = merge(per_rank, args.world_size)
        doc["summary"] = summarize(doc["results"], cfg, args.world_size)
        doc["complete"] = True
    except Exception:  # noqa: BLE001 - keep what there is, say what failed
        doc["errors"].append(traceback.format_exc()[-4000:])
    prov.write(out, doc)
    for row in doc["summary"].get("rows", []):
        tp_key = f"tp{args.world_size}_s"
        print(f"{row['phase']:8} {row['tokens']:>5} tokens: TP=1 {row['tp1_s'] * 1e3:8.3f} ms, "
              f"TP={args.world_size} {row[tp_key] * 1e3:8.3f} ms, speedup {row['speedup']:.2f}, "
              f"all-reduce {row['allreduce_s'] * 1e6:8.1f} us ({row['allreduce_bytes']} B)")
    checks = doc["results"].get("checks", [])
    print(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok; wrote {out}")
    if doc["errors"]:
        print(doc["errors"][-1], file=sys.stderr)
        return 1
    return 0 if doc["summary"].get("checks_ok") else 2


if __name__ == "__main__":
    sys.exit(main())
