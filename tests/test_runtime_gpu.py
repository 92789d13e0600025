"""The runtime on real GPUs: NCCL, one process per GPU (run with -m gpu on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from shardlab import RankError, launch
from shardlab.probes import allreduce_rank_sum, whoami

from conftest import wait_no_rank_processes

pytestmark = pytest.mark.gpu


def _needs(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, found {torch.cuda.device_count()}")


def test_auto_backend_uses_nccl_on_gpus():
    _needs(2)
    out = launch(whoami, 2)
    assert [o["device"].split(" ")[0] for o in out] == ["cuda:0", "cuda:1"]
    assert launch(allreduce_rank_sum, 2) == [1.0, 1.0]


def test_nccl_rank_error_cleans_up():
    _needs(2)

    def fail():
        import shardlab

        if shardlab.rank() == 1:
            raise RuntimeError("planted on GPU rank 1")
        return 0

    with pytest.raises(RankError, match="planted on GPU rank 1"):
        launch(fail, 2, timeout=30)
    assert wait_no_rank_processes() == []


def _graph_with_traced_all_reduce():
    """Capture comm.all_reduce in a CUDA graph with the hang tracer on, then replay it."""
    import torch

    import shardlab
    from shardlab import comm, diagnose

    dev = shardlab.device()
    x = torch.full((1024,), float(shardlab.rank() + 1), device=dev)
    comm.all_reduce(x.clone())  # leaves an event in the tracer's queue, as in a real program
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = comm.all_reduce(x.clone())  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static = x.clone()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        y = comm.all_reduce(static)
    x.fill_(10.0 * (shardlab.rank() + 1))
    static.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    return {"traced": diagnose.installed(), "sum": y[0].item()}


def test_cuda_graph_captures_collectives_with_the_tracer_on(monkeypatch):
    _needs(2)
    monkeypatch.setenv("SHARDLAB_TRACE", "1")
    out = launch(_graph_with_traced_all_reduce, 2, timeout=120)
    assert [o["traced"] for o in out] == [True, True]
    assert [o["sum"] for o in out] == [30.0, 30.0]  # the replay reduced the new values
