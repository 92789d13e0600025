"""The TP x PP x DP grid: arithmetic, process groups inside ranks, and a real 3D training run."""

from __future__ import annotations

import pytest

from shardlab import memory
from shardlab.mesh import (
    AXES,
    MT_NLG_530B,
    Coord,
    ParallelDims,
    axis_links,
    describe_layout,
)
from shardlab.three_d import TrainConfig, stage_layers, train_3d, train_reference

LAYOUTS = [ParallelDims(2, 2, 2), ParallelDims(tp=4, pp=1, dp=2), ParallelDims(1, 3, 2),
           ParallelDims(8, 35, 12)]


@pytest.mark.parametrize("dims", LAYOUTS, ids=str)
def test_coords_and_rank_of_are_inverse(dims):
    for r in range(dims.world_size):
        c = dims.coords(r)
        assert dims.rank_of(tp=c.tp, pp=c.pp, dp=c.dp) == r
        assert r == c.dp * dims.pp * dims.tp + c.pp * dims.tp + c.tp


@pytest.mark.parametrize("dims", LAYOUTS, ids=str)
def test_groups_partition_the_world(dims):
    for axis in AXES:
        groups = dims.groups(axis)
        assert len(groups) == dims.world_size // dims.degree(axis)
        assert all(len(g) == dims.degree(axis) for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(dims.world_size))
        for g in groups:  # members differ only along `axis`, in axis order
            assert [getattr(dims.coords(r), axis) for r in g] == list(range(len(g)))
            for r in g:
                assert dims.group_of(r, axis) == g


def test_tp_ranks_are_adjacent():
    dims = ParallelDims(tp=8, pp=35, dp=12)
    assert all(g == list(range(g[0], g[0] + 8)) for g in dims.groups("tp"))


def test_worked_example_2x2x2():
    d = ParallelDims(tp=2, pp=2, dp=2)
    assert d.coords(5) == Coord(tp=1, pp=0, dp=1)
    assert d.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.table()[5] == {"rank": 5, "tp": 1, "pp": 0, "dp": 1, "tp_group": [4, 5],
                            "pp_group": [5, 7], "dp_group": [1, 5]}


def test_validation_says_what_to_change():
    with pytest.raises(ValueError, match=r"dp=3 = 12 ranks, but the world has 8: set dp=2"):
        ParallelDims(tp=2, pp=2, dp=3).validate(8)
    with pytest.raises(ValueError, match=r"set tp=1 or pp=1 or dp=1"):
        ParallelDims(tp=2, pp=2, dp=2).validate(4)
    with pytest.raises(ValueError, match="does not divide the world size 8"):
        ParallelDims.for_world(8, tp=3)
    assert ParallelDims.for_world(3360, tp=8, pp=35) == ParallelDims(8, 35, 12)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match="unknown axis"):
        ParallelDims().groups("ep")
    with pytest.raises(ValueError, match="rank must be"):
        ParallelDims(2, 2, 2).coords(8)


def test_axis_links_tp_inside_nodes():
    links = axis_links(ParallelDims(tp=8, pp=2), gpus_per_node=8)
    assert (links["tp"].link, links["tp"].spans_nodes) == ("nvlink-h100", False)
    assert (links["pp"].link, links["pp"].spans_nodes) == ("ib-ndr", True)
    assert links["dp"].link == ""  # degree 1: no traffic
    # TP=16 on 8-GPU nodes cannot stay inside a node.
    assert axis_links(ParallelDims(tp=16), 8)["tp"].spans_nodes


