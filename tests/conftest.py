"""Shared test set-up: process hygiene checks and the ordering that puts the book build last."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Agg for this process only: notebook kernels started by nbval inherit the environment and
# must keep matplotlib's inline backend, or their figures would not be images.
os.environ.pop("MPLBACKEND", None)
import matplotlib  # noqa: E402

matplotlib.use("Agg")


def rank_processes() -> list:
    """Live rank processes started by this test process (they are the forkserver's children)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=False):
        try:
            if "forkserver" in " ".join(child.cmdline()):
                out += [p for p in child.children(recursive=True)
                        if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            pass
    return out


def wait_no_rank_processes(timeout: float = 5.0) -> list:
    """Rank processes still alive after `timeout` seconds (an empty list is the goal)."""
    import time

    from shardlab.runtime import _LIVE

    deadline = time.monotonic() + timeout
    while True:
        # Ranks of clusters still alive on purpose (the session fixtures) are not leftovers.
        kept = {p.pid for cluster in list(_LIVE) for p in cluster._procs}
        left = [p for p in rank_processes() if p.pid not in kept]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def import_without_torch(modules: str, expression: str) -> str:
    """Import `modules` (e.g. "shardlab.memory, shardlab.cost") in a fresh Python where torch
    cannot be imported and shardlab's __init__ (which imports the runtime) is bypassed;
    return what `print(expression)` wrote. Proves the arithmetic modules need no torch."""
    import subprocess

    pkg_dir = str(ROOT / "src" / "shardlab")
    code = ("import sys, types; sys.modules['torch'] = None\n"
            f"pkg = types.ModuleType('shardlab'); pkg.__path__ = [{pkg_dir!r}]\n"
            "sys.modules['shardlab'] = pkg\n"
            f"import {modules}\n"
            f"print({expression})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def pytest_collection_modifyitems(config, items):
    # The book build executes every notebook again: run it after everything cheaper.
    items.sort(key=lambda item: "test_book" in item.nodeid)


@pytest.fixture(scope="session")
def clusters():
    """`clusters(n)` gives a warm `n`-rank Cluster shared by the whole session (mock devices
    here, NCCL on a GPU machine), so that multi-rank tests pay the start-up once."""
    from shardlab import Cluster

    made: dict = {}

    def get(n: int, backend: str = "auto"):
        key = (n, backend)
        if key not in made:
            made[key] = Cluster(n, backend)
        return made[key]

    yield get
    for cluster in made.values():
        cluster.shutdown()


# World sizes of the GPU tests: each case skips where fewer GPUs are present (issue 10 runs
# the 4-rank cases on a 4-GPU node; test_mesh_gpu.py has the 8-rank 3D run).
GPU_WORLDS = (2, 4)


@pytest.fixture(scope="session")
def gpu_clusters():
    """Like `clusters`, but NCCL only; skips when there are not enough GPUs."""
    import torch

    from shardlab import Cluster

    made: dict = {}

    def get(n: int):
        if torch.cuda.device_count() < n:
            pytest.skip(f"needs {n} GPUs, found {torch.cuda.device_count()}")
        if n not in made:
            made[n] = Cluster(n, "nccl")
        return made[n]

    yield get
    for cluster in made.values():
        cluster.shutdown()
