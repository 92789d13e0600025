"""Expert parallelism: routing arithmetic, and the all-to-all MoE against the single-device one."""

from __future__ import annotations

import math

import pytest
import torch

from shardlab import memory
from shardlab.expert_parallel import (
    ExpertParallelMoE,
    MoELayer,
    capacity_mask,
    compare_moe,
    dispatch_order,
    ep_weight_bytes_per_gpu,
    expert_capacity,
    experts_of_rank,
    load_balancing_loss,
    moe_parameters,
    owner_of_expert,
    route,
    send_counts_per_rank,
)

TOL = 1e-5


# --------------------------------------------------------------------------- routing arithmetic

def test_expert_capacity_formula():
    # 64 tokens, top-2 over 8 experts: 16 per expert if perfectly even, x1.25 headroom = 20.
    assert expert_capacity(64, 8, 2, 1.25) == 20
    assert expert_capacity(10, 4, 1, 1.0) == 3  # rounded up
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 4, 1, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        expert_capacity(10, 4, 5, 1.0)


def test_capacity_mask_serves_first_choices_first():
    # Every expert has 2 slots. Expert 0: tokens 0, 1, 2 pick it first, token 3 second; only
    # tokens 0 and 1 get in. Expert 1: token 3 picks it first, so of the second choices of
    # tokens 0 and 2 only token 0's still fits.
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_mask(idx, experts=3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert capacity_mask(idx, 3, None).all()


def test_route_weights_and_drop_accounting():
    torch.manual_seed(0)
    logits = torch.randn(32, 4)
    r = route(logits, top_k=2, capacity_factor=None)
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(32))
    assert r.tokens_per_expert.sum() == 64 and r.dropped_assignments == 0
    assert torch.equal(r.expert_idx_TK, logits.topk(2).indices)

    tight = route(logits, top_k=2, capacity_factor=0.5)
    assert tight.capacity == 8
    assert (tight.kept_per_expert <= 8).all()
    assert tight.dropped_assignments == 64 - int(tight.kept_per_expert.sum())
    assert tight.dropped_assignments == int((tight.tokens_per_expert - 8).clamp(min=0).sum())
    assert 0 <= tight.dropped_tokens <= 32


def test_switch_style_unnormalised_weights():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    r = route(logits, top_k=1, normalize=False)
    assert r.weights_TK.item() == pytest.approx(torch.softmax(logits, -1)[0, 0].item())


def test_load_balancing_loss_is_one_when_uniform_and_e_when_collapsed():
    E, T = 4, 8
    uniform_probs = torch.full((T, E), 1 / E)
    round_robin = torch.arange(T).remainder(E).unsqueeze(1)
    assert load_balancing_loss(uniform_probs, round_robin).item() == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)).item() == pytest.approx(E)


def test_load_balancing_loss_has_a_gradient_towards_balance():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 0.5]], requires_grad=True)
    r = route(logits, top_k=1)
    load_balancing_loss(r.probs_TE, r.expert_idx_TK).backward()
    # Expert 0 is over-used: the loss pushes its logits down.
    assert (logits.grad[:, 0] > 0).all()


def test_single_device_moe_drops_pass_through_as_zero():
    torch.manual_seed(0)
    moe = MoELayer(8, 16, experts=4, top_k=1, capacity_factor=0.25)
    x = torch.randn(16, 8)
    y = moe(x)
    dropped = ~moe.routing.keep_TK[:, 0]
    assert dropped.any()
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    assert moe.aux_loss.requires_grad


def test_placement_arithmetic():
    assert experts_of_rank(1, 8, 4) == [2, 3]
    assert owner_of_expert(5, 8, 4) == 2
    assert send_counts_per_rank([3, 1, 0, 2, 5, 5, 0, 1], 4) == [4, 2, 10, 1]
    with pytest.raises(ValueError, match="must divide the 8 experts"):
        experts_of_rank(0, 8, 3)


def test_dispatch_order_is_sorted_by_expert_then_token():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    r = route(torch.zeros(3, 3), top_k=2)  # placeholder, replaced below
    r = type(r)(r.probs_TE, idx, r.weights_TK, torch.ones(3, 2, dtype=torch.bool), None)
    tok, slot, expert = dispatch_order(r)
    assert expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert tok.tolist() == [0, 1, 1, 2, 0, 2]


