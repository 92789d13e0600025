"""The pipeline executor on real GPUs (NCCL): same results as one device, activations held
as the simulator says, and GPipe's larger memory footprint measured by CUDA itself.

Run on a machine with 2 GPUs: ``PYTHONPATH=src python -m pytest -m gpu tests/test_pipeline_gpu.py``
(the 4-stage cases skip there; they run on a 4-GPU node).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from shardlab.pipeline import schedule, simulate
from shardlab.pipeline import executor as ex
from shardlab.pipeline import torch_compare as tc

from conftest import GPU_WORLDS

pytestmark = pytest.mark.gpu

CASES = [("naive", 2, 1), ("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved-1f1b", 4, 2), ("zb-h1", 4, 1)]


def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("world", GPU_WORLDS)
@pytest.mark.parametrize("name,m,v", CASES, ids=[c[0] for c in CASES])
def test_nccl_step_matches_single_device(gpu_clusters, name, m, v, world):
    cluster = gpu_clusters(world)
    cluster.run(_no_tf32)
    model = ex.block_stack(layers=world * 2 * v, hidden=32, kind="transformer", seed=v)
    x, y = ex.example_batch(model, batch=2 * m, seq=8)
    sched = schedule(name, world, m, v)
    run = ex.run_pipeline(cluster, model, x, y, sched)
    assert all(d.startswith("cuda:") for d in run.devices)
    loss, grads = ex.reference_step(model, x, y)  # on the CPU, fp32
    assert run.loss == pytest.approx(loss, rel=1e-4)
    for k, g in grads.items():
        assert_close(run.grads[k], g, rtol=1e-4, atol=1e-5, msg=lambda s: f"{k}: {s}")
    assert run.peak_activations == tuple(float(k) for k in simulate(sched).peak_activations)


def test_gpipe_allocates_more_than_1f1b(gpu_clusters):
    cluster = gpu_clusters(2)
    model = ex.block_stack(layers=4, hidden=256, kind="transformer", heads=4)
    m = 8
    x, y = ex.example_batch(model, batch=4 * m, seq=128)
    peaks = {}
    for name in ("gpipe", "1f1b"):
        run = ex.run_pipeline(cluster, model, x, y, schedule(name, 2, m))
        peaks[name] = run.reports[0].peak_memory_allocated
        unit = run.activation_unit_bytes[0]
    # Stage 0 holds m micro-batches under GPipe and 2 under 1F1B: the difference is
    # (m - 2) micro-batches' saved activations, give or take allocator rounding.
    assert peaks["gpipe"] - peaks["1f1b"] > 0.8 * (m - 2) * unit


@pytest.mark.parametrize("name,m,v", [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved-1f1b", 4, 2),
                                      ("zb-h1", 4, 1)])
def test_torch_pipelining_on_nccl(gpu_clusters, name, m, v):
    cluster = gpu_clusters(2)
    model = ex.block_stack(layers=4 * v, hidden=32)
    x, y = ex.example_batch(model, batch=2 * m)
    res = cluster.run(tc.torch_train_step, model, x, y, name, m, v)
    assert tc.compare_orders(schedule(name, 2, m, v), {r: res[r]["order"] for r in range(2)}) == \
        {0: "same", 1: "same"}
