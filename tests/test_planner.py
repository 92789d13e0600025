"""The strategy planner (shardlab.planner): the course's conclusions, reached by computation;
rejections with their numbers; serving commands; topology advice; bad input. Also the drill
helpers (shardlab.drills) and the drills page that lists the drill notebooks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import import_without_torch

from shardlab import drills, memory, planner
from shardlab.hardware import GB, LINKS, LinkSpec
from shardlab.pipeline import bubble_fraction_closed_form
from shardlab.planner import Layout, Plan, evaluate, plan, serving_command, topology_advice

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / f"nvidia-smi-topo-{name}.txt").read_text()


# ---------------------------------------------------------------------------- the conclusions
def test_70b_on_four_nvlink_gpus_online_inference_is_tp4():
    result = plan("llama3-70b", 4, 80, "nvlink-h100", "inference")
    best = result[0]
    assert (best.tp, best.pp, best.dp) == (4, 1, 1)
    # ... and the weights per GPU are a quarter of the model, the rest for the KV cache.
    assert best.memory.weights == pytest.approx(memory.weight_bytes("llama3-70b") / 4, rel=0.01)
    assert best.memory.kv_cache > 0
    # the same conclusion for Llama-2-70B (the syllabus's other 70B shape)
    assert plan("llama2-70b", 4, 80, "nvlink-h100", "inference")[0].degrees == (4, 1, 1)


def test_70b_over_pcie_is_not_tp4():
    result = plan("llama3-70b", 4, 80, "pcie4", "inference")
    best = result[0]
    assert best.tp < 4
    assert best.pp > 1  # the pipeline takes over the cross-GPU traffic
    tp4 = next(lay for lay in result if lay.degrees == (4, 1, 1))
    # TP=4 loses because of its all-reduces over PCIe, not because of compute
    assert tp4.compute_time < best.compute_time
    assert tp4.comm_bandwidth + tp4.comm_latency > best.step_time - tp4.compute_time
    # the planner also says what 1-byte weights would buy, with the reason in numbers
    assert "int8" in result.alternatives
    assert any("int8/fp8" in a and "ms per token" in a for a in result.advice)


def test_405b_on_two_8gpu_nodes_is_tp8_pp2():
    result = plan("llama3-405b", 16, 80, "nvlink-h100", "inference", gpus_per_node=8,
                  inter_node_link="ib-ndr")
    best = result[0]
    assert best.degrees == (8, 2, 1)
    assert best.links["tp"].name == "nvlink-h100"  # TP stays inside a node
    assert [h.name for h in best.links["pp"]] == ["ib-ndr"]  # PP crosses the network
    tp16 = next(lay for lay in result if lay.degrees == (16, 1, 1))
    assert tp16.links["tp"].name == "ib-ndr"
    assert tp16.step_time > best.step_time
    # a whole replica per node does not fit: 405B needs both nodes
    assert any(r.degrees == (8, 1, 2) and "needs" in r.rejected for r in result.rejected)


def test_conclusions_hold_across_efficiency_and_memory_headroom():
    for eff in (0.6, 0.8, 1.0):
        for util in (0.85, 0.9, 0.95):
            kw = dict(efficiency=eff, memory_utilization=util, suggest_quantization=False)
            assert plan("llama3-70b", 4, 80, "nvlink-h100", "inference", **kw)[0].degrees == (4, 1, 1)
            assert plan("llama3-70b", 4, 80, "pcie4", "inference", **kw)[0].tp < 4
            assert plan("llama3-405b", 16, 80, "nvlink-h100", "inference", **kw)[0].degrees == (8, 2, 1)


def test_tp_over_pcie_wins_for_a_single_user_and_loses_under_load():
    # The honest nuance: at batch 1 TP=4's all-reduces are cheap even over PCIe.
    assert plan("llama3-70b", 4, 80, "pcie4", "inference", batch=1)[0].tp == 4
    assert plan("llama3-70b", 4, 80, "pcie4", "inference", batch=32)[0].tp < 4


# ---------------------------------------------------------------------------- scoring
def test_time_adds_up_and_has_latency_and_bandwidth_terms():
    lay = evaluate("llama3-70b", (4, 1, 1), 80, "nvlink-h100", "inference")
    assert lay.step_time == pytest.approx(lay.compute_time + lay.comm_latency + lay.comm_bandwidth
                                          + lay.p2p_time)
    assert lay.comm_latency > 0 and lay.comm_bandwidth > 0
    # the latency term is the alpha-beta one: 2 all-reduces per layer x 2(p-1) steps x alpha
    spec = memory.MODELS["llama3-70b"]
    assert lay.comm_latency == pytest.approx(2 * spec.layers * 2 * 3 * LINKS["nvlink-h100"].alpha)
    # at batch 1 the decode all-reduces are latency-bound (errata 1)
    one = evaluate("llama3-70b", (4, 1, 1), 80, "nvlink-h100", "inference", batch=1)
    assert one.comm_latency > one.comm_bandwidth


def test_pipeline_time_and_bubble():
    lay = evaluate("llama3-70b", (1, 4, 1), 80, "nvlink-h100", "inference", batch=1)
    assert lay.microbatches == 1
    assert lay.bubble == pytest.approx(0.75, abs=0.01)  # one micro-batch: 3 of 4 stages idle
    full = evaluate("llama3-70b", (1, 4, 1), 80, "nvlink-h100", "inference", batch=32)
    assert full.microbatches == 4 and full.bubble < 0.01
    assert lay.ttft is not None and lay.ttft > 0


def test_training_is_ranked_by_throughput_with_the_1f1b_bubble():
    result = plan("llama3-70b", 64, 80, "nvlink-h100", "training")
    assert result.inputs["objective"] == "throughput"
    tputs = [lay.throughput for lay in result]
    assert tputs == sorted(tputs, reverse=True)
    for lay in result:
        assert lay.step_time == pytest.approx(lay.compute_time + lay.comm_latency + lay.comm_bandwidth
                                              + lay.p2p_time + lay.bubble_time)
        assert lay.bubble == pytest.approx(bubble_fraction_closed_form("1f1b", lay.pp, lay.microbatches))
        assert lay.memory.optimizer > 0 and lay.memory.kv_cache == 0
    # TP across nodes is ranked below every layout that keeps TP inside a node
    inside = [lay for lay in result if lay.tp <= 8]
    across = [lay for lay in result if lay.tp > 8]
    assert min(x.throughput for x in inside) > max(x.throughput for x in across)


def test_offline_throughput_objective():
    result = plan("llama3-70b", 4, 80, "pcie4", "inference", objective="throughput")
    tputs = [lay.throughput for lay in result]
    assert tputs == sorted(tputs, reverse=True)
    assert result[0].tp < 4
    assert "tokens/s" in result[0].reason


def test_moe_layouts_have_ep():
    result = plan("mixtral-8x7b", 4, 80, "nvlink-h100", "inference")
    assert all(hasattr(lay, "ep") for lay in result)
    assert any(lay.ep == 4 for lay in result)
    assert all(lay.ep in (1, lay.tp) for lay in result)
    assert plan("llama3-70b", 4, 80, "nvlink-h100", "inference")[0].ep == 1
    assert "EP=4" in evaluate("mixtral-8x7b", (4, 1, 1, 4), 80, "nvlink-h100", "inference").label


# ---------------------------------------------------------------------------- rejections
def test_rejections_say_why_in_numbers():
    result = plan("llama3-70b", 4, 80, "nvlink-h100", "inference")
    rej = {lay.degrees: lay.rejected for lay in result.rejected}
    assert set(rej) == {(1, 1, 4), (2, 1, 2), (1, 2, 2)}
    msg = rej[(2, 1, 2)]
    assert re.search(r"needs \d+\.\d GB per GPU > 72\.0 GB usable \(90% of 80 GB\)", msg), msg
    assert "KV cache" in msg and "weights" in msg
    # without headroom the message compares with the card itself
    full = plan("llama3-70b", 4, 80, "nvlink-h100", "inference", memory_utilization=1.0)
    assert any(re.search(r"needs \d+\.\d GB per GPU > 80 GB", lay.rejected) for lay in full.rejected)


def test_fits_check_counts_the_kv_cache():
    # Errata 10: TP=2 x DP=2 holds the weights (70.6 GB of 72 usable) but not the KV cache
    # of 16 sequences x 8k tokens per replica.
    lay = evaluate("llama3-70b", (2, 1, 2), 80, "nvlink-h100", "inference")
    assert lay.memory.weights / GB < lay.capacity_gb
    assert lay.rejected and not lay.fits
    ok = evaluate("llama3-70b", (2, 1, 2), 80, "nvlink-h100", "inference", batch=2, context=2048,
                  output_tokens=256)
    assert ok.rejected is None and ok.fits


def test_shape_rejections():
    result = plan("llama3-70b", 6, 80, "nvlink-h100", "inference")
    msgs = [lay.rejected for lay in result.rejected if lay.tp in (3, 6)]
    assert msgs and all("tp=" in m for m in msgs)
    tiny = plan("tiny", 8, 1, "nvlink-h100", "inference", context=64, output_tokens=16, batch=1)
    assert any(lay.pp == 8 and "exceeds the 4 layers" in lay.rejected for lay in tiny.rejected)


def test_nothing_fits_gives_advice():
    result = plan("llama3-405b", 2, 80, "nvlink-h100", "inference")
    assert len(result) == 0 and result.best is None
    assert result.advice[0].startswith("nothing fits")


# ---------------------------------------------------------------------------- results object
def test_plan_is_a_list_with_a_story():
    result = plan("llama3-70b", 4, 80, "nvlink-h100", "inference")
    assert isinstance(result, Plan) and isinstance(result, list)
    assert result.best is result[0]
    assert all(isinstance(lay, Layout) and lay.reason for lay in result)
    assert all(lay.tp * lay.pp * lay.dp == 4 for lay in list(result) + result.rejected)
    rows = result.table(rejected=True)
    assert len(rows) == len(result) + len(result.rejected)
    assert rows[0]["layout"] == "TP=4 x PP=1 x DP=1" and "ms/token" in rows[0]
    text = str(result)
    assert "TP=4 x PP=1 x DP=1" in text and "needs" in text
    assert "best TP=4" in repr(result)
    assert "ms per token" in repr(result[0])


def test_link_spec_from_topology_is_accepted():
    advice = topology_advice(fixture("4xA6000-nvbridge"))
    result = plan("llama3-8b", 4, 48, advice.link, "inference", gpu="l40s-48gb")
    assert isinstance(advice.link, LinkSpec) and len(result) > 0


# ---------------------------------------------------------------------------- serving command
def test_serving_command_for_the_three_cases():
    cmd = serving_command(plan("llama3-70b", 4, 80, "nvlink-h100", "inference")[0],
                          "meta-llama/Llama-3.1-70B-Instruct")
    assert cmd.startswith("vllm serve meta-llama/Llama-3.1-70B-Instruct ")
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 1" in cmd
    assert "--max-model-len 8192" in cmd and "--max-num-seqs 32" in cmd
    assert "--data-parallel-size" not in cmd and "ray" not in cmd
    big = serving_command(plan("llama3-405b", 16, 80, "nvlink-h100", "inference")[0],
                          "meta-llama/Llama-3.1-405B-Instruct")
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in big
    assert "--distributed-executor-backend ray" in big
    pcie = plan("llama3-70b", 4, 80, "pcie4", "inference")[0]
    assert f"--pipeline-parallel-size {pcie.pp}" in serving_command(pcie, "m/x")


def test_serving_command_flags():
    cmd = serving_command({"tp": 2, "pp": 1, "dp": 2, "ep": 2, "dtype": "int8"}, "org/moe")
    assert "--data-parallel-size 2" in cmd and "--enable-expert-parallel" in cmd
    assert "--quantization fp8 --kv-cache-dtype fp8" in cmd
    assert "--dtype bfloat16" in serving_command({"tp": 1, "pp": 1, "dtype": "bf16"}, "m/x")
    assert "--gpu-memory-utilization 0.9" in serving_command({"tp": 1, "pp": 1}, "m/x",
                                                               gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="model id"):
        serving_command({"tp": 1, "pp": 1}, "")
    with pytest.raises(ValueError, match="layout.tp"):
        serving_command({"tp": 0, "pp": 1}, "m/x")
    with pytest.raises(ValueError, match="inference"):
        serving_command(plan("llama3-8b", 8, 80, "nvlink-h100", "training")[0], "m/x")
    with pytest.raises(ValueError, match="vllm"):
        serving_command({"tp": 1, "pp": 1}, "m/x", engine="tgi")


# ---------------------------------------------------------------------------- topology advice
def test_topology_advice_2xh100():
    advice = topology_advice(fixture("2xH100"))
    assert advice.verdict.advisable and (advice.tp, advice.pp) == (2, 1)
    assert advice.link.bandwidth == pytest.approx(LINKS["nvlink-h100"].bandwidth)
    assert "NV18" in advice.summary


def test_topology_advice_8xh100_dgx():
    advice = topology_advice(fixture("8xH100-dgx"))
    assert advice.verdict.advisable and (advice.tp, advice.pp) == (8, 1)
    assert advice.gpus == tuple(range(8))
    assert topology_advice(fixture("8xH100-dgx"), 4).tp == 4


def test_topology_advice_a6000_nvlink_pairs():
    advice = topology_advice(fixture("4xA6000-nvbridge"))
    assert not advice.verdict.advisable
    assert advice.nvlink_groups == ((0, 1), (2, 3))
    assert (advice.tp, advice.pp) == (2, 2)
    assert advice.link.kind == "nvlink" and "NV4" in advice.link.name
    assert "NODE" in advice.summary
    assert topology_advice(fixture("4xA6000-nvbridge"), [0, 1]).verdict.advisable


def test_topology_advice_l40s_pcie_only():
    advice = topology_advice(fixture("4xL40S-pcie"))
    assert not advice.verdict.advisable
    assert (advice.tp, advice.pp) == (1, 4)
    assert advice.link == "pcie4"
    assert "SYS" in advice.summary and "no TP" in advice.summary
    # the NIC column and row are not GPUs
    assert advice.topology.num_gpus == 4


def test_topology_advice_bad_input():
    with pytest.raises(ValueError, match="at most 2"):
        topology_advice(fixture("2xH100"), 4)
    with pytest.raises(ValueError, match="positive int"):
        topology_advice(fixture("2xH100"), 0)
    with pytest.raises(ValueError, match="repeats"):
        topology_advice(fixture("4xL40S-pcie"), [1, 1])
    with pytest.raises(ValueError, match="nvidia-smi topo -m"):
        topology_advice("not a topology")


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(link="nvlink"), "unknown link 'nvlink'; use a LinkSpec or one of: nvlink-a100"),
    (dict(gpus=0), "gpus must be a positive int"),
    (dict(gpus=2.5), "gpus must be a positive int"),
    (dict(gpus=True), "gpus must be a positive int"),
    (dict(gpu_memory_gb=-80), "gpu_memory_gb must be a positive number"),
    (dict(gpu_memory_gb="80"), "gpu_memory_gb must be a positive number"),
    (dict(workload="serving"), "workload must be one of 'inference', 'training'"),
    (dict(model="gpt-5"), "unknown model 'gpt-5'"),
    (dict(context=0), "context must be a positive int"),
    (dict(batch=-1), "batch must be a positive int"),
    (dict(output_tokens=8192), "must be smaller than context"),
    (dict(dtype="fp12"), "unknown dtype 'fp12'"),
    (dict(objective="fast"), "objective must be one of"),
    (dict(gpus=12), "12 GPUs do not fill nodes of 8"),
    (dict(memory_utilization=1.5), "memory_utilization"),
    (dict(inter_node_link="ethernet"), "unknown link 'ethernet'"),
])
def test_bad_input_says_what_to_change(kwargs, match):
    args = dict(model="llama3-70b", gpus=4, gpu_memory_gb=80, link="nvlink-h100", workload="inference")
    extra = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=re.escape(match)):
        plan(args["model"], args["gpus"], args["gpu_memory_gb"], args["link"], args["workload"], **extra)


def test_evaluate_bad_layout():
    with pytest.raises(ValueError, match="tuple"):
        evaluate("llama3-70b", 4, 80, "nvlink-h100", "inference")
    with pytest.raises(ValueError, match="pp must be a positive int"):
        evaluate("llama3-70b", (4, 0, 1), 80, "nvlink-h100", "inference")
    assert "ep=" in evaluate("llama3-70b", (2, 1, 1, 2), 80, "nvlink-h100", "inference").rejected
    with pytest.raises(ValueError, match="training is ranked by throughput"):
        plan("llama3-8b", 8, 80, "nvlink-h100", "training", objective="latency")


# ---------------------------------------------------------------------------- imports
def test_planner_imports_without_torch():
    out = import_without_torch(
        "shardlab.planner, shardlab.drills",
        "shardlab.planner.plan('llama3-70b', 4, 80, 'nvlink-h100', 'inference')[0].degrees")
    assert out == "(4, 1, 1)"


# ---------------------------------------------------------------------------- drills helper
def test_drill_checks():
    drills.check_close(10.05, 10.0)
    drills.check_equal((4, 1, 1), [4, 1, 1])
    drills.check_equal(" TP ", "tp")
    drills.check_choice("all-to-all", "alltoall", ["allreduce", "alltoall"])
    with pytest.raises(AssertionError, match="no answer yet"):
        drills.check_close(None, 1.0)
    with pytest.raises(AssertionError, match="expected 2.*because"):
        drills.check_close(3, 2, explain="because")
    with pytest.raises(AssertionError, match="should be a number"):
        drills.check_close("three", 2)
    with pytest.raises(AssertionError, match=r"expected \(8, 2, 1\)"):
        drills.check_equal((16, 1, 1), (8, 2, 1))
    with pytest.raises(AssertionError, match="not one of the options"):
        drills.check_choice("ring", "alltoall", ["allreduce", "alltoall"])


def test_drill_variants_are_reproducible():
    a = drills.variant(3, model=["a", "b", "c"], batch=range(1, 100))
    b = drills.variant(3, model=["a", "b", "c"], batch=range(1, 100))
    assert a == b
    assert len({drills.variant(s, x=range(1000)).x for s in range(20)}) > 10
    with pytest.raises(ValueError, match="seed"):
        drills.variant("0", x=[1])
    with pytest.raises(ValueError, match="empty"):
        drills.variant(0, x=[])


# ---------------------------------------------------------------------------- drills page
DRILLS = sorted((ROOT / "solutions").glob("drill_*.ipynb"))


def test_drills_page_lists_every_drill_notebook():
    page = (ROOT / "book" / "drills.md").read_text()
    listed = re.findall(r"`(drill_\d\d_\w+)\.ipynb`", page)
    assert listed == [p.stem for p in DRILLS]


def test_drills_cover_the_classics_and_enough_questions():
    nbformat = pytest.importorskip("nbformat")
    checks = classics = 0
    for path in DRILLS:
        nb = nbformat.read(path, as_version=4)
        checks += sum("check" in c.metadata.get("tags", []) for c in nb.cells)
        classics += sum(c.cell_type == "markdown" and "(classic)" in c.source for c in nb.cells)
    assert checks >= 40
    assert classics == 6
