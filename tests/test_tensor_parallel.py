"""Tensor parallelism on mock devices: sharded layers and blocks equal the single-device
reference (outputs and gradients), move exactly one all-reduce per block each way, and agree
with PyTorch's own `torch.distributed.tensor.parallel`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from shardlab import comm, cost
from shardlab import tensor_parallel as tp
from shardlab.memory import MODELS, kv_heads_per_rank

WORLD = 4  # one warm 4-rank cluster; TP groups of 1, 2 or 4 adjacent ranks inside it


# --------------------------------------------------------------------------- rank functions

def _linear_contract(degree: int, bias: bool) -> dict:
    """Both layers from one nn.Linear each: shards, the optional gather/scatter paths, and
    column-then-row with a single all-reduce each way."""
    group = tp.tp_group(degree)
    r = comm.group_rank(group)
    torch.manual_seed(7)
    lin1, lin2 = nn.Linear(6, 4 * degree, bias=bias), nn.Linear(4 * degree, 5, bias=bias)
    x = torch.randn(3, 2, 6)
    logs = {}

    col = tp.ColumnParallelLinear.from_linear(lin1, gather_output=True, group=group)
    assert_close(col.weight, lin1.weight[4 * r:4 * (r + 1)])  # rows r of p, contiguous
    if bias:
        assert_close(col.bias, lin1.bias[4 * r:4 * (r + 1)])
    xi = x.clone().requires_grad_()
    with comm.record() as logs["column_gather"]:
        y = col(xi)
        y.sum().backward()
    xr = x.clone().requires_grad_()
    lin1(xr).sum().backward()
    assert_close(y, lin1(x))
    assert_close(xi.grad, xr.grad)
    assert_close(col.weight.grad, lin1.weight.grad[4 * r:4 * (r + 1)])

    row = tp.RowParallelLinear.from_linear(lin2, input_is_parallel=False, group=group)
    assert_close(row.weight, lin2.weight[:, 4 * r:4 * (r + 1)])  # columns r of p
    if bias:
        assert_close(row.bias, lin2.bias)  # whole, added once after the all-reduce
    h = torch.randn(3, 2, 4 * degree)
    hi = h.clone().requires_grad_()
    with comm.record() as logs["row_scatter"]:
        z = row(hi)
        z.sum().backward()
    assert_close(z, lin2(h))
    hr = h.clone().requires_grad_()
    lin1.zero_grad()
    lin2.zero_grad()
    lin2(hr).sum().backward()
    assert_close(hi.grad, hr.grad)
    assert_close(row.weight.grad, lin2.weight.grad[:, 4 * r:4 * (r + 1)])
    if bias:
        assert_close(row.bias.grad, lin2.bias.grad)

    # Column (sharded output) straight into row (sharded input): nothing in between.
    col = tp.ColumnParallelLinear.from_linear(lin1, group=group)
    row = tp.RowParallelLinear.from_linear(lin2, group=group)
    xi = x.clone().requires_grad_()
    with comm.record() as logs["column_row_forward"]:
        out = row(col(xi))
    with comm.record() as logs["column_row_backward"]:
        out.sum().backward()
    assert_close(out, lin2(lin1(x)))
    xr = x.clone().requires_grad_()
    lin2(lin1(xr)).sum().backward()
    assert_close(xi.grad, xr.grad)
    return {k: comm.summary(v) for k, v in logs.items()}


def _error_messages() -> dict:
    """Bad degrees raise ValueError with a message that says what to change."""
    out = {}
    cases = {
        "column": lambda: tp.ColumnParallelLinear.from_linear(nn.Linear(8, 6), group=tp.tp_group(4)),
        "row": lambda: tp.RowParallelLinear.from_linear(nn.Linear(6, 8), group=tp.tp_group(4)),
        "heads": lambda: tp.ParallelAttention.from_reference(tp.Attention(12, 6, 2), tp.tp_group(4)),
        "kv_heads": lambda: tp.ParallelAttention.from_reference(tp.Attention(48, 12, 3), tp.tp_group(2)),
        "group": lambda: tp.tp_group(3),
        "pytorch_kv": lambda: tp.compare_with_pytorch("attention", 4, seed=1),
    }
    for name, make in cases.items():
        try:
            make()
        except ValueError as e:
            out[name] = str(e)
    return out


# --------------------------------------------------------------------------- plain functions

def test_divisors_and_error_message_wording():
    assert tp.divisors(12) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ValueError) as e:
        tp.head_layout(32, 8, 3)
    assert str(e.value) == "tp=3 does not divide 32 heads: choose a tp that divides it (1, 2, 4, 8, ...)"


@pytest.mark.parametrize("tp_degree", [1, 2, 4, 8, 16, 32, 64])
def test_head_layout_llama3_70b(tp_degree):
    spec = MODELS["llama3-70b"]
    layout = tp.head_layout(spec.heads, spec.kv_heads, tp_degree)
    assert layout.kv_heads_per_rank == kv_heads_per_rank(spec, tp_degree)  # same rule as memory.py
    assert layout.kv_replicas == max(1, tp_degree // spec.kv_heads)
    seen = set()
    for r in range(tp_degree):
        q = layout.query_heads(r)
        seen |= set(q)
        # every query head on a rank finds its KV head on that rank
        assert {h // layout.group_size for h in q} <= set(layout.kv_heads_of(r))
    assert seen == set(range(spec.heads))


@pytest.mark.parametrize("heads,kv,degree,match", [
    (6, 2, 4, "tp=4 does not divide 6 heads"),
    (12, 3, 2, "tp=2 does not divide 3 KV heads"),
    (48, 8, 12, "tp=12 exceeds the 8 KV heads"),
    (8, 3, 2, "multiple of kv_heads"),
])
def test_head_layout_errors(heads, kv, degree, match):
    with pytest.raises(ValueError, match=match):
        tp.head_layout(heads, kv, degree)


def test_shards_are_contiguous_slices():
    w = torch.arange(24.0).reshape(4, 6)
    assert_close(tp.column_shard(w, 2, 1), w[2:4])
    assert_close(tp.row_shard(w, 3, 2), w[:, 4:6])
    with pytest.raises(ValueError, match="tp=3 does not divide 4 output features"):
        tp.column_shard(w, 3, 0)
    with pytest.raises(ValueError, match="tp=4 does not divide 6 input features"):
        tp.row_shard(w, 4, 0)


def test_layers_need_a_rank_function():
    with pytest.raises(RuntimeError, match="rank function"):
        tp.ColumnParallelLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no tensor-parallel version of Linear"):
        tp.from_reference(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown kind 'moe'"):
        tp.random_case("moe")


# --------------------------------------------------------------------------- multi-rank

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("degree", [1, 2, 4])
def test_linear_layers_contract(clusters, degree, bias):
    logs = clusters(WORLD).run(_linear_contract, degree, bias)[0]
    if degree == 1:
        assert all(v == {} for v in logs.values()), logs
        return
    calls = {k: {op: s["calls"] for op, s in v.items()} for k, v in logs.items()}
    assert calls["column_gather"] == {"all_gather": 1, "all_reduce": 1}  # gather fwd, f bwd
    assert calls["row_scatter"] == {"all_reduce": 1, "all_gather": 1}  # g fwd, scatter bwd
    assert calls["column_row_forward"] == {"all_reduce": 1}  # only g
    assert calls["column_row_backward"] == {"all_reduce": 1}  # only f


CASES = [(kind, seed) for kind in tp.KINDS for seed in (0, 1, 2)] + [("attention", 4)]


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("kind,seed", CASES)
def test_block_matches_reference(clusters, kind, seed, degree):
    results = clusters(WORLD).run(tp.verify_against_reference, kind, degree, seed)
    per_block = 2 if kind == "block" else 1  # attention + MLP in a decoder layer
    for res in results:
        assert res["degree"] == degree
        for phase in ("forward", "backward"):
            log = res[phase]
            if degree == 1:
                assert log == {}, (phase, log)
                continue
            assert list(log) == ["all_reduce"], (phase, log)
            assert log["all_reduce"]["calls"] == per_block, (phase, log)
            message = 4 * torch.Size(res["x_shape"]).numel()  # fp32 activation, batch x seq x hidden
            assert log["all_reduce"]["bytes"] == per_block * message
            assert log["all_reduce"]["sent_bytes"] == per_block * round(cost.allreduce_bytes(message, degree))


def test_bad_degrees_raise_clear_errors(clusters):
    msgs = clusters(WORLD).run(_error_messages)[0]
    assert msgs["column"].startswith("tp=4 does not divide 6 output features")
    assert msgs["row"].startswith("tp=4 does not divide 6 input features")
    assert msgs["heads"].startswith("tp=4 does not divide 6 heads")
    assert msgs["kv_heads"].startswith("tp=2 does not divide 3 KV heads")
    assert "must divide the world size 4" in msgs["group"]
    assert "cannot split 2 KV heads over tp=4" in msgs["pytorch_kv"]


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("kind", ["mlp", "swiglu", "attention"])
def test_same_numbers_and_collectives_as_pytorch_tp(clusters, kind, degree):
    """PyTorch's ColwiseParallel/RowwiseParallel on a DeviceMesh over the same gloo group,
    counted by PyTorch's CommDebugMode: same shards, outputs, gradients and all-reduces."""
    for res in clusters(WORLD).run(tp.compare_with_pytorch, kind, degree, 0, entry="block"):
        assert res["shardlab"] == res["pytorch"] == {"forward": {"all_reduce": 1},
                                                     "backward": {"all_reduce": 1}}


