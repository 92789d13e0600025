"""Pipeline schedules on real GPUs: measured bubble and memory, GPipe, 1F1B and interleaved 1F1B.

    PYTHONPATH=src python3 benchmarks/pipeline.py --out $OUT/pipeline.json   # 2 GPUs, NCCL
    PYTHONPATH=src python3 benchmarks/pipeline.py --cpu                      # mock devices

A stack of transformer blocks in bf16 is split into p stages (one per GPU) and trained
for one step by `shardlab.pipeline.executor` under GPipe, 1F1B and interleaved 1F1B (two
model chunks per GPU) at several numbers of micro-batches m (fixed micro-batch size, so the
batch grows with m; interleaving needs m to be a multiple of p, other m are skipped and
recorded). Every op is timed
between CUDA-synchronized timestamps (`sync_cuda=True`), so for each run we get:

* the measured bubble: idle time over stages x makespan, from the op timestamps;
* the simulated bubble: `shardlab.pipeline.simulate` fed the measured median forward and
  backward times, without communication time and with the measured hop latency
  (`PipelineRun.hop_latency`: end of an op to the start of the op waiting for it on the
  next GPU), and the closed form (p-1)/(m+p-1);
* the replayed bubble (`PipelineRun.replay`): the schedule re-timed with each op's own
  measured duration and nothing in between. Simulated (one duration per kind) vs replayed
  isolates uneven stages (the last stage also computes the loss, the first has no input
  gradient); replayed vs measured isolates what happens between ops (transfers,
  synchronization, host overhead);
* memory: `torch.cuda.max_memory_allocated` per rank (weights, gradients, activations and
  buffers), and the executor's count of activation bytes saved for the backward pass.

Each configuration runs once to warm up (kernels, NCCL links), then `--repeats` times; the
run with the median makespan is kept. The JSON (with provenance) also stores that run's
per-op timeline for m = 8, which chapter 6 draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
CHUNKS = {"interleaved-1f1b": 2}  # model chunks per GPU; the others have one
GPU_CONFIG = {"layers": 8, "hidden": 2048, "heads": 16, "seq": 1024, "micro_batch": 2,
              "microbatches": [2, 4, 8, 16], "schedules": list(SCHEDULES), "repeats": 3,
              "dtype": "bf16", "timeline_m": 8}
CPU_CONFIG = {"layers": 8, "hidden": 64, "heads": 4, "seq": 16, "micro_batch": 2,
              "microbatches": [2, 4, 8], "schedules": list(SCHEDULES), "repeats": 1,
              "dtype": "fp32", "timeline_m": 4}


def runnable(cfg: dict, p: int) -> tuple[list, list]:
    """The (schedule, m) pairs to run on p stages, and the skipped ones with the reason."""
    from shardlab.pipeline import schedule

    keep, skipped = [], []
    for name in cfg["schedules"]:
        for m in cfg["microbatches"]:
            try:
                schedule(name, p, m, CHUNKS.get(name, 1))
                keep.append((name, m))
            except ValueError as e:
                skipped.append({"schedule": name, "microbatches": m, "why": str(e)})
    return keep, skipped


def _bench_rank(cfg: dict) -> list:
    """Rank function: build the model once, then every (schedule, m, repeat) step.

    Returns, per step, this rank's StageReport (the caller merges them), then timings."""
    import time

    import torch

    import shardlab
    from shardlab.pipeline import executor as ex
    from shardlab.pipeline import schedule

    t_start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["dtype"]]
    p, dev = shardlab.world_size(), shardlab.device()
    # Build the stack on the meta device (no memory) and give storage only to the layers
    # this rank holds under some schedule (one chunk, or two when interleaved), on its GPU:
    # the other layers never exist here. Each layer is seeded by its index.
    with torch.device("meta"):
        model = ex.BlockStack([ex.TransformerBlock(cfg["hidden"], cfg["heads"])
                               for _ in range(cfg["layers"])])
    pairs, _ = runnable(cfg, p)
    mine = {}
    for v in sorted({CHUNKS.get(name, 1) for name, _ in pairs}):
        for chunk in ex.stage_layers(model, p, v, shardlab.rank()).values():
            mine.update({id(layer): layer for _, layer in chunk})
    for index, layer in enumerate(model.layers):
        if id(layer) not in mine:
            continue
        torch.manual_seed(1000 + index)
        layer.to_empty(device=dev)
        for name, prm in layer.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    prm.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    prm.zero_()
                else:
                    prm.normal_(0.0, 0.02)
        layer.to(dtype)
    built = time.perf_counter() - t_start
    g = torch.Generator().manual_seed(1)
    out = []
    for name, m in pairs:
        v = CHUNKS.get(name, 1)
        b = m * cfg["micro_batch"]
        x = torch.randn(b, cfg["seq"], cfg["hidden"], generator=g).to(dtype)
        y = torch.randn(b, cfg["seq"], cfg["hidden"], generator=g).to(dtype)
        sched = schedule(name, p, m, v)
        for rep in range(cfg["repeats"] + 1):  # the first one warms up
            rep_out = ex.train_step(model, x, y, sched, chunks=v, sync_cuda=None,
                                    return_grads=False)
            if rep:
                out.append({"schedule": name, "microbatches": m, "repeat": rep, "report": rep_out})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out.append({"build_s": built, "total_s": time.perf_counter() - t_start})
    return out


