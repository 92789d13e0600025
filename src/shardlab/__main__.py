"""`python -m shardlab info`: what devices shardlab sees and which backend it would use."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardlab")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report devices, backends and versions")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--probe", type=int, metavar="N", default=0,
                      help="also start N ranks and run one all-reduce on them")
    args = parser.parse_args(argv)

    from .runtime import device_report

    report = device_report()
    if args.probe:
        from . import runtime
        from .probes import allreduce_rank_sum

        with runtime.Cluster(args.probe) as cluster:
            sums = cluster.run(allreduce_rank_sum)
            report["probe"] = {"world_size": args.probe, "backend": cluster.backend,
                               "devices": cluster.devices, "all_reduce_of_ranks": sums,
                               "startup_seconds": round(cluster.startup_seconds, 3)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:>26}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
