"""Sequence and expert parallelism on real GPUs over NCCL (run with -m gpu on a GPU machine).

The same rank functions as the mock-device tests, so the comparison with the unsharded
layer runs on CUDA tensors and NCCL collectives (uneven all-to-all splits included).
"""

from __future__ import annotations

import pytest

from shardlab.expert_parallel import compare_moe
from shardlab.sequence_parallel import compare_block

from conftest import GPU_WORLDS

pytestmark = pytest.mark.gpu

TOL = 1e-4  # TF32 is off by default for matmuls in fp32; leave room for kernel order


@pytest.mark.parametrize("world", GPU_WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_sequence_parallel_block_on_gpus(gpu_clusters, sp, world):
    cluster = gpu_clusters(world)
    assert all(d.startswith("cuda:") for d in cluster.devices)
    for o in cluster.run(compare_block, sp, dropout=0.1, seq_len=32):
        assert o["out_err"] < TOL and o["grad_x_err"] < TOL and o["param_grad_err"] < TOL, o


def test_sequence_parallel_bytes_and_activations_on_gpus(gpu_clusters):
    cluster = gpu_clusters(2)
    tp = cluster.run(compare_block, False)[0]
    sp = cluster.run(compare_block, True)[0]
    ar = tp["comm"]["all_reduce"]["sent_bytes"]
    assert sp["comm"]["all_gather"]["sent_bytes"] + sp["comm"]["reduce_scatter"]["sent_bytes"] == ar
    assert sp["saved"]["sequence"] * 2 == tp["saved"]["sequence"]
    assert sp["saved"]["tensor"] == tp["saved"]["tensor"]


@pytest.mark.parametrize("world", GPU_WORLDS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_expert_parallel_on_gpus(gpu_clusters, capacity_factor, world):
    cluster = gpu_clusters(world)
    for o in cluster.run(compare_moe, tokens=64, capacity_factor=capacity_factor, skew=0.3):
        assert o["out_err"] < TOL and o["grad_x_err"] < TOL, o
        assert o["param_grad_err"] < 1e-3, o
        assert o["comm_log"][0][:1] == ("all_to_all",) and o["comm_log"][0][3] == "int64"


def test_expert_parallel_uneven_and_empty_splits_on_gpus(gpu_clusters):
    for o in gpu_clusters(2).run(compare_moe, tokens=1):
        assert o["out_err"] < TOL and o["param_grad_err"] < 1e-3, o
