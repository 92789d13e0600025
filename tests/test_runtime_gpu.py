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