def _timeline_rows(run) -> list:
    return [[t.stage, t.op.kind, t.op.microbatch, t.op.chunk, t.start, t.end] for t in run.timeline]


def summarize(cfg: dict, per_rank: list) -> tuple[list, dict]:
    from shardlab.pipeline import bubble_fraction_closed_form, schedule, simulate
    from shardlab.pipeline import executor as ex

    p = len(per_rank)
    rows, timelines = [], {}
    n = len(per_rank[0]) - 1  # the last entry holds the rank's own timings
    groups: dict = {}
    for i in range(n):
        entries = [per_rank[r][i] for r in range(p)]
        key = (entries[0]["schedule"], entries[0]["microbatches"])
        sched = schedule(key[0], p, key[1], CHUNKS.get(key[0], 1))
        groups.setdefault(key, []).append(ex.collect(sched, [e["report"] for e in entries]))
    for (name, m), runs in groups.items():
        runs.sort(key=lambda r: r.makespan)
        run = runs[len(runs) // 2]
        t = run.op_times()
        hop = run.hop_latency()
        sim = simulate(run.schedule, t["F"], t["B"])
        sim_hop = simulate(run.schedule, t["F"], t["B"], t_p2p=hop)
        rows.append({
            "schedule": name, "stages": p, "chunks": CHUNKS.get(name, 1), "microbatches": m,
            "makespan_s": run.makespan,
            "makespans_s": [r.makespan for r in runs],
            "t_forward_s": t["F"], "t_backward_s": t["B"],
            "measured_bubble": run.bubble_fraction,
            "simulated_bubble": sim.bubble_fraction,
            "hop_latency_s": hop,
            "simulated_bubble_with_hops": sim_hop.bubble_fraction,
            "replayed_bubble": run.replay_bubble(),
            "replayed_bubble_with_hops": run.replay_bubble(hop),
            "send_post_s": sorted(x for rep in run.reports for x in rep.send_seconds)[
                len([x for rep in run.reports for x in rep.send_seconds]) // 2]
            if any(rep.send_seconds for rep in run.reports) else None,
            "closed_form_bubble": bubble_fraction_closed_form(name, p, m, CHUNKS.get(name, 1)),
            "simulated_makespan_s": sim.makespan,
            "peak_memory_allocated": [rep.peak_memory_allocated for rep in run.reports],
            "peak_activation_bytes": list(run.peak_activation_bytes),
            "activation_unit_bytes": list(run.activation_unit_bytes),
            "peak_activations": list(run.peak_activations),
            "simulated_peak_activations": list(sim.peak_activations),
        })
        if m == cfg["timeline_m"]:
            timelines[name] = {"microbatches": m, "ops": _timeline_rows(run),
                               "simulated": [[x.stage, x.op.kind, x.op.microbatch, x.op.chunk,
                                              x.start, x.end] for x in sim.timeline]}
    rows.sort(key=lambda r: (cfg["schedules"].index(r["schedule"]), r["microbatches"]))
    return rows, timelines


def make_summary(rows: list) -> dict:
    by = {(r["schedule"], r["microbatches"]): r for r in rows}
    mem = []
    for (name, m), r in sorted(by.items()):
        if name == "gpipe" and ("1f1b", m) in by:
            o = by[("1f1b", m)]
            g0 = r["peak_memory_allocated"][0]
            f0 = o["peak_memory_allocated"][0]
            mem.append({"microbatches": m, "gpipe_peak_memory": g0, "1f1b_peak_memory": f0,
                        "ratio": (g0 / f0) if (g0 and f0) else None,
                        "gpipe_activation_bytes": r["peak_activation_bytes"][0],
                        "1f1b_activation_bytes": o["peak_activation_bytes"][0]})
    gap = [abs(r["measured_bubble"] - r["simulated_bubble"]) for r in rows]
    gap_hop = [abs(r["measured_bubble"] - r["simulated_bubble_with_hops"]) for r in rows]
    return {"memory_stage0": mem,
            "max_bubble_gap": max(gap) if gap else None,
            "max_bubble_gap_with_hops": max(gap_hop) if gap_hop else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    prov.add_common_arguments(parser)
    parser.add_argument("--microbatches", type=str, default=None,
                        help="comma-separated m values (default 2,4,8,16 on GPUs)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--schedules", type=str, default=None,
                        help="comma-separated subset of " + ", ".join(SCHEDULES))
    args = parser.parse_args(argv)
    cfg = dict(CPU_CONFIG if args.cpu else GPU_CONFIG)
    if args.microbatches:
        cfg["microbatches"] = [int(x) for x in args.microbatches.split(",")]
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.schedules:
        cfg["schedules"] = [x.strip() for x in args.schedules.split(",") if x.strip()]
        bad = [x for x in cfg["schedules"] if x not in SCHEDULES]
        if bad:
            parser.error(f"unknown schedules {bad}; choose from {', '.join(SCHEDULES)}")
    world = args.world_size
    backend = prov.backend_for(args.cpu, world)
    cfg["world_size"] = world
    out = args.out or prov.default_out("pipeline", args.cpu)

    from shardlab import Cluster

    cfg["skipped"] = runnable(cfg, world)[1]
    doc = prov.envelope("pipeline", prov.capture(backend, world), cfg)
    t0 = time.perf_counter()
    try:
        with Cluster(world, backend, timeout=150) as cluster:
            doc["config"]["startup_s"] = time.perf_counter() - t0
            per_rank = cluster.run(_bench_rank, cfg, timeout=150)
        doc["config"]["rank_timings"] = [r[-1] for r in per_rank]
        rows, timelines = summarize(cfg, per_rank)
        doc["results"] = {"runs": rows, "timelines": timelines}
        doc["summary"] = make_summary(rows)
        doc["complete"] = True
    except Exception as e:  # noqa: BLE001 - keep the provenance and the error
        doc["errors"].append(f"{type(e).__name__}: {e}")
    doc["config"]["seconds"] = time.perf_counter() - t0
    prov.write(out, doc)
    for r in doc["results"].get("runs", []):
        mem = r["peak_memory_allocated"][0]
        print(f"{r['schedule']:>6} m={r['microbatches']:>2}  makespan {r['makespan_s'] * 1e3:8.2f} ms  "
              f"bubble measured {r['measured_bubble']:.3f} simulated {r['simulated_bubble']:.3f} "
              f"(with {r['hop_latency_s'] * 1e6:.0f} us hops {r['simulated_bubble_with_hops']:.3f}) "
              f"replayed {r['replayed_bubble']:.3f} "
              f"send post {(r['send_post_s'] or 0) * 1e6:.0f} us "
              f"closed form {r['closed_form_bubble']:.3f}  "
              f"stage-0 peak memory {mem / 2**30 if mem else float('nan'):.2f} GiB  "
              f"activations held {r['peak_activations']}")
    print(f"start-up {doc['config'].get('startup_s', 0):.1f} s, ranks {doc['config'].get('rank_timings')}")
    print(f"wrote {out} in {doc['config']['seconds']:.0f} s" + (f"; errors: {doc['errors']}" if doc["errors"] else ""))
    return 0 if doc["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
