"""Why ranks hang: a tracer inside every rank, and a diagnosis for the caller.

A collective finishes only when every rank of its group makes the *same* call: same
operation, same group, same sizes, in the same order. When they disagree, the ranks wait for
each other forever. This module lets the runtime say, when a call times out or a rank fails,
where every rank stands and what they disagree about:

    rank 0 waits in all_reduce #1 on world (4 B), after 0 completed; at shardlab/hangs.py:54 ...
    rank 1 waits in broadcast #1 on world (16 B, root rank 0), after 0 completed; at ...
    Verdict: the ranks disagree on call #1 on world: rank 0 calls all_reduce (4 B), ...

Worker side (in each rank process; the runtime calls `start_worker` and `reset`)
    `install()` wraps the collective functions of `torch.distributed` (the names in `TRACED`:
    all_reduce, broadcast, all_to_all_single, send, recv, new_group, ...) in a thin shim that
    notes the call -- operation, group, payload bytes, peer, split sizes, this rank's sequence
    number -- and then calls the original, unchanged. `shardlab.comm` calls the same
    functions, so shardlab and raw `torch.distributed` calls are counted in one sequence;
    for comm's calls the record takes comm's names (`all_gather`, group `tp`).
    Each call is also written to a *black box*: a small memory-mapped file that survives the
    rank, so a rank killed by a C++ abort (gloo kills a rank that receives more bytes than it
    expected) can still say which call it died in. On NCCL a blocking collective returns as
    soon as it is queued on the GPU, so the shim records a CUDA event after it: the call is
    "queued on the GPU, not finished" until that event completes.
    Cost: a few microseconds of Python per call (plus the event on NCCL). Set SHARDLAB_TRACE=0
    in the caller's environment before starting a Cluster to run without the shim (timings of
    tiny collectives).

Caller side
    The runtime asks every rank's side thread for `status_report()` (or reads the black box
    of a rank that cannot answer) and hands the reports to `describe_waits`, which writes one
    line per rank and a one-line verdict.

PyTorch's own tools work alongside: `Cluster(..., debug=True)` runs the ranks with
`TORCH_DISTRIBUTED_DEBUG=DETAIL`, which checks every collective's fingerprint (op, shapes,
dtypes) across ranks before running it and raises on a mismatch (a RankError here); with
`TORCH_FR_BUFFER_SIZE` set in the caller's environment the flight recorder keeps the last
collectives of every process group, and the diagnosis prints its oldest unfinished entry.
"""

from __future__ import annotations

import collections
import functools
import inspect
import marshal
import mmap
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import zlib

__all__ = [
    "TRACED", "install", "uninstall", "installed", "start_worker", "reset", "status_report",
    "snapshot", "worker_env", "new_trace_dir", "remove_trace_dir", "read_black_box",
    "describe_wait", "describe_waits", "verdict", "format_call",
]

# torch.distributed functions the shim wraps (those missing from a torch version are skipped).
TRACED = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
    "all_gather_single", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single",
    "gather", "scatter", "barrier", "monitored_barrier", "all_reduce_coalesced",
    "all_gather_coalesced", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list",
    "new_group", "new_subgroups", "new_subgroups_by_enumeration", "split_group",
)
_SENDS = ("send", "isend", "send_object_list")
_RECVS = ("recv", "irecv", "recv_object_list")
_GROUP_MAKERS = ("new_group", "new_subgroups", "new_subgroups_by_enumeration", "split_group")
_A2A = ("all_to_all", "all_to_all_single")

BLACK_BOX_BYTES = 1 << 16
# The black box: a header (payload length, its crc32, calls begun, calls returned) and a
# payload (the latest call begun, the latest failure, the groups created). A call writes the
# payload when it starts and only the counters when it returns: about two microseconds.
_HEADER = struct.Struct("<IIqq")


# =========================================================================== worker side

