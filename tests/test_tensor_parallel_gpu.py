"""Tensor parallelism on real GPUs (NCCL, 2 or 4 ranks): the same checks as on mock devices.

Run on a machine with 2 GPUs (the 4-rank cases skip there; they run on a 4-GPU node): ``PYTHONPATH=src python -m pytest -m gpu tests/test_tensor_parallel_gpu.py``.
The rank functions are the package's own (`tp.verify_against_reference`,
`tp.compare_with_pytorch`), so the CPU and GPU tests check exactly the same things.
"""

from __future__ import annotations

import pytest

from shardlab import cost
from shardlab import tensor_parallel as tp

from conftest import GPU_WORLDS

pytestmark = pytest.mark.gpu

# fp32: cuBLAS may pick other kernels for the sharded shapes (and sum in another order);
# TF32 stays off (PyTorch's default for matmuls). bf16: partial sums are rounded to bf16
# before the all-reduce, the reference rounds once: a few bf16 ulps (2^-8) apart.
TOL = {"float32": {"atol": 1e-5, "rtol": 1e-4}, "bfloat16": {"atol": 5e-2, "rtol": 5e-2}}


@pytest.mark.parametrize("world", GPU_WORLDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", tp.KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_block_matches_reference_on_nccl(gpu_clusters, kind, seed, dtype, world):
    results = gpu_clusters(world).run(tp.verify_against_reference, kind, world, seed,
                                      dtype=dtype, **TOL[dtype])
    per_block = 2 if kind == "block" else 1
    elem = 4 if dtype == "float32" else 2
    for res in results:
        assert res["degree"] == world
        for phase in ("forward", "backward"):
            log = res[phase]
            assert list(log) == ["all_reduce"], (phase, log)
            assert log["all_reduce"]["calls"] == per_block
            message = elem * res["x_shape"][0] * res["x_shape"][1] * res["x_shape"][2]
            assert log["all_reduce"]["bytes"] == per_block * message
            assert log["all_reduce"]["sent_bytes"] == per_block * round(cost.allreduce_bytes(message, world))


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "attention", "block"])
def test_degree_one_sends_nothing_on_nccl(gpu_clusters, kind):
    for res in gpu_clusters(2).run(tp.verify_against_reference, kind, 1, 0, **TOL["float32"]):
        assert res["forward"] == {} and res["backward"] == {}


@pytest.mark.parametrize("world", GPU_WORLDS)
@pytest.mark.parametrize("kind", ["mlp", "swiglu", "attention"])
def test_same_numbers_and_collectives_as_pytorch_tp_on_nccl(gpu_clusters, kind, world):
    for res in gpu_clusters(world).run(tp.compare_with_pytorch, kind, world, 0, entry="block",
                                       **TOL["float32"]):
        assert res["shardlab"] == res["pytorch"] == {"forward": {"all_reduce": 1},
                                                     "backward": {"all_reduce": 1}}
