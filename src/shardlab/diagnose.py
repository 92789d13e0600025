"""Turn the status reports of stuck ranks into one readable diagnosis.

When a call times out, the runtime asks every rank that has not finished where its main
thread is. Each answers with the collective it is inside (if it went through
`shardlab.comm`), how many collectives it had completed, and its Python stack, which also
shows raw `torch.distributed` calls.
"""

from __future__ import annotations

_SKIP = ("shardlab/runtime.py", "shardlab/comm.py", "torch/distributed", "contextlib.py",
         "threading.py", "multiprocessing/")


def _user_frame(stack: list[str]) -> str:
    """The innermost frame that belongs to the learner's code, as 'file:line: source'."""
    for entry in reversed(stack):
        first = entry.strip().splitlines()[0] if entry.strip() else ""
        if first and not any(s in first for s in _SKIP):
            lines = entry.strip().splitlines()
            where = first.replace('File "', "").replace('", line ', ":").split(", in ")[0]
            code = lines[1].strip() if len(lines) > 1 else ""
            return f"{where}: {code}" if code else where
    return "unknown location"


def _torch_call(stack: list[str]) -> str | None:
    """The torch.distributed function a rank is blocked in, if any (e.g. 'all_reduce')."""
    for entry in reversed(stack):
        first = entry.strip().splitlines()[0] if entry.strip() else ""
        if "torch/distributed" in first and ", in " in first:
            name = first.rsplit(", in ", 1)[1].strip()
            if not name.startswith("_") and name not in ("wrapper",):
                return name
    return None


def describe_wait(rank: int, report: dict | None) -> str:
    """One line per rank: 'rank 0 waits in all_reduce #3 on tp (16.0 KiB), after 2 completed'."""
    if report is None:
        return f"rank {rank}: did not answer (busy outside Python, or dead)"
    done = report.get("completed", 0)
    flight = report.get("in_flight")
    where = _user_frame(report.get("stack", []))
    if flight:
        from .comm import _fmt_bytes

        return (f"rank {rank} waits in {flight['op']} #{flight['index']} on {flight['group']} "
                f"({_fmt_bytes(flight['nbytes'])}), after {done} completed; at {where}")
    call = _torch_call(report.get("stack", []))
    if call:
        return (f"rank {rank} waits in torch.distributed.{call}, after {done} shardlab "
                f"collectives completed; at {where}")
    return f"rank {rank} is running (not in a collective), after {done} completed; at {where}"


def describe_waits(reports: dict[int, dict | None]) -> str:
    lines = [describe_wait(r, rep) for r, rep in sorted(reports.items())]
    return "Where each unfinished rank waits:\n  " + "\n  ".join(lines)
