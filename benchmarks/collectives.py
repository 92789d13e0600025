"""Collectives on real GPUs: `shardlab.comm` against raw `torch.distributed`, and a calibrated
alpha-beta model.

    python benchmarks/collectives.py            # 2 GPUs over NCCL, about a minute
    python benchmarks/collectives.py --cpu      # mock devices (gloo): checks the code path

For every collective (all-reduce, all-gather, reduce-scatter, all-to-all, send/recv), dtype
(bf16, fp16) and size (4 KiB to 1 GiB, powers of 2), both implementations first prove they
compute the right thing (fresh random inputs, checked against a float32 reference), then
run ``iters`` back-to-back calls between two CUDA events after a warm-up. Repeats alternate
the order (shardlab, raw / raw, shardlab / ...) so that drift hits both alike; a repeat's
time is its slowest rank's; the reported time is the median over repeats.

Size ``S`` follows nccl-tests and `shardlab.cost`: the whole tensor (all-reduce), the input
(reduce-scatter, all-to-all), the gathered output (all-gather), the message (send/recv).
Bus bandwidth is nccl-tests' busbw: ``S / t`` times the collective's byte factor
(`shardlab.cost.bus_bandwidth`), comparable with the link's per-direction bandwidth.

Then `shardlab.results.summarize_collectives` fits ``alpha`` and ``B`` per collective
(`shardlab.cost.fit_alpha_beta`) and reports, at every size, the error of the link preset
and of the calibrated model, and the shardlab / raw time ratio (goal: within 3%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as prov  # noqa: E402

prov.setup_environment()

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
DTYPES = ("bf16", "fp16")
KiB, MiB, GiB = 2**10, 2**20, 2**30


def default_sizes(cpu: bool, step: int = 2, top: int | None = None) -> list[int]:
    """4 KiB up to `top` bytes (default 1 GiB on GPUs, 256 KiB on mock devices), multiplying
    by `step`."""
    top = top or (256 * KiB if cpu else GiB)
    sizes, s = [], 4 * KiB
    while s <= top:
        sizes.append(s)
        s *= step
    return sizes


def iterations(nbytes: int, cpu: bool, target_s: float = 5e-3, lo: int = 5, hi: int = 200) -> int:
    """Back-to-back calls per repeat: about `target_s` of work, from a deliberately rough
    guess (25 us + S / 150 GB/s). It depends only on the size, so every rank agrees."""
    if cpu:
        return 3
    guess = 25e-6 + nbytes / 150e9
    return int(min(hi, max(lo, round(target_s / guess))))


# --------------------------------------------------------------------------- rank functions

def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _quiet() -> None:
    # Deprecation warnings from torch.distributed, one per rank, would bury the log.
    import warnings

    warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)


def _barrier(dev) -> None:
    """Line the ranks up before a timed loop: a tiny all-reduce, then wait for it."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    prov.synchronize(dev)


def _gather_scatter():
    """torch's all-gather / reduce-scatter into one tensor, by the name this torch prefers
    (2.13 renamed them *_single): the same functions shardlab.comm calls."""
    import torch.distributed as dist

    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor,
            getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)


