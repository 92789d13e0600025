"""Run one function on many ranks: real GPUs with NCCL, or mock devices with gloo.

Every rank runs the same function (SPMD) and asks `rank()` / `world_size()` / `device()`
where it stands. `launch` runs a function once on a fresh set of ranks; `Cluster` keeps the
ranks alive between calls so that a notebook pays the process start-up once.

Process model: the caller hosts the rendezvous `TCPStore` on a port the OS picks (so no
two launches race for a port), then starts one worker process per rank. Each worker joins
the process group, reports "ready", and then serves calls sent down a pipe. A second pipe
answers "where are you?" from a side thread, so a rank stuck inside a collective can still
say where it waits. Any failure, timeout or interrupt kills every worker: nothing is left
behind. Under `torchrun` no processes are started: the function runs in place.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable

import cloudpickle

DEFAULT_TIMEOUT = 60.0  # seconds a call may take before it is declared hung
INIT_TIMEOUT = 60.0  # seconds for all ranks to join the process group
INIT_ATTEMPTS = 3  # gloo's full-mesh connect can fail on a loaded machine: retry
ERROR_GRACE = 1.0  # after a rank raises, wait this long for its peers' own errors
MAX_MOCK_RANKS = 32  # each mock device is a full CPU process

__all__ = [
    "launch", "Cluster", "RankContext", "RankError", "RankTimeout",
    "rank", "world_size", "device", "device_name", "backend", "context",
    "resolve_backend", "under_torchrun", "device_report",
]


# --------------------------------------------------------------------------- rank context

@dataclasses.dataclass(frozen=True)
class RankContext:
    """Where this process stands: its rank, the world, and the device it computes on."""

    rank: int
    world_size: int
    backend: str  # "nccl" or "gloo"
    device: str  # a torch device string: "cuda:1" or "cpu"
    device_name: str  # what a notebook prints: "cuda:1 (NVIDIA H100 80GB HBM3)" or "mock-gpu:1"


_CONTEXT: RankContext | None = None


def context() -> RankContext:
    """The rank context of the calling process (only inside a rank function)."""
    if _CONTEXT is None:
        raise RuntimeError(
            "no rank context: call this inside a function run by shardlab.launch or "
            "Cluster.run (or under torchrun)"
        )
    return _CONTEXT


def rank() -> int:
    return context().rank


def world_size() -> int:
    return context().world_size


def backend() -> str:
    return context().backend


def device():
    """The torch device this rank computes on (a GPU, or the CPU behind a mock device)."""
    import torch

    return torch.device(context().device)


def device_name() -> str:
    return context().device_name


# --------------------------------------------------------------------------- errors

class RankError(RuntimeError):
    """A rank raised. `.rank` is the first rank that failed, `.tracebacks` maps rank -> text."""

    def __init__(self, tracebacks: dict[int, str], diagnosis: str = ""):
        self.tracebacks = dict(sorted(tracebacks.items()))
        self.rank = next(iter(self.tracebacks))
        self.diagnosis = diagnosis
        parts = [f"rank {r} failed:\n{tb.rstrip()}" for r, tb in self.tracebacks.items()]
        if diagnosis:
            parts.append(diagnosis)
        super().__init__("\n\n".join(parts))


class RankTimeout(TimeoutError):
    """Some ranks did not finish in time: usually a collective that a peer never called."""

    def __init__(self, timeout: float, pending: list[int], diagnosis: str):
        self.timeout = timeout
        self.pending = pending
        self.diagnosis = diagnosis
        super().__init__(
            f"ranks {pending} did not finish within {timeout:g} s; all ranks were stopped.\n"
            f"{diagnosis}\nIf the work is just slow, pass a larger timeout=."
        )


# --------------------------------------------------------------------------- backends

def under_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK etc.)."""
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(world_size: int, backend: str = "auto") -> str:
    """'auto' -> 'nccl' when at least `world_size` GPUs are present, else 'gloo' (mock devices)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"unknown backend {backend!r}: use 'auto', 'nccl' or 'gloo'")
    gpus = _gpu_count()
    if backend == "auto":
        backend = "nccl" if gpus >= world_size else "gloo"
    if backend == "nccl" and gpus < world_size:
        raise ValueError(
            f"world_size={world_size} with backend='nccl' needs {world_size} GPUs, found {gpus}: "
            f"use backend='gloo' (mock devices) or world_size <= {gpus}"
        )
    if backend == "gloo" and world_size > MAX_MOCK_RANKS:
        raise ValueError(
            f"world_size={world_size} is more mock devices than allowed ({MAX_MOCK_RANKS}): each is "
            "a CPU process; use the meta device and shardlab.memory for larger layouts"
        )
    return backend


def _loopback_ifname() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


# --------------------------------------------------------------------------- worker side

def _die_with_parent(caller_pid: int) -> None:
    """Never outlive the caller, even if it is killed with SIGKILL.

    A rank's OS parent is the forkserver, which exits with the caller; PDEATHSIG turns
    that into a kill. The watch thread also checks the caller itself, for platforms
    without PDEATHSIG.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    parent = os.getppid()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def watch() -> None:
        while True:
            if os.getppid() != parent or gone(caller_pid):
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="shardlab-parent-watch").start()


