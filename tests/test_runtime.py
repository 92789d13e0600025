"""The runtime: results per rank, errors with tracebacks, timeouts, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.distributed as dist

import shardlab
from shardlab import Cluster, RankError, RankTimeout, launch
from shardlab.probes import allreduce_rank_sum, whoami

from conftest import ROOT, wait_no_rank_processes


def _raise_on_rank(bad: int):
    if shardlab.rank() == bad:
        raise ValueError(f"planted failure on rank {bad}")
    x = torch.ones(1, device=shardlab.device())
    dist.all_reduce(x)  # the healthy ranks block here, waiting for the failed one
    return x.item()


def _hang_on_rank(bad: int):
    x = torch.ones(1, device=shardlab.device())
    if shardlab.rank() != bad:
        from shardlab import comm

        comm.all_reduce(x)  # `bad` never joins: a classic hang
    else:
        time.sleep(60)
    return x.item()


def _sleep(seconds: float):
    time.sleep(seconds)
    return shardlab.rank()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_launch_allreduce_matches_reference(world):
    assert launch(allreduce_rank_sum, world) == [float(sum(range(world)))] * world
    assert wait_no_rank_processes() == []


def test_mock_devices_name_themselves():
    out = launch(whoami, 2, backend="gloo")
    assert out == [{"rank": 0, "world_size": 2, "device": "mock-gpu:0"},
                   {"rank": 1, "world_size": 2, "device": "mock-gpu:1"}]


def test_arguments_and_closures_travel():
    scale = 3.0

    def scaled(x):  # defined in the test, shipped by value like a notebook cell's function
        return x * scale + shardlab.rank()

    out = launch(scaled, 2, torch.arange(3.0))
    torch.testing.assert_close(out[1], torch.arange(3.0) * 3 + 1)


def test_raising_rank_surfaces_traceback_fast_and_cleans_up():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(_raise_on_rank, 4, 2, timeout=30)
    elapsed = time.monotonic() - t0
    assert info.value.rank == 2
    assert "planted failure on rank 2" in str(info.value)
    assert "_raise_on_rank" in info.value.tracebacks[2]
    assert elapsed < 15, elapsed  # start-up plus well under 5 s after the failure
    assert wait_no_rank_processes() == []


def test_failure_reported_within_5_seconds_on_warm_cluster():
    with Cluster(4) as cluster:
        t0 = time.monotonic()
        with pytest.raises(RankError):
            cluster.run(_raise_on_rank, 1, timeout=30)
        assert time.monotonic() - t0 < 5
    assert wait_no_rank_processes() == []


def test_hanging_rank_times_out_with_diagnosis():
    with pytest.raises(RankTimeout) as info:
        launch(_hang_on_rank, 2, 1, timeout=3)
    msg = str(info.value)
    assert info.value.pending == [0, 1]
    assert "rank 0 waits in all_reduce #1 on world" in msg
    assert "rank 1 is running (not in a collective)" in msg
    assert wait_no_rank_processes() == []


def test_cluster_is_reused_and_recovers_after_a_failure():
    with Cluster(2) as cluster:
        pids = [p.pid for p in cluster._procs]
        assert cluster.run(allreduce_rank_sum) == [1.0, 1.0]
        assert [p.pid for p in cluster._procs] == pids  # same processes: no new start-up
        with pytest.raises(RankError):
            cluster.run(_raise_on_rank, 0)
        assert not cluster.alive
        assert cluster.run(allreduce_rank_sum) == [1.0, 1.0]  # fresh ranks, transparently
    assert wait_no_rank_processes() == []


def test_interrupted_call_leaves_no_process():
    cluster = Cluster(2)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        cluster.run(_sleep, 30)
    timer.cancel()
    assert wait_no_rank_processes() == []
    cluster.shutdown()


def test_killed_caller_leaves_no_process(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'src')!r})
        import shardlab
        c = shardlab.Cluster(2)
        print(" ".join(str(p.pid) for p in c._procs), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    import psutil

    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "positive integer"),
    (dict(world_size=2, backend="mpi"), "unknown backend 'mpi'"),
    (dict(world_size=2, backend="nccl"), "use backend='gloo'"),
    (dict(world_size=10_000), "more mock devices than allowed"),
    (dict(world_size=2, timeout=0), "timeout must be positive"),
])
def test_bad_arguments_say_what_to_change(kwargs, match):
    if kwargs.get("backend") == "nccl" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match=match):
        Cluster(**kwargs, start=False)


def test_launch_inside_a_rank_is_refused():
    def nested():
        return launch(allreduce_rank_sum, 2)

    with pytest.raises(RankError, match="inside a rank function"):
        launch(nested, 1)


def test_info_command_reports_devices():
    out = subprocess.run([sys.executable, "-m", "shardlab", "info", "--json", "--probe", "2"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                         check=True).stdout
    import json

    report = json.loads(out)
    assert report["probe"]["all_reduce_of_ranks"] == [1.0, 1.0]
    assert report["probe"]["devices"][0] in ("mock-gpu:0",) or report["probe"]["devices"][0].startswith("cuda:0")


def test_torchrun_runs_the_same_function(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'src')!r})
        import shardlab
        from shardlab.probes import allreduce_rank_sum
        out = shardlab.launch(allreduce_rank_sum, 2)
        if shardlab.rank() == 0:
            print("RESULT", out)
    """))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(script)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESULT [1.0, 1.0]" in proc.stdout


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_start_up_survives_a_loaded_machine():
    """gloo's full-mesh connect has failed on a busy 2-core box: the launcher must recover."""
    import multiprocessing as mp

    burners = [mp.get_context("spawn").Process(target=_burn, args=(20,), daemon=True)
               for _ in range(2)]
    for b in burners:
        b.start()
    try:
        for _ in range(3):
            with Cluster(4) as cluster:
                assert cluster.run(allreduce_rank_sum) == [6.0] * 4
    finally:
        for b in burners:
            b.kill()
            b.join()
    assert wait_no_rank_processes() == []
