"""What every benchmark result carries: where and how its numbers were measured.

A stored result is a JSON document with a fixed envelope (see :func:`envelope`)::

    {"schema": "shardlab.benchmark/1", "benchmark": "collectives", "complete": true,
     "provenance": {...}, "config": {...}, "results": {...}, "summary": {...}, "errors": [...]}

``provenance`` names the GPUs (model, count), how they are linked (``nvidia-smi topo -m``
text and the parsed label between GPU0 and GPU1, e.g. ``NV18``), the driver, CUDA, NCCL,
torch and Python versions and the date. It never holds the host name or user names.
``shardlab.results`` reads these documents back for the book.

The second half is the clock all the benchmarks share: CUDA events around many
back-to-back calls after a warm-up (host time on mock devices), median of repeats.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

SCHEMA = "shardlab.benchmark/1"
ROOT = Path(__file__).resolve().parents[1]

# NVLink multicast (NVLS) can put a shared host's GPUs out of service: keep it off everywhere,
# also when a learner runs a script directly rather than through run_gpu.sh.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
# Environment variables worth recording: they change what NCCL does.
_ENV_RECORDED = ("NCCL_ALGO", "NCCL_PROTO", "NCCL_MAX_NCHANNELS", "NCCL_MIN_NCHANNELS",
                 "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE",
                 "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS", "SHARDLAB_TRACE")

PROVENANCE_KEYS = ("gpu", "gpu_count", "gpus", "topology", "link", "driver", "cuda", "nccl",
                   "torch", "python", "date", "backend", "world_size", "device_kind")


def setup_environment() -> None:
    """Set the multicast-off variables (unless already set) and make `src/` importable."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    # The hang tracer (shardlab.diagnose) wraps every torch.distributed call with Python
    # bookkeeping: right for a notebook, but it would be timed here. SHARDLAB_TRACE=1 measures
    # with it on.
    os.environ.setdefault("SHARDLAB_TRACE", "0")
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def _run(cmd: list[str], timeout: float = 20.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _nccl_version() -> str | None:
    try:
        import torch

        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - CPU builds have no NCCL
        return None
    if isinstance(v, tuple):
        return ".".join(str(x) for x in v)
    if isinstance(v, int):  # old torch: 2.18.3 -> 21803
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return str(v)


def _git_commit() -> str | None:
    out = _run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], timeout=5)
    return out.strip() if out else None


def parse_link(topology: str | None) -> str | None:
    """The connection label between GPU0 and GPU1 in `nvidia-smi topo -m` text (e.g. NV18)."""
    if not topology:
        return None
    try:
        from shardlab.hardware import parse_topology

        topo = parse_topology(topology)
        return topo.link(0, 1) if topo.num_gpus >= 2 else None
    except Exception:  # noqa: BLE001 - an odd topology must not lose a result
        return None


def capture(backend: str, world_size: int) -> dict:
    """Provenance of a run on this machine: GPUs, link, driver and versions, date (UTC).

    `backend` is what the ranks ran on ("nccl" or "gloo" for mock devices).
    """
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    topology = _run(["nvidia-smi", "topo", "-m"]) if gpus else None
    query = _run(["nvidia-smi", "--query-gpu=driver_version,memory.total,power.limit",
                  "--format=csv,noheader"]) if gpus else None
    driver = memory = power = None
    if query:
        first = [s.strip() for s in query.strip().splitlines()[0].split(",")]
        driver, memory, power = (first + [None, None, None])[:3]
    try:
        import shardlab

        shardlab_version = shardlab.__version__
    except Exception:  # noqa: BLE001
        shardlab_version = None
    return {
        "device_kind": "gpu" if backend == "nccl" else "mock",
        "gpu": gpus[0] if gpus else None,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "gpu_memory": memory,
        "gpu_power_limit": power,
        "topology": topology,
        "link": parse_link(topology),
        "driver": driver,
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": backend,
        "world_size": world_size,
        "shardlab": shardlab_version,
        "git_commit": _git_commit(),
        "env": {k: os.environ[k] for k in (*MULTICAST_OFF, *_ENV_RECORDED) if k in os.environ},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- the JSON document

def envelope(benchmark: str, provenance: dict, config: dict) -> dict:
    """A fresh result document; fill `results`, `summary`, `errors`, then `write` it."""
    return {"schema": SCHEMA, "benchmark": benchmark, "complete": False,
            "provenance": provenance, "config": config, "results": {}, "summary": {},
            "errors": []}


def _clean(obj):
    """JSON-safe: NaN/inf become null, tuples lists, numpy scalars plain numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def write(path: str | Path, doc: dict) -> Path:
    """Write `doc` as JSON atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def default_out(name: str, cpu: bool) -> Path:
    """Where a run writes by default: $OUT/<name>.json if OUT is set; else the stored results
    for a GPU run, and a scratch file for a mock-device run (never the stored results)."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"{name}.json"
    if cpu:
        import tempfile

        return Path(tempfile.gettempdir()) / "shardlab-bench" / f"{name}.cpu.json"
    return ROOT / "benchmarks" / "results" / f"{name}.json"


def add_common_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file to write (default: $OUT/<name>.json, else "
                             "benchmarks/results/<name>.json; with --cpu a scratch file)")
    parser.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                        help="run on mock devices (gloo, CPU) with tiny sizes: checks the code "
                             "path in seconds; its timings mean nothing")
    parser.add_argument("--world-size", type=int, default=2, help="ranks (GPUs) to use")


def backend_for(cpu: bool, world_size: int) -> str:
    """'gloo' for --cpu; otherwise 'nccl', and a clear error if the GPUs are missing."""
    if cpu:
        return "gloo"
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < world_size:
        raise SystemExit(f"this benchmark needs {world_size} CUDA GPUs and found {n}: run it on "
                         "a GPU machine, or pass --cpu for a quick check on mock devices")
    return "nccl"


# --------------------------------------------------------------------------- the clock

def synchronize(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], iters: int, device) -> tuple[float, float]:
    """Seconds per call of `iters` back-to-back calls of `fn`: (device time, host issue time).

    On CUDA the device time is measured with events around the whole loop, so launch gaps
    count and nothing is serialised between calls; the host time says whether the loop was
    limited by Python and launches (host ~ device) or by the GPU (host << device). On the
    CPU both are the host clock.
    """
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters, host / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - t0
    return host / iters, host / iters


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> float:
    """(max - min) / median of repeats: the noise a difference must beat."""
    m = median(xs)
    return float((max(xs) - min(xs)) / m) if m > 0 else 0.0