def _answer_status(ctl, main_ident: int) -> None:
    """Side thread: report where the main thread is, even while it blocks in a collective.

    The answer (see `diagnose.status_report`) holds the call this rank waits in and how many
    it completed, as the torch.distributed shim saw them, the main thread's Python stack, and
    PyTorch's flight recorder entries when that is on.
    """
    from . import diagnose

    while True:
        try:
            msg = ctl.recv()
        except (EOFError, OSError):
            return
        if msg != "status":
            continue
        try:
            frame = sys._current_frames().get(main_ident)
            frames = traceback.extract_stack(frame) if frame is not None else []
            del frame
            report = diagnose.status_report(frames)
        except Exception:  # noqa: BLE001 - an answer with less in it beats no answer
            report = {"answered": True, "stack": [], "error": traceback.format_exc()}
        try:
            ctl.send(report)
        except (OSError, ValueError):
            return


def _to_cpu(obj: Any) -> Any:
    """Move tensors in a result to the CPU so that the caller can unpickle them anywhere."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _worker_main(rank_: int, world: int, backend_: str, host: str, port: int,
                 conn, ctl, parent_pid: int, init_timeout: float, call_timeout: float,
                 threads: int, env: dict[str, str]) -> None:
    global _CONTEXT
    os.environ.update(env)
    _die_with_parent(parent_pid)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        from . import diagnose

        diagnose.start_worker(rank_, backend_)  # debug level from env, collective tracer
        store = dist.TCPStore(host, port, is_master=False,
                              timeout=datetime.timedelta(seconds=init_timeout))
        if backend_ == "nccl":
            local = rank_ % torch.cuda.device_count()
            torch.cuda.set_device(local)
            dev, name = f"cuda:{local}", f"cuda:{local} ({torch.cuda.get_device_name(local)})"
        else:
            dev, name = "cpu", f"mock-gpu:{rank_}"
        # The collective timeout makes a stuck rank raise by itself too; the caller's own
        # timeout (usually shorter) is what the learner sees.
        dist.init_process_group(backend_, store=store, rank=rank_, world_size=world,
                                timeout=datetime.timedelta(seconds=max(call_timeout, 5) * 2))
        # One collective proves the full mesh is connected before we say "ready".
        probe = torch.ones(1, device=dev)
        dist.all_reduce(probe)
        if int(probe.item()) != world:
            raise RuntimeError(f"rendezvous probe summed to {probe.item()}, expected {world}")
        _CONTEXT = RankContext(rank_, world, backend_, dev, name)
    except BaseException:  # noqa: BLE001 - report anything, the caller retries
        conn.send(("init-error", traceback.format_exc()))
        return
    threading.Thread(target=_answer_status, args=(ctl, threading.get_ident()),
                     daemon=True, name="shardlab-status").start()
    conn.send(("ready", name))
    from . import comm

    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            break
        if payload == b"stop":
            break
        comm.reset_counters()
        diagnose.reset()
        try:
            fn, args, kwargs = cloudpickle.loads(payload)
            out = ("ok", _to_cpu(fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the caller re-raises it with the rank number
            out = ("error", traceback.format_exc())
        try:
            data = cloudpickle.dumps(out)
        except Exception:  # noqa: BLE001
            data = cloudpickle.dumps(("error", "the rank function's result could not be "
                                      "pickled:\n" + traceback.format_exc()))
        conn.send_bytes(data)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- caller side

_LIVE: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for cluster in list(_LIVE):
        cluster.shutdown()


@contextlib.contextmanager
def _without_main_module():
    """Start processes without re-running the caller's __main__ in them.

    multiprocessing's spawn and forkserver re-import the main script in every child, which
    runs a learner's script (and its Cluster(...)) again unless it has an
    `if __name__ == "__main__"` guard. Rank functions travel by value (cloudpickle), so
    the children never need __main__.
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        for key in ("init_main_from_path", "init_main_from_name", "main_path"):
            data.pop(key, None)
        return data

    spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _mp_context():
    # forkserver: torch is imported once in the server and each rank forks from it, which
    # makes a cold start several times faster than spawn; it never touches CUDA, so NCCL
    # ranks initialise CUDA fresh after the fork.
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "shardlab.comm"])
        return ctx
    return mp.get_context("spawn")


