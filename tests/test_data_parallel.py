"""Data parallelism: identical replicas, equal to one device on the full batch, and the
all-reduce bytes the ring model predicts; per-rank memory independent of the world size."""

from __future__ import annotations

import pytest
import torch

from shardlab import comm, cost, memory
from shardlab.data_parallel import (
    allreduce_gradients,
    bucket_parameters,
    dp_step_estimate,
    dp_train_step,
    max_replica_difference,
    parameter_digest,
    shard_batch,
    train_data_parallel,
    train_reference,
)
from shardlab.models import TinyMLP, TinyTransformer, make_mlp_batch, mse_loss

WORLDS = [1, 2, 4]
TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def runs(clusters):
    """Three SGD steps on the tiny model for every world size, plus the reference."""
    out = {p: clusters(p).run(train_data_parallel, "tiny", 3) for p in WORLDS}
    out["ref"] = train_reference("tiny", 3)
    return out


@pytest.mark.parametrize("p", WORLDS)
def test_replicas_are_identical_after_training(runs, p):
    res = runs[p]
    assert [r["rank"] for r in res] == list(range(p))
    assert len({r["digest"] for r in res}) == 1
    assert max_replica_difference([r["state"] for r in res]) == 0.0
    assert len({r["checksum"] for r in res}) == 1
    # they started different: the broadcast from rank 0 is what made them equal
    assert len({r["digest_before"] for r in res}) == p


@pytest.mark.parametrize("p", WORLDS)
def test_data_parallel_equals_one_device_on_the_full_batch(runs, p):
    ref = runs["ref"]
    for name, t in ref["state"].items():
        torch.testing.assert_close(runs[p][0]["state"][name], t, **TOL)
    mean_losses = torch.tensor([r["losses"] for r in runs[p]]).mean(0)
    torch.testing.assert_close(mean_losses, torch.tensor(ref["losses"]), **TOL)


@pytest.mark.parametrize("p", WORLDS)
def test_allreduce_bytes_are_the_ring_prediction(runs, p):
    params = memory.parameter_count("tiny") * 4  # fp32 gradients
    model = TinyTransformer.from_spec("tiny", device="meta")
    for r in runs[p]:
        step = r["comm_step"]
        assert list(step) == ["all_reduce"]
        assert step["all_reduce"]["calls"] == len(list(model.parameters()))
        assert step["all_reduce"]["bytes"] == params
        assert step["all_reduce"]["sent_bytes"] == cost.allreduce_bytes(params, p)
        assert r["comm_broadcast"]["broadcast"]["bytes"] == params
        assert r["comm_broadcast"]["broadcast"]["sent_bytes"] == (params if r["rank"] == 0 else 0)


def test_memory_per_rank_does_not_shrink_with_more_ranks(runs):
    mems = [r["memory"] for p in WORLDS for r in runs[p]]
    assert all(m == mems[0] for m in mems)
    assert mems[0]["parameters"] == mems[0]["gradients"] == memory.parameter_count("tiny") * 4


def test_buckets_cut_the_number_of_allreduces_not_the_bytes(clusters):
    p = 4
    res = clusters(p).run(train_data_parallel, "tiny", 2, bucket_bytes=300_000)
    params = memory.parameter_count("tiny") * 4
    model = TinyTransformer.from_spec("tiny", device="meta")
    calls = len(bucket_parameters(list(model.parameters()), 300_000))
    assert 1 < calls < len(list(model.parameters()))
    for r in res:
        assert r["comm_step"]["all_reduce"] == {
            "calls": calls, "bytes": params, "sent_bytes": cost.allreduce_bytes(params, p)}
    assert max_replica_difference([r["state"] for r in res]) == 0.0
    ref = train_reference("tiny", 2)
    for name, t in ref["state"].items():
        torch.testing.assert_close(res[0]["state"][name], t, **TOL)


def test_adam_replicas_match_the_reference(clusters):
    res = clusters(2).run(train_data_parallel, "tiny", 3, optimizer="adam", lr=1e-3)
    ref = train_reference("tiny", 3, optimizer="adam", lr=1e-3)
    assert max_replica_difference([r["state"] for r in res]) == 0.0
    for name, t in ref["state"].items():
        torch.testing.assert_close(res[1]["state"][name], t, **TOL)
    params = memory.parameter_count("tiny") * 4
    assert res[0]["memory"]["optimizer"] == 2 * params  # Adam: momentum and variance


