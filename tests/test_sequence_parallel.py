"""Sequence parallelism: same outputs and gradients as the unsharded layer, same bytes on the
wire as tensor parallelism, and 1/t of the activations in the sequence-sharded regions."""

from __future__ import annotations

import pytest
import torch

from shardlab import comm, memory
from shardlab.sequence_parallel import (
    SavedActivations,
    activation_saving,
    allreduce_as_reduce_scatter_all_gather,
    compare_block,
    dropout_mask,
    region,
    sequence_shard,
)

TOL = 1e-5


def test_hidden_state_fact():
    # One layer's hidden states at 128k tokens x 8192 hidden in 2-byte values: about 2.1 GB.
    n = memory.hidden_state_bytes(1, 128 * 1024, 8192, "bf16")
    assert n == 128 * 1024 * 8192 * 2
    assert round(n / 1e9, 1) == 2.1


def test_activation_saving_arithmetic():
    s = activation_saving("llama3-70b", tp=8, seq_len=8192, flash_attention=True)
    sbh2 = 8192 * 8192 * 2 // 2  # the formula's unit: s*b*h bytes-per-2-byte-value
    assert s.tp_only == pytest.approx(sbh2 * (10 + 24 / 8), rel=1e-9)
    assert s.tp_sp == pytest.approx(sbh2 * 34 / 8, rel=1e-9)
    assert s.ratio == pytest.approx(13 / 4.25)


def test_saved_activations_meter_counts_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(8, 4, requires_grad=True)
    with SavedActivations(exclude=[w]) as saved:
        with region("a"):
            y = x @ w  # saves x (and w, excluded)
            z = y * y  # saves y twice: one storage
    assert saved.bytes == {"a": 2 * 8 * 4 * 4}
    assert saved.total == 256
    z.sum().backward()


def test_dropout_mask_shards_match_the_full_mask():
    full = dropout_mask((2, 8, 4), 0.5, seed=3)
    assert 0 < full.float().mean() < 1
    assert torch.equal(torch.cat([sequence_shard(full, 4, r) for r in range(4)], dim=1), full)
    with pytest.raises(ValueError, match="not divisible"):
        sequence_shard(full, 3, 0)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_mask((2,), 1.0, 0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_parallel_block_equals_unsharded(clusters, world, sp, dropout):
    for o in clusters(world).run(compare_block, sp, dropout=dropout):
        assert o["out_err"] < TOL and o["grad_x_err"] < TOL and o["param_grad_err"] < TOL, o
        if sp:
            assert o["local_input_shape"] == (2, 16 // world, 64)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_sends_the_same_bytes_as_the_all_reduce(clusters, world):
    c = clusters(world)
    tp = c.run(compare_block, False)[0]
    sp = c.run(compare_block, True)[0]
    ar = tp["comm"]["all_reduce"]
    ag, rs = sp["comm"]["all_gather"], sp["comm"]["reduce_scatter"]
    # Forward + backward: 4 all-reduces (2 g forward, 2 f backward) become 4 + 4.
    assert ar["calls"] == 4 and ag["calls"] == 4 and rs["calls"] == 4
    assert ag["sent_bytes"] + rs["sent_bytes"] == ar["sent_bytes"]
    # Each collective acts on the same full activation: an all-reduce is an RS plus an AG.
    assert ag["bytes"] == rs["bytes"] == ar["bytes"]
    # The only extra traffic: the norm weights' gradients, once per step.
    assert tp["comm_grad_sync"] == {}
    assert sp["comm_grad_sync"]["all_reduce"]["calls"] == 2
    assert sp["comm_grad_sync"]["all_reduce"]["bytes"] == 2 * 64 * 4


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_regions_keep_one_t_th_of_the_activations(clusters, world):
    c = clusters(world)
    for dropout in (0.0, 0.1):
        tp = c.run(compare_block, False, dropout=dropout)[0]["saved"]
        sp = c.run(compare_block, True, dropout=dropout)[0]["saved"]
        assert sp["sequence"] * world == tp["sequence"]
        assert sp["tensor"] == tp["tensor"]  # inside attention and MLP nothing changes


def test_norm_gradients_need_the_all_reduce(clusters):
    def partial_norm_grad():
        import shardlab
        from shardlab import models
        from shardlab.sequence_parallel import ParallelBlock

        torch.manual_seed(0)
        block = models.Block(64, 8, 4, 176)
        x = torch.randn(1, 8, 64)
        block(x).sum().backward()
        pb = ParallelBlock(block, sequence_parallel=True)
        t, r = shardlab.world_size(), shardlab.rank()
        pb(sequence_shard(x, t, r)).sum().backward()
        before = pb.input_layernorm.weight.grad.clone()
        pb.allreduce_sequence_parallel_grads()
        ref = block.input_layernorm.weight.grad
        return (before - ref).abs().max().item(), (pb.input_layernorm.weight.grad - ref).abs().max().item()

    for before, after in clusters(2).run(partial_norm_grad):
        assert before > 1e-3 and after < TOL


def test_errata_8_all_reduce_is_reduce_scatter_plus_all_gather(clusters):
    def run():
        import shardlab

        x = torch.arange(8.0) * (shardlab.rank() + 1)
        out = allreduce_as_reduce_scatter_all_gather(x)
        return (torch.equal(out["all_reduce"], out["reduce_scatter+all_gather"]),
                out["all_reduce_log"]["all_reduce"]["sent_bytes"],
                sum(v["sent_bytes"] for v in out["split_log"].values()))

    for same, ar, split in clusters(4).run(run):
        assert same and ar == split == 2 * 3 * 32 // 4


def test_parallel_block_rejects_degrees_that_do_not_divide(clusters):
    def run():
        from shardlab import models
        from shardlab.sequence_parallel import ParallelBlock

        try:
            ParallelBlock(models.Block(64, 8, 2, 176))  # 2 KV heads over 4 ranks
        except ValueError as e:
            return str(e)

    assert all("does not divide the 2 KV heads" in m for m in clusters(4).run(run))


def test_figures_build():
    import matplotlib.pyplot as plt

    from shardlab.viz import sequence_parallel as spviz

    figs = [spviz.block_regions_figure(4),
            spviz.saved_activations_figure({"TP": {"sequence": 8, "tensor": 4},
                                            "TP + SP": {"sequence": 2, "tensor": 4}}, 4),
            spviz.activation_memory_figure("llama3-8b", tp=4, seq_len=8192)]
    assert all(len(f.axes) >= 1 for f in figs)
    for f in figs:
        plt.close(f)