def test_mixtral_total_vs_active_parameters():
    p = moe_parameters("mixtral-8x7b")
    assert round(p["total"] / 1e9, 2) == 46.70
    assert round(p["active"] / 1e9, 2) == 12.88
    assert p["total"] == memory.parameter_count("mixtral-8x7b")
    assert p["experts"] + p["shared"] == p["total"]


def test_ep_weight_bytes_split_experts_only():
    one = ep_weight_bytes_per_gpu("mixtral-8x7b", 1)
    eight = ep_weight_bytes_per_gpu("mixtral-8x7b", 8)
    assert one["total"] == memory.weight_bytes("mixtral-8x7b", "bf16")
    assert eight["shared"] == one["shared"]
    assert eight["experts"] == math.ceil(one["experts"] / 8)
    with pytest.raises(ValueError):
        ep_weight_bytes_per_gpu("llama3-8b", 2)


# --------------------------------------------------------------------------- on ranks

def _check_equal(out):
    for o in out:
        assert o["out_err"] < TOL, o["out_err"]
        assert o["grad_x_err"] < TOL, o["grad_x_err"]
        assert o["param_grad_err"] < 1e-4, o["param_grad_err"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_expert_parallel_equals_single_device(clusters, world, capacity_factor):
    out = clusters(world).run(compare_moe, tokens=24, capacity_factor=capacity_factor, skew=0.3)
    _check_equal(out)
    for o in out:
        if capacity_factor is None:
            assert o["dropped_assignments"] == 0
        if capacity_factor == 0.5:
            assert o["dropped_assignments"] > 0


def test_expert_parallel_splits_are_consistent(clusters):
    out = clusters(4).run(compare_moe, tokens=20, capacity_factor=1.0)
    # What rank i sends to rank j is what rank j receives from rank i.
    for i, o in enumerate(out):
        for j, p in enumerate(out):
            assert o["send_counts"][j] == sum(p["recv_counts"][i])
        # Sent rows are the kept assignments of this rank's tokens.
        assert sum(o["send_counts"]) == sum(o["kept_per_expert"])
        assert o["local_experts"] == experts_of_rank(i, 4, 4)


def test_count_exchange_comes_before_the_data(clusters):
    out = clusters(2).run(compare_moe, tokens=16)
    log = out[0]["comm_log"]
    ops = [(op, dtype) for op, _, _, dtype, _ in log]
    # forward: counts (int64), dispatch, combine; backward: the two inverse all-to-alls.
    assert ops[0] == ("all_to_all", "int64")
    assert [op for op, _ in ops] == ["all_to_all"] * 5
    assert all(dtype == "float32" for _, dtype in ops[1:])
    # Bytes this rank sends in the dispatch: the rows bound for the other rank.
    hidden = memory.MODELS["tiny-moe"].hidden
    assert log[1][4] == out[0]["send_counts"][1] * hidden * 4
    assert out[0]["comm_grad_sync"]["all_reduce"]["calls"] == 1  # the router's gradient


def test_uneven_and_empty_splits(clusters):
    # One token per rank: most splits are zero.
    _check_equal(clusters(4).run(compare_moe, tokens=1))


def test_ep_layer_rejects_a_degree_that_does_not_divide_experts(clusters):
    def build():
        moe = MoELayer(8, 16, experts=3, top_k=1)
        try:
            ExpertParallelMoE.from_moe(moe)
        except ValueError as e:
            return str(e)
        return "no error"

    assert all("must divide the 3 experts" in msg for msg in clusters(2).run(build))


# --------------------------------------------------------------------------- figures

def test_figures_build():
    import matplotlib.pyplot as plt

    from shardlab.viz import expert_parallel as epviz

    figs = [epviz.routing_figure(tokens=128, experts=8, capacity_factor=1.0, skew=1.0),
            epviz.routing_figure(tokens=128, experts=4, capacity_factor=None, ep=3),
            epviz.alltoall_matrix_figure([[3, 1], [0, 4]]),
            epviz.moe_parameters_figure("mixtral-8x7b")]
    assert all(len(f.axes) >= 1 for f in figs)
    for f in figs:
        plt.close(f)