def _mlp_rank(steps: int, bucket_bytes):
    """Any model works: a TinyMLP with MSE, through the plain-function step."""
    from shardlab.data_parallel import broadcast_parameters, parameter_digest, shard_batch
    from shardlab.runtime import rank

    model = TinyMLP((8, 32, 4), seed=rank())
    broadcast_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for k in range(steps):
        dp_train_step(model, opt, shard_batch(make_mlp_batch(k, 16, 8, 4)), mse_loss,
                      bucket_bytes=bucket_bytes)
    return parameter_digest(model), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bucket_bytes", [None, 1e9])
def test_any_model_through_dp_train_step(clusters, bucket_bytes):
    res = clusters(4).run(_mlp_rank, 4, bucket_bytes)
    assert len({d for d, _ in res}) == 1
    ref = TinyMLP((8, 32, 4), seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for k in range(4):
        opt.zero_grad()
        mse_loss(ref, make_mlp_batch(k, 16, 8, 4)).backward()
        opt.step()
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(res[0][1][name], t, **TOL)


def _average_of_ranks(bucket_bytes):
    from shardlab.runtime import rank, world_size

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
              torch.nn.Parameter(torch.zeros(1))]
    for i, p in enumerate(params[:2]):
        p.grad = torch.full_like(p, float(rank() + i))
    # params[2] has no gradient on any rank: it counts as zeros
    with comm.record() as log:
        n = allreduce_gradients(params, bucket_bytes=bucket_bytes)
    mean = (world_size() - 1) / 2
    assert torch.equal(params[0].grad, torch.full((3,), mean))
    assert torch.equal(params[1].grad, torch.full((2, 2), mean + 1))
    assert torch.equal(params[2].grad, torch.zeros(1))
    return n, comm.summary(log)["all_reduce"]["calls"]


@pytest.mark.parametrize("bucket_bytes,expected", [(None, 3), (20, 2), (1e6, 1)])
def test_allreduce_gradients_averages(clusters, bucket_bytes, expected):
    for n, calls in clusters(4).run(_average_of_ranks, bucket_bytes):
        assert n == calls == expected


# --------------------------------------------------------------------------- pure functions

def test_shard_batch_splits_evenly_and_in_order():
    x = torch.arange(12).reshape(6, 2)
    y = torch.arange(6)
    shards = [shard_batch((x, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s[0] for s in shards]), x)
    assert torch.equal(shards[1][1], torch.tensor([2, 3]))
    assert isinstance(shards[0], tuple)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_batch(x, 0, 4)


def test_bucket_parameters():
    ps = [torch.zeros(10), torch.zeros(20), torch.zeros(5), torch.zeros(100),
          torch.zeros(4, dtype=torch.float16)]
    assert [len(b) for b in bucket_parameters(ps, None)] == [1] * 5
    buckets = bucket_parameters(ps, 120)  # 120 bytes = 30 fp32 values
    assert [[t.numel() for t in b] for b in buckets] == [[4], [100], [5, 20], [10]]
    assert [t for b in bucket_parameters(ps, 1e9) for t in b][0] is ps[-1]  # reverse order
    assert len(bucket_parameters(ps, 1e9)) == 2  # fp16 and fp32 never share a bucket
    with pytest.raises(ValueError):
        bucket_parameters(ps, 0)


def test_parameter_digest_sees_one_bit():
    a = TinyMLP((4, 4), seed=0)
    b = TinyMLP((4, 4), seed=0)
    assert parameter_digest(a) == parameter_digest(b)
    with torch.no_grad():
        b.layers[0].weight[0, 0] = torch.nextafter(b.layers[0].weight[0, 0], torch.tensor(1.0))
    assert parameter_digest(a) != parameter_digest(b)


def test_dp_step_estimate():
    one = dp_step_estimate("llama3-8b", "h100-80gb", 1, "nvlink-h100")
    eight = dp_step_estimate("llama3-8b", "h100-80gb", 8, "nvlink-h100")
    assert one.allreduce_time == 0 and one.scaling_efficiency == 1
    assert eight.tokens_per_step == 8 * one.tokens_per_step
    assert eight.compute_time == one.compute_time
    grad = memory.parameter_count("llama3-8b") * 2
    assert eight.allreduce_time == pytest.approx(cost.allreduce_time(grad, 8, "nvlink-h100"))
    assert 0 < eight.scaling_efficiency < 1
    overlapped = dp_step_estimate("llama3-8b", "h100-80gb", 8, "nvlink-h100", overlap=1.0)
    assert overlapped.exposed_comm_time < eight.exposed_comm_time
    slow = dp_step_estimate("llama3-8b", "h100-80gb", 8, "pcie4")
    assert slow.tokens_per_second < eight.tokens_per_second
    with pytest.raises(ValueError):
        dp_step_estimate("llama3-8b", "h100-80gb", 8, "nvlink-h100", mfu=0)