class Cluster:
    """`world_size` ranks kept alive between calls.

    >>> with Cluster(4) as cluster:                     # doctest: +SKIP
    ...     cluster.run(my_rank_function, x)            # one result per rank

    `backend="auto"` picks NCCL when there are enough GPUs and mock devices otherwise.
    After a failure or timeout the ranks are stopped; the next `run` starts fresh ones.
    `debug=True` runs the ranks with TORCH_DISTRIBUTED_DEBUG=DETAIL: PyTorch checks that the
    ranks agree on each collective before running it, and a mismatch raises at once (a
    RankError). A timeout or failure reports where every rank stands (`shardlab.diagnose`).
    """

    def __init__(self, world_size: int, backend: str = "auto", *, timeout: float = DEFAULT_TIMEOUT,
                 host: str = "127.0.0.1", start: bool = True, debug: bool = False):
        self.backend = resolve_backend(world_size, backend)
        self.world_size = world_size
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.host = host
        self.devices: list[str] = []
        self.startup_seconds: float | None = None
        self._procs: list = []
        self._conns: list = []
        self._ctls: list = []
        self._store = None
        self.debug = bool(debug)
        self._trace_dir: str | None = None  # the ranks' black boxes (shardlab.diagnose)
        self._inline = under_torchrun()
        _LIVE.add(self)
        if start:
            self.start()

    # -- lifecycle
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> "Cluster":
        if self._inline:
            _init_torchrun(self.world_size, self.backend)
            self.devices = [device_name()]
            return self
        if self.alive:
            return self
        t0 = time.perf_counter()
        errors = []
        for attempt in range(INIT_ATTEMPTS):
            ok, err = self._start_once()
            if ok:
                self.startup_seconds = time.perf_counter() - t0
                return self
            errors.append(err)
        raise RuntimeError(
            f"could not start {self.world_size} {self.backend} ranks after {INIT_ATTEMPTS} "
            "attempts; last error:\n" + errors[-1]
        )

    def _start_once(self) -> tuple[bool, str]:
        import torch.distributed as dist

        store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=INIT_TIMEOUT))
        ctx = _mp_context()
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        # Set in each rank (not here): forkserver children inherit the server's environment.
        env = {}
        if self.host.startswith("127.") or self.host == "localhost":
            env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", _loopback_ifname())
        from .diagnose import new_trace_dir, worker_env

        self._trace_dir = new_trace_dir()
        env.update(worker_env(self.debug, self._trace_dir))
        try:
            with _without_main_module():
                for r in range(self.world_size):
                    parent_conn, child_conn = ctx.Pipe()
                    parent_ctl, child_ctl = ctx.Pipe()
                    p = ctx.Process(
                        target=_worker_main, daemon=True, name=f"shardlab-rank{r}",
                        args=(r, self.world_size, self.backend, self.host, store.port,
                              child_conn, child_ctl, os.getpid(), INIT_TIMEOUT, self.timeout,
                              threads, env))
                    p.start()
                    child_conn.close()
                    child_ctl.close()
                    self._procs.append(p)
                    self._conns.append(parent_conn)
                    self._ctls.append(parent_ctl)
        except BaseException:
            self._kill()
            raise
        names: dict[int, str] = {}
        deadline = time.monotonic() + INIT_TIMEOUT
        try:
            while len(names) < self.world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                    return False, f"ranks {sorted(set(range(self.world_size)) - set(names))} did not join in time"
                waiting = {self._conns[r]: r for r in range(self.world_size) if r not in names}
                for c in mpc.wait(list(waiting), timeout=left):
                    r = waiting[c]
                    try:
                        status, value = c.recv()
                    except (EOFError, OSError):
                        status, value = "init-error", f"rank {r} exited during start-up"
                    if status != "ready":
                        self._kill()
                        return False, value
                    names[r] = value
        except BaseException:
            self._kill()
            raise
        # The store stays alive with the ranks: new_group() rendezvous through it later.
        self._store = store
        self.devices = [names[r] for r in range(self.world_size)]
        return True, ""

    def shutdown(self) -> None:
        """Stop every rank (politely, then by force). Safe to call twice."""
        for c in self._conns:
            try:
                c.send_bytes(b"stop")
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        for c in self._conns + self._ctls:
            c.close()
        self._procs, self._conns, self._ctls = [], [], []
        self._store = None
        if getattr(self, "_trace_dir", None):
            from .diagnose import remove_trace_dir

            remove_trace_dir(self._trace_dir)
            self._trace_dir = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        state = "alive" if self.alive or self._inline else "stopped"
        return f"Cluster(world_size={self.world_size}, backend={self.backend!r}, {state})"

    # -- calls
    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the per-rank results in rank order.

        Raises `RankError` (with each failing rank's traceback) if a rank raises, and
        `RankTimeout` (with where each rank waits) if the call outlasts `timeout` seconds.
        Either way every rank is stopped; the next call starts fresh ones.
        """
        if self._inline:
            return _run_inline(fn, args, kwargs)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        timeout = self.timeout if timeout is None else float(timeout)
        self.start()
        payload = cloudpickle.dumps((fn, args, kwargs))
        n = self.world_size
        results: list = [None] * n
        errors: dict[int, str] = {}
        pending = set(range(n))
        deadline = time.monotonic() + timeout
        first_error: float | None = None
        try:
            for c in self._conns:
                c.send_bytes(payload)
            while pending:
                until = deadline if first_error is None else min(deadline, first_error + ERROR_GRACE)
                left = until - time.monotonic()
                if left <= 0:
                    break
                by_obj = {}
                for r in pending:
                    by_obj[self._conns[r]] = r
                    by_obj[self._procs[r].sentinel] = r
                for obj in mpc.wait(list(by_obj), timeout=left):
                    r = by_obj[obj]
                    if r not in pending:
                        continue
                    conn = self._conns[r]
                    if obj is conn or conn.poll():
                        try:
                            status, value = cloudpickle.loads(conn.recv_bytes())
                        except (EOFError, OSError):
                            status, value = "error", self._death_note(r)
                    else:
                        status, value = "error", self._death_note(r)
                    pending.discard(r)
                    if status == "ok":
                        results[r] = value
                    else:
                        errors[r] = value
                        first_error = first_error or time.monotonic()
        except BaseException:  # KeyboardInterrupt from a notebook cell: leave nothing behind
            self._kill()
            raise
        if errors or pending:
            diagnosis = self._diagnose(sorted(pending), errors)
            self._kill()
            if errors:
                raise RankError(errors, diagnosis)
            raise RankTimeout(timeout, sorted(pending), diagnosis)
        return results

    def _death_note(self, r: int) -> str:
        p = self._procs[r]
        p.join(timeout=1)
        return f"rank {r} process exited unexpectedly (exit code {p.exitcode})"

    def _diagnose(self, ranks: list[int], errors: dict[int, str] | None = None) -> str:
        """Ask every rank where it stands and say what the ranks disagree about.

        `ranks` are the ranks still running, `errors` those that failed. Each live rank's side
        thread answers even while its main thread blocks in a collective; a rank that died or
        cannot answer is read from its black box. Returns "" when no collective is involved
        (a plain exception in one rank needs only its traceback).
        """
        from .diagnose import describe_waits, read_black_box

        errors = errors or {}
        reports: dict[int, dict] = {}
        for r, proc in enumerate(self._procs):
            report = None
            if proc.is_alive():
                try:
                    self._ctls[r].send("status")
                    report = self._ctls[r].recv() if self._ctls[r].poll(1.0) else None
                except (OSError, EOFError, ValueError):
                    report = None
            report = dict(report or {"answered": False})
            if not report.get("answered") or not proc.is_alive():
                report["black_box"] = read_black_box(self._trace_dir, r)
            report["exitcode"] = proc.exitcode
            report["state"] = ("dead" if proc.exitcode is not None else "waiting" if r in ranks
                               else "failed" if r in errors else "finished")
            reports[r] = report
        in_collective = any(
            (rep.get("trace") or rep.get("black_box") or {}).get("call")
            or (rep.get("trace") or rep.get("black_box") or {}).get("failed")
            for rep in reports.values())
        if not ranks and not in_collective:
            return ""
        return describe_waits(reports)


# --------------------------------------------------------------------------- torchrun

def _init_torchrun(world: int, backend_: str) -> None:
    global _CONTEXT
    import torch
    import torch.distributed as dist

    env_world = int(os.environ["WORLD_SIZE"])
    if world != env_world:
        raise ValueError(f"asked for world_size={world} but torchrun started {env_world} ranks: "
                         f"pass world_size={env_world} or change torchrun's --nproc-per-node")
    if _CONTEXT is not None:
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    backend_ = dist.get_backend()
    if backend_ == "nccl":
        dev, name = f"cuda:{local}", f"cuda:{local} ({torch.cuda.get_device_name(local)})"
    else:
        dev, name = "cpu", f"cpu:{dist.get_rank()}"
    _CONTEXT = RankContext(dist.get_rank(), env_world, backend_, dev, name)


def _run_inline(fn: Callable, args: tuple, kwargs: dict) -> list:
    import torch.distributed as dist

    result = _to_cpu(fn(*args, **kwargs))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return gathered


# --------------------------------------------------------------------------- one-shot launch

def launch(fn: Callable, world_size: int, *args, backend: str = "auto",
           timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` fresh ranks; return per-rank results.

    Under torchrun the function runs in place on the ranks torchrun started.
    """
    if _CONTEXT is not None and not under_torchrun():
        raise RuntimeError("launch() called inside a rank function: call it from the notebook "
                           "or script that drives the ranks")
    cluster = Cluster(world_size, backend, timeout=timeout)
    try:
        return cluster.run(fn, *args, **kwargs)
    finally:
        if not cluster._inline:
            cluster.shutdown()


def device_report() -> dict:
    """What this machine offers: used by `python -m shardlab info` and the notebooks."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(_gpu_count())]
    try:
        import torch.distributed as dist

        nccl = dist.is_nccl_available()
        gloo = dist.is_gloo_available()
    except Exception:  # noqa: BLE001
        nccl = gloo = False
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "nccl_available": nccl,
        "gloo_available": gloo,
        "cpu_cores": os.cpu_count(),
        "under_torchrun": under_torchrun(),
        "auto_backend_for_2_ranks": "nccl" if len(gpus) >= 2 else "gloo (mock devices)",
    }