def test_mt_nlg_layout():
    assert round(memory.parameter_count(MT_NLG_530B) / 1e9) == 530
    dims = ParallelDims(tp=8, pp=35, dp=12)
    assert dims.world_size == 3360
    s = describe_layout(MT_NLG_530B, dims, gpu="a100-80gb", workload="training", seq_len=2048)
    assert s.nodes == 420
    assert s.links["tp"].link == "nvlink-a100"
    assert s.links["pp"].spans_nodes and s.links["dp"].spans_nodes
    states = s.memory.weights + s.memory.gradients + s.memory.optimizer
    # 16 bytes per parameter, parameters split 8 x 35 ways (the first stage also holds the embedding).
    assert 16 * memory.parameter_count(MT_NLG_530B) / 280 < states < 40e9


def test_405b_on_two_nodes():
    s = describe_layout("llama3-405b", ParallelDims(tp=8, pp=2), workload="inference",
                        seq_len=8192)
    assert s.fits and s.nodes == 2
    assert 50e9 < s.memory.weights < 52e9
    assert [r["link"] for r in s.rows()] == ["nvlink-h100", "ib-ndr", "-"]


def test_stage_layers_split():
    assert [list(stage_layers(5, s, 2)) for s in range(2)] == [[0, 1, 2], [3, 4]]


# --------------------------------------------------------------------------- inside ranks

def _groups_seen(dims):
    import torch.distributed as dist

    from shardlab import comm

    g = dims.build_groups()
    again = dims.build_groups()  # cached: no new collective group
    return {"coord": g.coord, "same": again is g,
            **{a: dist.get_process_group_ranks(g.group(a)) for a in AXES},
            "names": [comm.group_name(g.group(a)) for a in AXES],
            "prev": g.prev_stage_rank, "next": g.next_stage_rank}


def test_build_groups_on_8_ranks(clusters):
    dims = ParallelDims(tp=2, pp=2, dp=2)
    out = clusters(8).run(_groups_seen, dims)
    for r, o in enumerate(out):
        assert o["coord"] == dims.coords(r) and o["same"]
        for a in AXES:
            assert o[a] == dims.group_of(r, a)
        assert o["names"] == ["tp", "pp", "dp"]
    assert (out[1]["prev"], out[1]["next"]) == (None, 3)


def test_build_groups_rejects_wrong_world(clusters):
    def bad():
        try:
            ParallelDims(tp=2, pp=2, dp=1).build_groups()
        except ValueError as e:
            return str(e)

    assert all("= 4 ranks, but the world has 8" in m for m in clusters(8).run(bad))


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_3d_training_matches_single_device(clusters, sp):
    cfg = TrainConfig(sequence_parallel=sp)
    ref = train_reference(cfg)
    assert ref[-1] < ref[0]  # it learns
    dims = ParallelDims(tp=2, pp=2, dp=2)
    out = clusters(8).run(train_3d, dims, cfg)
    last = [o for o in out if o["coord"]["pp"] == 1]
    assert len(last) == 4
    for o in last:
        assert o["losses"] == pytest.approx(ref, rel=1e-5)
    for o in out:
        assert set(o["comm"]) == {"tp", "pp", "dp"}
        assert o["layers"] == ([0, 1] if o["coord"]["pp"] == 0 else [2, 3])
    # TP halves each stage's matrices: the two TP ranks of a stage hold the same count.
    assert out[0]["parameters"] == out[1]["parameters"]


def test_figures_build():
    import matplotlib.pyplot as plt

    from shardlab.viz import mesh as meshviz
    from shardlab.widgets.mesh import draw_grid

    s = describe_layout("llama3-405b", ParallelDims(tp=8, pp=2), workload="inference")
    figs = [meshviz.grid_figure(ParallelDims(2, 2, 2), 4, highlight=5),
            meshviz.grid_figure(ParallelDims(8, 35, 12), 8, highlight=None),
            meshviz.layout_memory_figure({"405B": s}),
            meshviz.losses_figure([3.0, 2.0], {"3D": [3.0, 2.0]}),
            draw_grid(tp=2, pp=2, dp=1, highlight=99)]  # highlight clipped to the grid
    assert len(figs[0].axes) == 2 and len(figs[1].axes) >= 12
    for f in figs:
        plt.close(f)