def test_pytorch_per_layer_entry_costs_extra_backward_allreduces(clusters):
    """With one ColwiseParallel per projection, each re-enters the parallel region: the
    numbers still agree, but the backward pays one all-reduce per column layer (ours: one)."""
    res = clusters(WORLD).run(tp.compare_with_pytorch, "swiglu", 2, 0, entry="layer")[0]
    assert res["shardlab"]["backward"] == {"all_reduce": 1}
    assert res["pytorch"]["forward"] == {"all_reduce": 1}
    assert res["pytorch"]["backward"]["all_reduce"] >= 1


# --------------------------------------------------------------------------- figures and widget

def test_figures_and_dashboard_draw():
    import matplotlib.pyplot as plt

    from shardlab.viz import tensor_parallel as tpviz
    from shardlab.widgets.tensor_parallel import comm_vs_compute_controls

    summary = {"all_reduce": {"calls": 1, "bytes": 160, "sent_bytes": 240}}
    figs = [tpviz.weight_shards_figure(8, 12, 4), tpviz.column_row_flow_figure(2),
            tpviz.comm_log_figure({"column forward": {}, "row forward": summary}),
            tpviz.head_layout_figure(64, 8, (4, 16)), tpviz.allreduce_regimes_figure()]
    controls = comm_vs_compute_controls()
    for phase in ("decode", "prefill"):
        for link in tpviz.LINK_CHOICES:
            values = {k: w.value for k, w in controls.items()} | {"phase": phase, "link": link}
            fig = tpviz.comm_vs_compute_figure(**values)
            assert fig.axes
            plt.close(fig)
    assert all(len(f.axes) >= 1 for f in figs)
    for f in figs:
        plt.close(f)
    with pytest.raises(ValueError, match="phase must be"):
        tpviz.step_estimate("llama3-70b", "h100-80gb", "pcie4", "train", 1, 1, 2)