class _Calls:
    """Preallocated buffers and the two ways to run one collective on them.

    `raw` is the plainest torch.distributed call on preallocated buffers (what nccl-tests
    does); `shardlab` is the same call through `shardlab.comm`, on the same buffers (its
    `out=`), so that the difference is the wrapper alone.
    """

    def __init__(self, op: str, nbytes: int, dtype, dev, rank: int, p: int):
        import torch
        import torch.distributed as dist

        from shardlab import comm

        all_gather_single, reduce_scatter_single = _gather_scatter()
        n = nbytes // torch.empty((), dtype=dtype).element_size()
        if n % p:
            raise ValueError(f"{nbytes} bytes do not split over {p} ranks")
        new = dict(dtype=dtype, device=dev)
        self.op = op
        if op == "all_reduce":
            x = torch.empty(n, **new)
            self.buffers = [x]
            self.shardlab = lambda: comm.all_reduce(x)
            self.raw = lambda: dist.all_reduce(x)
        elif op == "all_gather":
            x, out = torch.empty(n // p, **new), torch.empty(n, **new)
            self.buffers = [x]
            self.shardlab = lambda: comm.all_gather(x, out=out)
            self.raw = lambda: all_gather_single(out, x)
        elif op == "reduce_scatter":
            x, out = torch.empty(n, **new), torch.empty(n // p, **new)
            self.buffers = [x]
            self.shardlab = lambda: comm.reduce_scatter(x, out=out)
            self.raw = lambda: reduce_scatter_single(out, x)
        elif op == "all_to_all":
            x, out = torch.empty(n, **new), torch.empty(n, **new)
            self.buffers = [x]
            self.shardlab = lambda: comm.all_to_all(x, out=out)  # equal splits
            self.raw = lambda: dist.all_to_all_single(out, x)
        elif op == "send_recv":
            if p % 2:
                raise ValueError("send/recv pairs ranks (0->1, 2->3, ...): use an even world size")
            x = torch.empty(n, **new)
            self.buffers = [x]
            peer = rank ^ 1
            if rank % 2 == 0:
                self.shardlab = lambda: comm.send(x, peer)
                self.raw = lambda: dist.send(x, peer)
            else:
                self.shardlab = lambda: comm.recv(x, peer)
                self.raw = lambda: dist.recv(x, peer)
        else:
            raise ValueError(f"unknown op {op!r}; use one of {', '.join(OPS)}")

    def refill(self) -> None:
        # Random data, never zeros. Repeated in-place sums grow (and may overflow fp16 to
        # inf within a repeat); NCCL's arithmetic takes the same time on any values.
        for b in self.buffers:
            b.normal_()


def rank_check(op: str, nbytes: int, dtype_name: str, seed: int = 1234) -> dict:
    """Both implementations against a float32 reference, on fresh random inputs.

    Every rank regenerates every rank's input from its seed, so it knows the right answer.
    Preallocated outputs are poisoned (NaN) first, so an unwritten element fails the check.
    """
    import torch
    import torch.distributed as dist

    import shardlab
    from shardlab import comm

    _quiet()
    dev, r, p = shardlab.device(), shardlab.rank(), shardlab.world_size()
    dtype = _torch_dtype(dtype_name)
    all_gather_single, reduce_scatter_single = _gather_scatter()
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    per_rank = n // p if op == "all_gather" else n

    def inputs(j: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 7919 * j)
        return torch.randn(per_rank, generator=g).to(dtype)

    xs = [inputs(j) for j in range(p)]
    mine = xs[r].to(dev)

    def poisoned(m: int) -> torch.Tensor:
        return torch.full((m,), float("nan"), dtype=dtype, device=dev)

    if op == "all_reduce":
        expected = sum(x.float() for x in xs)
        a = comm.all_reduce(mine.clone())
        b = mine.clone()
        dist.all_reduce(b)
    elif op == "all_gather":
        expected = torch.cat([x.float() for x in xs])
        a = comm.all_gather(mine.clone())
        b = poisoned(n)
        all_gather_single(b, mine.clone())
    elif op == "reduce_scatter":
        expected = sum(x.float() for x in xs).chunk(p)[r]
        a = comm.reduce_scatter(mine.clone())
        b = poisoned(n // p)
        reduce_scatter_single(b, mine.clone())
    elif op == "all_to_all":
        expected = torch.cat([x.float().chunk(p)[r] for x in xs])
        a = comm.all_to_all(mine.clone())
        b = poisoned(n)
        dist.all_to_all_single(b, mine.clone())
    elif op == "send_recv":
        peer = r ^ 1
        if r % 2 == 0:
            comm.send(mine.clone(), peer)
            dist.send(mine.clone(), peer)
            return {"rank": r, "shardlab": 0.0, "raw": 0.0, "role": "sender"}
        expected = xs[peer].float()
        a = comm.recv(poisoned(n), peer)
        b = poisoned(n)
        dist.recv(b, peer)
    else:
        raise ValueError(f"unknown op {op!r}")
    prov.synchronize(dev)

    def err(y: torch.Tensor) -> float:
        y = y.float().cpu()
        if y.shape != expected.shape or not torch.isfinite(y).all():
            return float("inf")
        return float((y - expected).norm() / expected.norm())

    return {"rank": r, "shardlab": err(a), "raw": err(b)}


def rank_measure(op: str, sizes: list[int], dtypes: list[str], repeats: int, warmup: int,
                 cpu: bool) -> list[dict]:
    """Time `op` at every size and dtype, shardlab and raw interleaved. Runs on every rank."""
    import torch

    import shardlab

    _quiet()
    dev, r, p = shardlab.device(), shardlab.rank(), shardlab.world_size()
    # Spin up before the first timed size: the first calls after a pause run on idle clocks
    # and cold caches, and made the smallest size look ~40% slower than the next ones.
    spin = _Calls(op, sizes[0], _torch_dtype(dtypes[0]), dev, r, p)
    spin.refill()
    for _ in range(2 if cpu else 300):
        spin.shardlab()
        spin.raw()
    prov.synchronize(dev)
    del spin
    out = []
    for dtype_name in dtypes:
        for nbytes in sizes:
            calls = _Calls(op, nbytes, _torch_dtype(dtype_name), dev, r, p)
            iters = iterations(nbytes, cpu)
            calls.refill()
            for _ in range(warmup):
                calls.shardlab()
                calls.raw()
            times: dict[str, list] = {"shardlab": [], "raw": []}
            host: dict[str, list] = {"shardlab": [], "raw": []}
            for rep in range(repeats):
                for impl in (("shardlab", "raw") if rep % 2 == 0 else ("raw", "shardlab")):
                    calls.refill()
                    _barrier(dev)
                    device_s, host_s = prov.time_calls(getattr(calls, impl), iters, dev)
                    times[impl].append(device_s)
                    host[impl].append(host_s)
            out.append({"op": op, "dtype": dtype_name, "bytes": nbytes, "iters": iters,
                        "times": times, "host": host})
            del calls
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- driver

def merge_ranks(per_rank: list[list[dict]], p: int) -> list[dict]:
    """One record per (dtype, size): each repeat's time is its slowest rank's."""
    from shardlab import cost
    from shardlab.results import OP_TO_COLLECTIVE

    merged = []
    for records in zip(*per_rank):
        first = records[0]
        rec = {"op": first["op"], "collective": OP_TO_COLLECTIVE[first["op"]],
               "dtype": first["dtype"], "bytes": first["bytes"], "iters": first["iters"]}
        for impl in ("shardlab", "raw"):
            reps = [max(rr["times"][impl][i] for rr in records)
                    for i in range(len(first["times"][impl]))]
            rec[f"{impl}_s"] = prov.median(reps)
            rec[f"{impl}_repeats_s"] = reps
            rec[f"{impl}_spread"] = prov.spread(reps)
            rec[f"{impl}_host_s"] = prov.median(
                [max(rr["host"][impl][i] for rr in records) for i in range(len(reps))])
            rec[f"{impl}_busbw"] = cost.bus_bandwidth(rec["bytes"], rec[f"{impl}_s"], p,
                                                      rec["collective"])
        rec["ratio"] = rec["shardlab_s"] / rec["raw_s"]
        merged.append(rec)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_common_arguments(parser)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of "
                        + ", ".join(OPS))
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16,fp16 (default both)")
    parser.add_argument("--step", type=int, default=2, choices=(2, 4),
                        help="size multiplier from 4 KiB (2: 19 sizes to 1 GiB; 4: 10 sizes)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="largest size, smaller or larger than the default 1 GiB "
                        "(e.g. 4294967296 for 4 GiB on an 8-GPU node)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per size "
                        "and implementation (default 9; 3 with --cpu)")
    args = parser.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        parser.error(f"unknown ops {bad}; choose from {', '.join(OPS)}")
    dtypes = args.dtypes.split(",") if args.dtypes else list(DTYPES)
    sizes = default_sizes(args.cpu, args.step, args.max_bytes)
    repeats = args.repeats or (3 if args.cpu else 9)
    warmup = 1 if args.cpu else 3
    out = args.out or prov.default_out("collectives", args.cpu)

    backend = prov.backend_for(args.cpu, args.world_size)
    from shardlab import Cluster
    from shardlab.results import format_collectives, summarize_collectives

    t_start = time.perf_counter()
    doc = prov.envelope("collectives", prov.capture(backend, args.world_size), {
        "ops": ops, "dtypes": dtypes, "sizes": sizes, "repeats": repeats, "warmup": warmup,
        "iters": {str(s): iterations(s, args.cpu) for s in sizes},
        "world_size": args.world_size, "timing": "cuda events around back-to-back calls; "
        "median over repeats of the slowest rank" if not args.cpu else "host clock (mock devices)",
        "check_bytes": 64 * KiB})
    doc["results"] = {"checks": [], "measurements": []}
    with Cluster(args.world_size, backend, timeout=300) as cluster:
        doc["provenance"]["devices"] = cluster.devices
        for op in ops:
            t0 = time.perf_counter()
            try:
                for dtype in dtypes:
                    checks = cluster.run(rank_check, op, 64 * KiB, dtype, timeout=120)
                    worst = {impl: max(c[impl] for c in checks) for impl in ("shardlab", "raw")}
                    tol = 0.0 if op in ("all_gather", "all_to_all", "send_recv") else 1e-2
                    ok = all(v <= tol for v in worst.values())
                    doc["results"]["checks"].append({"op": op, "dtype": dtype, "rel_err": worst,
                                                     "tolerance": tol, "ok": ok})
                    if not ok:
                        raise RuntimeError(f"{op} {dtype} gave wrong results: {worst}")
                per_rank = cluster.run(rank_measure, op, sizes, dtypes, repeats, warmup,
                                       args.cpu, timeout=300)
                doc["results"]["measurements"] += merge_ranks(per_rank, args.world_size)
            except Exception as e:  # noqa: BLE001 - keep the other collectives' numbers
                doc["errors"].append({"op": op, "error": f"{type(e).__name__}: {e}"[-4000:]})
                print(f"[collectives] {op} failed: {type(e).__name__}: {str(e)[-800:]}",
                      file=sys.stderr, flush=True)
            print(f"[collectives] {op}: {time.perf_counter() - t0:.1f} s", flush=True)
            prov.write(out, doc)  # partial results survive a later failure
    doc["config"]["seconds"] = time.perf_counter() - t_start
    try:
        doc["summary"] = summarize_collectives(doc)
    except Exception as e:  # noqa: BLE001
        doc["errors"].append({"op": "summary", "error": f"{type(e).__name__}: {e}"})
    doc["complete"] = not doc["errors"]
    prov.write(out, doc)
    if doc["summary"]:
        print(format_collectives(doc))
    print(f"[collectives] wrote {out} in {doc['config']['seconds']:.0f} s"
          + ("" if doc["complete"] else f" with {len(doc['errors'])} errors"))
    return 0 if doc["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