class _Tracer:
    """What this rank has called during the current `Cluster.run` (reset at each call)."""

    def __init__(self) -> None:
        self.groups: list = []  # members of every group this process created (never reset)
        self.box: mmap.mmap | None = None
        self.cuda = False  # NCCL: track GPU completion with events
        self.check_splits = False  # DETAIL mode: verify all-to-all split sizes across ranks
        self.free_events: list = []  # CUDA events that completed, for reuse
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.returned = 0  # calls whose Python function returned
        self.group_calls: dict = {}
        self.active: dict | None = None  # the call the main thread is inside
        self.last: dict | None = None  # the last call that returned
        self.failed: dict | None = None  # the last call that raised
        self.issued: collections.deque = collections.deque()  # (call, event or work) not yet seen done
        self.write_box()

    # -- the black box: the latest state, readable after this process is gone
    def write_box(self, latest: dict | None = None) -> None:
        box = self.box
        if box is None:
            return
        try:
            data = marshal.dumps({"latest": latest, "failed": self.failed, "groups": self.groups[-32:]})
        except ValueError:  # an unexpected type slipped into a record: keep the box readable
            return
        if len(data) > BLACK_BOX_BYTES - _HEADER.size:
            return
        box[_HEADER.size:_HEADER.size + len(data)] = data
        box[:_HEADER.size] = _HEADER.pack(len(data), zlib.crc32(data), self.calls, self.returned)

    def _count_box(self) -> None:
        if self.box is not None:
            struct.pack_into("<qq", self.box, 8, self.calls, self.returned)

    # -- one call
    def begin(self, op: str, names: tuple, args: tuple, kwargs: dict) -> tuple[dict, bool, dict]:
        self._prune()
        bound = dict(zip(names, args))
        bound.update(kwargs)
        call, on_cuda = _record(op, bound)
        self.calls += 1
        call["index"] = self.calls
        key = (call["group"], tuple(call["ranks"]))
        self.group_calls[key] = self.group_calls.get(key, 0) + 1
        call["gindex"] = self.group_calls[key]
        if op in _GROUP_MAKERS:
            self.groups.append(call.get("members"))
        self.active = call
        self.write_box(call)
        return call, on_cuda, bound

    def end(self, call: dict, on_cuda: bool, out) -> None:
        probe = _completion_probe(out, on_cuda and self.cuda)
        if probe is not None:
            if len(self.issued) < 4096:
                self.issued.append((call, probe))
        self.active = None
        self.last = call
        self.returned += 1
        self._count_box()

    def fail(self, call: dict, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [""])[0]
        self.active = None
        self.failed = dict(call, error=f"{type(exc).__name__}: {first[:160]}")
        self.write_box(call)

    def _prune(self) -> None:
        # Querying an event while this thread captures a CUDA graph invalidates the capture
        # (cudaErrorStreamCaptureInvalidated): leave the queue alone until the capture ends.
        if self.issued and self.cuda and _torch.cuda.is_current_stream_capturing():
            return
        while self.issued and _done(self.issued[0][1]):
            probe = self.issued.popleft()[1]
            if hasattr(probe, "query") and len(self.free_events) < 64:
                self.free_events.append(probe)

    def snapshot(self) -> dict:
        """The tracer's view right now; asks the GPU (or the work handles) what has finished."""
        # The oldest unfinished call is the one the rank waits in: work queued on a GPU
        # stream (or an async work handle) finishes in order, before the host's current call.
        waiting, on_device, unfinished = None, False, 0
        for call, probe in list(self.issued):
            if not _done(probe):
                unfinished += 1
                if waiting is None:
                    waiting, on_device = call, "gpu" if hasattr(probe, "query") else "async"
        if waiting is None:
            waiting = self.active
        done = self.returned - unfinished
        return {"call": waiting, "on_device": on_device, "calls": self.calls, "completed": done,
                "last": self.last, "failed": self.failed, "groups": list(self.groups)}


_TRACER = _Tracer()
_LOCAL = threading.local()  # nesting depth: all_gather_object calls all_gather, count it once
_ORIGINALS: dict[str, object] = {}
_GROUPS: dict[int, tuple] = {}  # id(group) -> (group, global ranks): looked up once per group
_torch = _dist = _comm = None  # bound by install(): no import on the hot path


def _done(probe) -> bool:
    try:
        if isinstance(probe, list):
            return all(_done(p) for p in probe)
        if hasattr(probe, "query"):  # torch.cuda.Event
            return bool(probe.query())
        return bool(probe.is_completed())  # a Work handle (async_op=True, isend, irecv)
    except Exception:  # noqa: BLE001 - a failed work is no longer pending
        return True


def _completion_probe(out, cuda: bool):
    """What tells us later whether this call has really finished (None: it already has)."""
    if out is not None:
        work = _dist.Work
        if isinstance(out, work):
            return out
        if isinstance(out, list) and out and all(isinstance(w, work) for w in out):
            return list(out)  # batch_isend_irecv
    if cuda:
        if _torch.cuda.is_current_stream_capturing():  # inside a CUDA graph: nothing to query
            return None
        free = _TRACER.free_events
        event = free.pop() if free else _torch.cuda.Event()
        event.record()  # a blocking NCCL call orders the current stream after the collective
        return event
    return None


def _tensor_bytes(value) -> tuple[int, bool]:
    """Bytes of a tensor or a list of tensors, and whether any lives on a GPU."""
    tensor = _torch.Tensor
    if isinstance(value, tensor):
        return value.nbytes, value.is_cuda
    if isinstance(value, (list, tuple)):
        total, cuda = 0, False
        for v in value:
            if isinstance(v, tensor):
                total += v.nbytes
                cuda = cuda or v.is_cuda
        return total, cuda
    return 0, False


def _group_of(group) -> tuple[str, list[int]]:
    """(name, global ranks) of a process group; shardlab.comm's names where it has them."""
    if group is None or group is _dist.group.WORLD:
        key = None
    elif group is _dist.GroupMember.NON_GROUP_MEMBER:
        return "a group this rank is not in", []
    else:
        key = id(group)
    hit = _GROUPS.get(key)
    if hit is None or (key is not None and hit[0] is not group):
        ranks = (list(range(_dist.get_world_size())) if key is None
                 else [int(r) for r in _dist.get_process_group_ranks(group)])
        hit = _GROUPS[key] = (group, ranks)
    name = "world" if key is None else _comm._group_names.get(key) or f"group{hit[1]}"
    return name, hit[1]


def _global_peer(group, peer, group_peer):
    if peer is None and group_peer is not None and group is not None:
        return int(_dist.get_global_rank(group, group_peer))
    return None if peer is None else int(peer)


