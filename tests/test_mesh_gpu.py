"""3D parallelism on real GPUs: TP=2 x PP=2 x DP=2 over NCCL on an 8-GPU node (issue 11).

Skips on machines with fewer than 8 GPUs. The rank function is the one the mock-device test
(tests/test_mesh.py) and chapter 8 run, so the two check the same thing.
"""

from __future__ import annotations

import pytest

from shardlab.mesh import ParallelDims
from shardlab.three_d import TrainConfig, train_3d, train_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_3d_training_matches_single_device_on_gpus(gpu_clusters, sp):
    cluster = gpu_clusters(8)
    cfg = TrainConfig(sequence_parallel=sp)
    ref = train_reference(cfg)
    out = cluster.run(train_3d, ParallelDims(tp=2, pp=2, dp=2), cfg)
    last = [o for o in out if o["coord"]["pp"] == 1]
    assert len(last) == 4
    for o in last:  # GPU kernels sum in other orders than the CPU reference
        assert o["losses"] == pytest.approx(ref, rel=1e-4)
    assert all(set(o["comm"]) == {"tp", "pp", "dp"} for o in out)