def _record(op: str, a: dict) -> tuple[dict, bool]:
    """Describe one call from its bound arguments: never raises for odd input."""
    call: dict = {"op": op, "group": "world", "ranks": [], "nbytes": None, "via": "torch.distributed"}
    on_cuda = False
    try:
        if op in _GROUP_MAKERS:
            call["ranks"] = list(range(_dist.get_world_size()))  # every rank must make this call
            members = a.get("ranks")
            if op == "new_group":
                call["members"] = sorted(int(r) for r in members) if members is not None else call["ranks"]
            elif op == "new_subgroups_by_enumeration":
                call["members"] = [sorted(int(r) for r in g) for g in a.get("ranks_per_subgroup_list") or []]
            elif op == "new_subgroups":
                call["members"] = f"subgroups of size {a.get('group_size')}"
            else:
                call["members"] = [sorted(int(r) for r in g) for g in a.get("split_ranks") or []]
            return call, False
        if op == "batch_isend_irecv":
            ops = a.get("p2p_op_list") or []
            parts = []
            for p in ops:
                kind = getattr(getattr(p, "op", None), "__name__", str(getattr(p, "op", "?")))
                nbytes, cuda = _tensor_bytes(getattr(p, "tensor", None))
                on_cuda = on_cuda or cuda
                parts.append([kind, _global_peer(getattr(p, "group", None), getattr(p, "peer", None),
                                                 getattr(p, "group_peer", None)), nbytes])
            call["p2p"] = parts
            call["nbytes"] = sum(p[2] for p in parts)
            if ops:
                call["group"], call["ranks"] = _group_of(getattr(ops[0], "group", None))
            return call, on_cuda
        group = a.get("group")
        call["group"], call["ranks"] = _group_of(group)
        biggest = 0
        for value in a.values():
            nbytes, cuda = _tensor_bytes(value)
            if nbytes > biggest:
                biggest = nbytes
            on_cuda = on_cuda or cuda
        call["nbytes"] = biggest if biggest else (0 if op in ("barrier", "monitored_barrier") else None)
        if op in _SENDS:
            call["peer"] = _global_peer(group, a.get("dst"), a.get("group_dst"))
        elif op in _RECVS:
            call["peer"] = _global_peer(group, a.get("src"), a.get("group_src"))
        elif op in ("broadcast", "scatter", "broadcast_object_list", "scatter_object_list"):
            call["root"] = _global_peer(group, a.get("src"), a.get("group_src"))
        elif op in ("reduce", "gather", "gather_object"):
            call["root"] = _global_peer(group, a.get("dst"), a.get("group_dst"))
        elif op == "all_to_all_single":
            _a2a_single(call, a)
        elif op == "all_to_all":
            call["sends"] = [_tensor_bytes(t)[0] for t in a.get("input_tensor_list") or []]
            call["expects"] = [_tensor_bytes(t)[0] for t in a.get("output_tensor_list") or []]
            call["row_bytes"], call["unit"] = 1, "bytes"
    except Exception:  # noqa: BLE001 - a record with less detail beats a broken collective
        pass
    _from_comm(call)
    return call, on_cuda


def _a2a_single(call: dict, a: dict) -> None:
    inp, out = a.get("input"), a.get("output")
    p = max(len(call["ranks"]), 1)
    rows_in = int(inp.shape[0]) if inp is not None and inp.dim() else 0
    rows_out = int(out.shape[0]) if out is not None and out.dim() else 0
    row = inp.element_size() * (inp.numel() // rows_in) if rows_in else 0
    ins, outs = a.get("input_split_sizes"), a.get("output_split_sizes")
    call["sends"] = [int(s) for s in ins] if ins else [rows_in // p] * p
    call["expects"] = [int(s) for s in outs] if outs else [rows_out // p] * p
    call["row_bytes"], call["unit"] = row, "rows"


def _from_comm(call: dict) -> None:
    """Inside a shardlab.comm collective, use comm's name for the op and its payload bytes."""
    pending = _comm._in_flight  # set by comm for exactly the duration of its collective
    if pending is not None and call["op"] not in _GROUP_MAKERS:
        op, group, nbytes = pending[:3]
        call["op"], call["group"], call["nbytes"], call["via"] = (
            op, _comm.group_name(group), nbytes, "shardlab.comm")


def _shim(op: str, original, names: tuple):
    @functools.wraps(original)
    def traced(*args, **kwargs):
        depth = getattr(_LOCAL, "depth", 0)
        if depth:  # called from inside another traced function: counted there
            return original(*args, **kwargs)
        try:
            call, on_cuda, bound = _TRACER.begin(op, names, args, kwargs)
        except Exception:  # noqa: BLE001 - the tracer must never break a collective
            call, on_cuda, bound = None, False, {}
        _LOCAL.depth = depth + 1
        try:
            if op == "all_to_all_single" and _TRACER.check_splits and call is not None:
                _check_splits(original, call, bound)
            out = original(*args, **kwargs)
        except BaseException as exc:
            if call is not None:
                _TRACER.fail(call, exc)
            raise
        finally:
            _LOCAL.depth = depth
        if call is not None:
            try:
                _TRACER.end(call, on_cuda, out)
            except Exception:  # noqa: BLE001
                pass
        return out

    traced.__shardlab_traced__ = original
    return traced


def _check_splits(original, call: dict, a: dict) -> None:
    """DETAIL mode only: before an all_to_all_single, check that each rank expects from every
    peer exactly what that peer sends. PyTorch's fingerprint check compares tensor shapes,
    which agree here; a split mismatch would hang on gloo or corrupt data silently on NCCL.
    Costs one small all-to-all of the counts."""
    import torch

    sends, expects = call.get("sends"), call.get("expects")
    inp = a.get("input")
    if not sends or inp is None:
        return
    counts = torch.tensor(sends, dtype=torch.int64, device=inp.device)
    incoming = torch.empty_like(counts)
    original(incoming, counts, group=a.get("group"))  # the untraced original
    got = incoming.tolist()
    if got != list(expects):
        ranks = call.get("ranks") or list(range(len(got)))
        bad = "; ".join(f"rank {ranks[j]} sends {got[j]}, this rank expects {expects[j]}"
                        for j in range(len(got)) if got[j] != expects[j])
        raise ValueError(f"{call['op']} #{call.get('index')} on {call['group']}: the split sizes "
                         f"disagree ({bad}). Pass output_split_sizes equal to what each peer "
                         "sends: exchange the counts first (shardlab.comm.exchange_counts).")


def install() -> list[str]:
    """Wrap the collectives of torch.distributed in this process; returns the names wrapped.

    Both `torch.distributed.X` and `torch.distributed.distributed_c10d.X` are replaced, so
    `dist.all_reduce(...)`, shardlab.comm and torch's own helpers all go through the shim.
    Idempotent.
    """
    global _torch, _dist, _comm
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from . import comm

    _torch, _dist, _comm = torch, dist, comm
    wrapped = []
    for op in TRACED:
        original = getattr(c10d, op, None)
        if original is None or hasattr(original, "__shardlab_traced__"):
            continue
        try:
            names = tuple(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            continue
        shim = _shim(op, original, names)
        _ORIGINALS[op] = original
        setattr(c10d, op, shim)
        if getattr(dist, op, None) is original:
            setattr(dist, op, shim)
        wrapped.append(op)
    return wrapped


def uninstall() -> None:
    """Put the original torch.distributed functions back."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for op, original in _ORIGINALS.items():
        if getattr(c10d, op, None) is not original:
            setattr(c10d, op, original)
        if hasattr(getattr(dist, op, None), "__shardlab_traced__"):
            setattr(dist, op, original)
    _ORIGINALS.clear()


def installed() -> bool:
    import torch.distributed as dist

    return hasattr(dist.all_reduce, "__shardlab_traced__")


def start_worker(rank: int, backend: str) -> None:
    """Called by each rank before it joins the process group."""
    import torch.distributed as dist

    # The forkserver imported torch.distributed with its own environment: apply this rank's.
    set_level = getattr(dist, "set_debug_level_from_env", None)
    if set_level is not None and "TORCH_DISTRIBUTED_DEBUG" in os.environ:
        set_level()
    if os.environ.get("SHARDLAB_TRACE", "1") == "0":
        return
    install()
    _TRACER.cuda = backend == "nccl"
    _TRACER.check_splits = os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL"
    folder = os.environ.get("SHARDLAB_TRACE_DIR")
    if folder and os.path.isdir(folder):
        path = os.path.join(folder, f"rank{rank}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, BLACK_BOX_BYTES)
            _TRACER.box = mmap.mmap(fd, BLACK_BOX_BYTES)
        finally:
            os.close(fd)
    _TRACER.write_box()


def reset() -> None:
    """Start counting afresh: called by the runtime at the start of every call."""
    _TRACER.reset()


def snapshot() -> dict:
    return _TRACER.snapshot()


def _flight_recorder() -> list[dict] | None:
    """PyTorch's flight recorder, if it is on: the unfinished entries of each process group."""
    if not any(int(os.environ.get(k, "0") or 0) > 0
               for k in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")):
        return None
    import pickle

    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    c10d = __import__("torch._C._distributed_c10d", fromlist=["_"])
    names = ("_dump_nccl_trace", "_dump_fr_trace") if dist.get_backend() == "nccl" else ("_dump_fr_trace",)
    dump = None
    for name in names:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        try:
            # Without stack traces: symbolising them takes a second or more.
            dump = pickle.loads(fn(includeCollectives=True, includeStackTraces=False, onlyActive=False))
        except Exception:  # noqa: BLE001
            continue
        if dump and dump.get("entries"):
            break
    if not dump:
        return None
    status = dump.get("pg_status", {})
    out = []
    for e in dump.get("entries", []):
        pg_id = str(e.get("pg_id"))
        last_done = status.get(pg_id, {}).get("last_completed_collective", -1)
        seq = e.get("collective_seq_id", 0)
        if e.get("is_p2p"):
            seq = e.get("p2p_seq_id", seq)
            if e.get("state") == "completed":
                continue
        elif seq <= last_done or e.get("state") == "completed":
            continue
        pg = e.get("process_group") or ("", "")
        out.append({"name": e.get("profiling_name", "?"), "seq": seq,
                    "pg": pg[1] or pg[0] or f"pg {e.get('pg_id')}",
                    "sizes": e.get("input_sizes"), "state": e.get("state"),
                    "last_completed": last_done, "p2p": bool(e.get("is_p2p"))})
    return out


def status_report(frames) -> dict:
    """The side thread's answer: the tracer's view, the main thread's stack, the flight recorder.

    `frames` is the main thread's stack as `traceback.extract_stack` gives it.
    """
    from . import comm

    report: dict = {"answered": True,
                    "stack": [(f.filename, f.lineno, f.name, f.line or "") for f in frames],
                    "in_flight": comm.in_flight(), "completed": comm.completed_count()}
    if installed():
        report["trace"] = _TRACER.snapshot()
    try:
        report["flight_recorder"] = _flight_recorder()
    except Exception:  # noqa: BLE001
        report["flight_recorder"] = None
    return report


# =========================================================================== caller side

def worker_env(debug: bool, trace_dir: str | None) -> dict[str, str]:
    """Environment for the ranks of a Cluster: the black-box folder, and PyTorch's debug tools.

    `debug=True` turns on TORCH_DISTRIBUTED_DEBUG=DETAIL (collective fingerprint checks);
    otherwise the caller's own setting passes through, as does TORCH_FR_BUFFER_SIZE (the flight
    recorder: set it in the caller's environment before starting the Cluster).
    """
    env = {}
    if trace_dir:
        env["SHARDLAB_TRACE_DIR"] = trace_dir
    env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL" if debug else os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF")
    env["TORCH_FR_BUFFER_SIZE"] = os.environ.get("TORCH_FR_BUFFER_SIZE", "0")
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" in os.environ:  # the older name (torch < 2.9 NCCL builds)
        env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"]
    if "SHARDLAB_TRACE" in os.environ:
        env["SHARDLAB_TRACE"] = os.environ["SHARDLAB_TRACE"]
    return env


def new_trace_dir() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="shardlab-trace-", dir=base)


def remove_trace_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def read_black_box(trace_dir: str | None, rank: int) -> dict | None:
    """The last state a rank wrote before it died or stopped answering (None if none),
    in the form of `snapshot()`."""
    if not trace_dir:
        return None
    try:
        with open(os.path.join(trace_dir, f"rank{rank}"), "rb") as f:
            n, crc, calls, returned = _HEADER.unpack(f.read(_HEADER.size))
            data = f.read(n)
        if n == 0 or len(data) != n or zlib.crc32(data) != crc:
            return None
        box = marshal.loads(data)
    except (OSError, ValueError, EOFError, struct.error, TypeError):
        return None
    latest, failed = box.get("latest"), box.get("failed")
    raised = failed is not None and latest is not None and failed.get("index") == latest.get("index")
    inside = latest is not None and returned < calls and not raised
    return {"call": latest if inside else None, "calls": calls, "completed": returned,
            "last": latest if latest is not None and not inside and not raised else None,
            "failed": failed, "groups": box.get("groups") or []}


# --------------------------------------------------------------------------- formatting

def _fmt_bytes(n) -> str:
    from .comm import _fmt_bytes as fmt

    return fmt(n)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def format_call(call: dict, with_index: bool = True) -> str:
    """'all_reduce #3 on tp (16.0 KiB)', 'send #1 on world (64 B, to rank 1)', ..."""
    details = []
    op = call.get("op", "?")
    if op in _GROUP_MAKERS:
        members = call.get("members")
        details.append(f"ranks {members}" if isinstance(members, list) and members and
                       not isinstance(members[0], list) else str(members))
    elif call.get("nbytes") is not None:
        details.append(_fmt_bytes(call["nbytes"]))
    if op in _SENDS:
        details.append(f"to rank {call.get('peer')}")
    elif op in _RECVS:
        peer = call.get("peer")
        details.append("from any rank" if peer is None else f"from rank {peer}")
    elif call.get("root") is not None:
        details.append(f"root rank {call['root']}")
    if op in _A2A and "sends" in call:
        unit = call.get("unit", "rows")
        details.append(f"sends {unit} {call['sends']}, expects {call['expects']}")
    if call.get("p2p"):
        details.append(", ".join(f"{k} {'to' if 'send' in k else 'from'} rank {p}" for k, p, _ in call["p2p"]))
    number = f" #{call.get('index', '?')}" if with_index else ""
    tail = f" ({', '.join(details)})" if details else ""
    return f"{op}{number} on {call.get('group', '?')}{tail}"


_SKIP = ("shardlab/runtime.py", "shardlab/comm.py", "shardlab/diagnose.py", "torch/distributed",
         "contextlib.py", "threading.py", "multiprocessing/", "typing_extensions.py",
         "/warnings.py", "torch/utils/_contextlib.py")
_CELL = re.compile(r".*ipykernel_\d+[/\\]\d+\.py$")


def _short_path(path: str) -> str:
    """Paths that read the same on every machine: shardlab/hangs.py, torch/..., <cell>."""
    p = path.replace("\\", "/")
    if _CELL.match(p):
        return "<cell>"
    for marker in ("/site-packages/", "/src/shardlab/", "/shardlab/"):
        if marker in p:
            rest = p.rsplit(marker, 1)[1]
            return ("shardlab/" + rest) if "shardlab" in marker else rest
    return p


def _source_in_caller(name: str, lineno: int) -> tuple[str, str] | None:
    """A function defined in the caller's __main__ (a notebook cell, a script) runs in the
    ranks without its file; look its line up here, where the source is known."""
    import linecache
    import sys

    code = getattr(getattr(sys.modules.get("__main__"), name, None), "__code__", None)
    if code is None or lineno < code.co_firstlineno:
        return None
    line = linecache.getline(code.co_filename, lineno)
    return (code.co_filename, line) if line.strip() else None


def _user_frame(stack) -> str:
    """The innermost frame of the learner's code: 'shardlab/hangs.py:41 in fn: source'."""
    for entry in reversed(stack or []):
        if isinstance(entry, str):  # older reports: formatted traceback lines
            first = entry.strip().splitlines()[0] if entry.strip() else ""
            if not first or any(s in first for s in _SKIP):
                continue
            m = re.match(r'File "(.*)", line (\d+), in (.*)', first)
            if not m:
                continue
            lines = entry.strip().splitlines()
            filename, lineno, name = m.group(1), int(m.group(2)), m.group(3)
            code = lines[1].strip() if len(lines) > 1 else ""
        else:
            filename, lineno, name, code = entry
            if any(s in filename.replace("\\", "/") for s in _SKIP):
                continue
        if filename == "<dynamic-code>":  # shipped by value (cloudpickle drops the file name)
            filename, code = _source_in_caller(name, lineno) or (filename, code)
        where = f"{_short_path(filename)}:{lineno} in {name}"
        code = re.sub(r"\s+#[^'\"]*$", "", (code or "").strip())  # drop a trailing comment
        return f"{where}: {code}" if code else where
    return "unknown location"


def _signal_name(exitcode) -> str:
    if exitcode is None:
        return ""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGABRT": ", a C++ abort such as gloo's message-size check",
               "SIGKILL": ", killed", "SIGSEGV": ", a crash in native code"}.get(name, "")
        return f"exit code {exitcode}: {name}{why}"
    return f"exit code {exitcode}"


# --------------------------------------------------------------------------- one rank

def _view(report: dict | None) -> dict:
    """Normalise a report: where the rank is ('call'), what it finished ('last'), its state."""
    report = dict(report or {})
    state = report.get("state", "waiting")
    trace = report.get("trace")
    box = report.get("black_box")
    v = {"state": state, "answered": report.get("answered", "stack" in report), "call": None, "last": None,
         "completed": report.get("completed", 0), "groups": None, "on_device": False,
         "failed": None, "stack": report.get("stack", []), "exitcode": report.get("exitcode"),
         "from_box": False, "flight_recorder": report.get("flight_recorder")}
    source = trace if trace is not None else box
    if trace is None and box is not None:
        v["from_box"] = True
    if source is not None:
        v.update(call=source.get("call"), last=source.get("last"), failed=source.get("failed"),
                 groups=source.get("groups"), on_device=source.get("on_device", False))
        calls = source.get("calls", 0)
        v["completed"] = source.get("completed", calls - (1 if source.get("call") else 0))
        v["calls"] = calls
    elif report.get("in_flight"):  # tracer off: shardlab.comm's own record
        f = report["in_flight"]
        v["call"] = {"op": f["op"], "index": f["index"], "group": f["group"], "nbytes": f["nbytes"],
                     "ranks": [], "via": "shardlab.comm"}
    if state in ("failed", "dead") and v["call"] is None and v["failed"] is not None:
        if v["failed"].get("index") == v.get("calls"):  # it failed in its latest call
            v["call"] = v["failed"]
    if state == "finished":
        v["call"] = None
    return v


def describe_wait(rank: int, report: dict | None) -> str:
    """One line for one rank: where it waits, how many collectives it completed, and where."""
    if report is None:
        return f"rank {rank}: did not answer (busy outside Python, or dead)"
    v = _view(report)
    done = v["completed"]
    where = _user_frame(v["stack"])
    call = v["call"]
    state = v["state"]
    if state == "dead":
        died = f"rank {rank} died ({_signal_name(v['exitcode'])})"
        if call:
            return f"{died} in {format_call(call)}, after {done} completed"
        last = f"; its last call: {format_call(v['last'])}" if v["last"] else ""
        return f"{died} outside any collective, after {done} completed{last}"
    if state == "failed":
        if call:
            return (f"rank {rank} raised in {format_call(call)}, after {done} completed "
                    f"({call.get('error', 'see its traceback').split(':')[0]}; see its traceback)")
        return f"rank {rank} raised outside any collective, after {done} completed (see its traceback)"
    if state == "finished":
        last = f"; its last call: {format_call(v['last'])}" if v["last"] else ""
        return f"rank {rank} finished its function, after {done} completed{last}"
    if not v["answered"]:
        if v["from_box"] and call:
            return (f"rank {rank} did not answer (busy outside Python); its last record: in "
                    f"{format_call(call)}, after {done} completed")
        return f"rank {rank}: did not answer (busy outside Python, or dead)"
    if call:
        gpu = {"gpu": "; queued on the GPU, not finished",
               "async": "; returned a work handle, not finished"}.get(v["on_device"] or "", "")
        if v["on_device"] is True:  # older reports
            gpu = "; queued on the GPU, not finished"
        text = format_call(call)
        if gpu:
            text = text[:-1] + gpu + ")" if text.endswith(")") else text + f" ({gpu[2:]})"
        return f"rank {rank} waits in {text}, after {done} completed; at {where}"
    return f"rank {rank} is running (not in a collective), after {done} completed; at {where}"


# --------------------------------------------------------------------------- the verdict

def _short(rank: int, v: dict) -> str:
    """Where a rank is, as a clause: 'waits in broadcast #1 on world (16 B)'."""
    if v["state"] == "dead":
        return "died" + (f" in {format_call(v['call'])}" if v["call"] else "")
    if v["state"] == "failed":
        return "raised" + (f" in {format_call(v['call'])}" if v["call"] else " an error first (see its traceback)")
    if v["state"] == "finished":
        return "finished its function" + (f" (its last call: {format_call(v['last'])})" if v["last"] else
                                          " without calling any collective")
    if v["call"]:
        return f"waits in {format_call(v['call'])}"
    if not v["answered"]:
        return "did not answer"
    return f"is running its own code, at {_user_frame(v['stack'])}"


def _key(call: dict) -> tuple:
    return call.get("group"), tuple(call.get("ranks") or ())


def _groups_verdict(views: dict[int, dict]) -> str | None:
    lists = {r: [tuple(m) if isinstance(m, list) else m for m in v["groups"]]
             for r, v in views.items() if v["groups"] is not None}
    ranks = sorted(lists)
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            la, lb = lists[a], lists[b]
            n = min(len(la), len(lb))
            if la[:n] != lb[:n]:
                def show(gs):
                    return ", ".join(str(list(g)) if isinstance(g, tuple) else str(g) for g in gs) or "none"
                who = "; ".join(f"rank {r} created {show(lists[r])}" for r in ranks)
                return (f"the ranks created different process groups ({who}). Every rank must call "
                        "new_group for every group, in the same order, even for groups it is not "
                        "a member of.")
    return None


def _p2p_parts(call: dict | None) -> list[tuple[str, int | None, int | None]]:
    """A call's point-to-point intents: [("send" or "recv", peer, bytes), ...]."""
    if not call:
        return []
    op = call.get("op")
    if op in _SENDS:
        return [("send", call.get("peer"), call.get("nbytes"))]
    if op in _RECVS:
        return [("recv", call.get("peer"), call.get("nbytes"))]
    if op == "batch_isend_irecv":
        return [("send" if "send" in kind else "recv", peer, nbytes)
                for kind, peer, nbytes in call.get("p2p") or []]
    return []


def _p2p_verdict(r: int, call: dict, views: dict[int, dict]) -> str | None:
    for direction, peer, nbytes in _p2p_parts(call):
        if peer is None or peer not in views:
            continue
        pv = views[peer]
        theirs = _p2p_parts(pv["call"])
        opposite = "recv" if direction == "send" else "send"
        match = [p for p in theirs if p[0] == opposite and p[1] in (r, None)]
        if match:
            other = match[0][2]
            if nbytes is not None and other is not None and nbytes != other:
                s, d, sb, rb = (r, peer, nbytes, other) if direction == "send" else (peer, r, other, nbytes)
                return (f"rank {s} sends {_fmt_bytes(sb)} to rank {d}, which receives "
                        f"{_fmt_bytes(rb)}: a send and its recv must have the same size.")
            continue
        size = f"{_fmt_bytes(nbytes)} " if nbytes is not None else ""
        if direction == "send" and any(p[0] == "send" and p[1] == r for p in theirs):
            return (f"ranks {min(r, peer)} and {max(r, peer)} both send to each other and neither "
                    "receives: a blocking send waits for its matching recv. Let one rank receive "
                    "first, or post both sides at once with isend/irecv (batch_isend_irecv).")
        if direction == "send":
            return (f"rank {r} sends {size}to rank {peer} ({_label(call)}), but rank {peer} is not "
                    f"receiving from rank {r}: it {_short(peer, pv)}. Every send needs a matching "
                    "recv on its peer, in the same order.")
        return (f"rank {r} waits to receive {size}from rank {peer} ({_label(call)}), but rank "
                f"{peer} is not sending to rank {r}: it {_short(peer, pv)}. Every recv needs a "
                "matching send on its peer, in the same order.")
    return None


def _a2a_verdict(call: dict, present: dict[int, dict]) -> str | None:
    members = list(call.get("ranks") or ())
    if not all("sends" in c and "expects" in c for c in present.values()):
        return None
    problems = []
    for i, a in enumerate(members):
        for j, b in enumerate(members):
            if a == b or a not in present or b not in present:
                continue
            ca, cb = present[a], present[b]
            if j >= len(ca["sends"]) or i >= len(cb["expects"]):
                continue
            ra, rb = ca.get("row_bytes", 1), cb.get("row_bytes", 1)
            sent, expected = ca["sends"][j], cb["expects"][i]
            if sent * ra != expected * rb:
                if ca.get("unit") == cb.get("unit") == "rows" and ra == rb:
                    problems.append(f"rank {a} sends {_rows(sent)} to rank {b}, which expects {expected}")
                else:
                    problems.append(f"rank {a} sends {_fmt_bytes(sent * ra)} to rank {b}, which "
                                    f"expects {_fmt_bytes(expected * rb)}")
    if not problems:
        return None
    return (f"the split sizes of {_label(call)} disagree: "
            + "; ".join(problems) + ". Each rank's output split sizes must equal what its peers "
            "send it: exchange the counts first (shardlab.comm.exchange_counts, or pass "
            "output_split_sizes=None to comm.all_to_all).")


def _collective_verdict(r: int, call: dict, views: dict[int, dict]) -> str | None:
    key = _key(call)
    members = [m for m in (call.get("ranks") or ()) if m in views]
    present: dict[int, dict] = {}
    for m in members:
        c = views[m]["call"]
        if c and _key(c) == key and not _p2p_parts(c):
            present[m] = c
            continue
        last = views[m]["last"]  # a rank may already be through its side of this call
        if c is None and last and _key(last) == key and last.get("gindex") == call.get("gindex"):
            present[m] = last
    absent = [m for m in members if m not in present]
    label = format_call(call)
    if absent:
        where = "; ".join(f"rank {m} {_short(m, views[m])}" for m in absent)
        waiting = sorted(present)
        return (f"{_ranks(absent)} never reached {label}, which {_ranks(waiting)} "
                f"{'waits' if len(waiting) == 1 else 'wait'} in: {where}. A collective must be "
                "called by every rank of its group: look for it under a condition on the rank.")
    ops = {m: c.get("op") for m, c in present.items()}
    gidx = {m: c.get("gindex") for m, c in present.items()}
    group = call.get("group")
    if len(set(gidx.values())) > 1:
        parts = ", ".join(f"rank {m} at #{present[m].get('gindex')} ({present[m].get('op')})" for m in sorted(present))
        most = max(present, key=lambda m: present[m].get("gindex") or 0)
        return (f"the ranks are at different calls on {group}: {parts}. Rank {most} made more "
                f"calls on {group} before this one: look for a collective that only some ranks make.")
    if len(set(ops.values())) > 1:
        parts = ", ".join(f"rank {m} calls {format_call(present[m], with_index=False).split(' on ')[0]}"
                          f"{_size_of(present[m])}" for m in sorted(present))
        return (f"the ranks disagree on call #{call.get('gindex')} on {group}: {parts}. Every rank "
                "of a group must make the same collectives in the same order: look for a "
                "collective that only some ranks reach, or calls made in different orders.")
    if call.get("op") in _A2A:
        v = _a2a_verdict(call, present)
        if v:
            return v
    sizes = {m: c.get("nbytes") for m, c in present.items()}
    if call.get("op") not in _A2A and len({s for s in sizes.values() if s is not None}) > 1:
        parts = ", ".join(f"rank {m} {_fmt_bytes(sizes[m])}" for m in sorted(present) if sizes[m] is not None)
        return (f"the ranks call {call.get('op')} #{call.get('gindex')} on {group} with different "
                f"sizes ({parts}): the tensors must have the same shape on every rank, or the "
                "calls are made in different orders.")
    roots = {c.get("root") for c in present.values()}
    if len(roots) > 1:
        parts = ", ".join(f"rank {m} root {present[m].get('root')}" for m in sorted(present))
        return f"the ranks name different roots for {call.get('op')} on {group} ({parts})."
    return None


def _label(call: dict) -> str:
    return f"{call.get('op')} #{call.get('index')} on {call.get('group')}"


def _size_of(call: dict) -> str:
    return f" ({_fmt_bytes(call['nbytes'])})" if call.get("nbytes") is not None else ""


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def verdict(reports: dict[int, dict | None]) -> str | None:
    """One sentence on what the ranks disagree about (None when there is nothing to say)."""
    views = {r: _view(rep) for r, rep in reports.items() if rep is not None}
    if not views:
        return None
    v = _groups_verdict(views)
    if v:
        return v
    stuck = {r: x["call"] for r, x in views.items() if x["call"]}
    for r in sorted(stuck):
        call = stuck[r]
        if _p2p_parts(call):
            v = _p2p_verdict(r, call, views)
        elif call.get("op") in _GROUP_MAKERS or call.get("ranks"):
            v = _collective_verdict(r, call, views)
        else:
            v = None
        if v:
            return v
    waiting = [r for r, x in views.items() if x["state"] == "waiting"]
    if not stuck:
        if waiting:
            return (f"no rank is inside a collective: {_ranks(sorted(waiting))} "
                    f"{'is' if len(waiting) == 1 else 'are'} still running their own code (see "
                    "where above): slow work or an endless loop, not a mismatch.")
        return None
    if any(views[r]["state"] == "waiting" for r in stuck):
        return ("every rank waits in the same call with matching arguments: no disagreement "
                "is visible. The call may just be slow (pass a larger timeout=), or stuck "
                "inside the backend.")
    return None


def _flight_lines(reports: dict[int, dict | None]) -> list[str]:
    lines = []
    for r, rep in sorted(reports.items()):
        entries = (rep or {}).get("flight_recorder")
        if entries is None:
            continue
        if not entries:
            lines.append(f"rank {r}: no unfinished entry")
            continue
        e = entries[0]
        kind = "p2p" if e.get("p2p") else "collective"
        lines.append(f"rank {r}: {e['name']} ({kind} seq {e['seq']} on {e['pg']}, sizes "
                     f"{e['sizes']}, {e['state']}; last completed seq {e['last_completed']})"
                     + (f", and {len(entries) - 1} more" if len(entries) > 1 else ""))
    return lines


def describe_waits(reports: dict[int, dict | None]) -> str:
    """The diagnosis: one line per rank, a verdict, and the flight recorder's view if it is on."""
    lines = [describe_wait(r, rep) for r, rep in sorted(reports.items())]
    text = "Where each rank stands:\n  " + "\n  ".join(lines)
    v = verdict(reports)
    if v:
        text += f"\nVerdict: {v}"
    flight = _flight_lines(reports)
    if flight:
        text += ("\nPyTorch's flight recorder, oldest unfinished entry per rank (its seq counts "
                 "from the group's creation):\n  " + "\n  ".join(flight))
    return text
