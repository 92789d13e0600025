"""Stored GPU results: loading with provenance, captions, calibration, and the book's tables.

The fixtures in tests/fixtures/benchmark_results/ are synthetic: collective times follow an
exact alpha-beta law (alpha 10 us per step, B 300 GB/s), so calibration must recover it.
"""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

matplotlib.use("Agg")

from shardlab import cost, results  # noqa: E402

from conftest import ROOT  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "benchmark_results"


@pytest.fixture(scope="module")
def coll():
    return results.load_result("collectives", FIX)


def test_available_lists_only_benchmark_documents():
    assert results.available(FIX) == ["collectives", "overlap", "tp_layer"]  # not notes.json


def test_load_by_name_and_by_path(coll):
    assert coll["benchmark"] == "collectives"
    again = results.load_result(FIX / "collectives.json")
    assert again == coll


def test_missing_result_says_how_to_make_it(tmp_path):
    assert results.try_load("collectives", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="run_gpu.sh"):
        results.load_result("collectives", tmp_path)
    assert "benchmarks/tp_layer.py" in results.missing_note("tp_layer")


def test_results_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLAB_RESULTS", str(tmp_path))
    assert results.results_dir() == tmp_path
    monkeypatch.delenv("SHARDLAB_RESULTS")
    assert results.results_dir() == ROOT / "benchmarks" / "results"


def test_malformed_results_raise(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"schema": results.SCHEMA, "benchmark": "x"}))
    with pytest.raises(ValueError, match="lacks"):
        results.load_result("x", tmp_path)
    doc = json.loads((FIX / "overlap.json").read_text())
    del doc["provenance"]["driver"]
    (tmp_path / "y.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="provenance lacks"):
        results.load_result("y", tmp_path)


def test_provenance_line_names_hardware_software_and_date(coll):
    line = results.provenance_line(coll)
    for part in ("collectives:", "2 x NVIDIA H100 80GB HBM3 (NV18)", "driver 580.159.04",
                 "CUDA 13.0", "NCCL 2.28.9", "torch 2.11.0+cu130", "2026-11-26"):
        assert part in line


def test_provenance_line_of_mock_devices_warns():
    doc = json.loads((FIX / "overlap.json").read_text())
    doc["provenance"].update(backend="gloo", gpu=None, gpu_count=0)
    assert "mock devices" in results.provenance_line(doc)
    assert "not meaningful" in results.provenance_line(doc)


def test_preset_link_comes_from_the_stored_topology(coll):
    link = results.preset_link(coll)
    assert link.bandwidth == pytest.approx(18 * 25e9)
    doc = json.loads(json.dumps(coll))
    doc["provenance"]["topology"] = None
    assert results.preset_link(doc).name == "nvlink-h100"


def test_calibrated_model_recovers_the_law(coll):
    model = results.calibrated_model(coll)
    assert isinstance(model, cost.CollectiveModel)
    assert set(model.params) == {"allreduce", "allgather", "p2p"}
    for kind in ("allgather", "p2p"):  # exact alpha-beta data: exact fit
        ab = model.params[kind]
        assert ab.alpha == pytest.approx(10e-6, rel=1e-6)
        assert ab.bandwidth == pytest.approx(300e9, rel=1e-6)
        assert ab.p == 2
    # A collective that was not measured falls back to the preset link.
    assert model.alpha_beta("alltoall").bandwidth == pytest.approx(450e9)
    assert "H100" in model.source


def test_calibrated_model_predicts_within_goal(coll):
    rows = results.compare_collective(coll, "all_gather")
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)
    assert max(r["calibrated_error"] for r in rows) < 1e-6
    # The preset (2 us, 450 GB/s) misses small messages by far: that is the lesson.
    assert rows[0]["preset_error"] > 0.7
    assert rows[-1]["busbw"] == pytest.approx(300e9 * (1 - 10e-6 / rows[-1]["measured_s"]), rel=1e-6)


def test_summary_flags_the_wrapper_overhead_at_small_sizes(coll):
    s = results.summarize_collectives(coll)
    fits = {f["op"]: f for f in s["fits"]}
    assert fits["all_reduce"]["max_ratio"] == pytest.approx(1.05)
    assert fits["all_reduce"]["worst_ratio_bytes"] == 4096
    assert not fits["all_reduce"]["ratio_ok"] and fits["all_gather"]["ratio_ok"]
    assert not s["ratio_ok"]
    assert fits["all_gather"]["calibration_ok"]
    text = results.format_collectives(coll)
    assert results.provenance_line(coll) in text and "all_reduce (bf16)" in text


def test_tp_layer_summary(coll):
    doc = results.load_result("tp_layer", FIX)
    s = results.summarize_tp_layer(doc)
    decode, prefill = s["rows"]
    assert decode["shape"] == "decode b=1" and prefill["shape"] == "prefill 8192 tok"
    assert decode["tp1_variant"] == "tp1-graph" and decode["shardlab_variant"] == "shardlab-graph"
    assert decode["speedup"] == pytest.approx(620 / 350)
    assert decode["roofline_speedup"] == pytest.approx(5.9e-4 / 3.25e-4)
    assert decode["vs_dtensor"] == pytest.approx(350 / 900) and decode["dtensor_ok"]
    assert prefill["shardlab_variant"] == "shardlab-overlap"
    assert prefill["speedup"] == pytest.approx(22 / 11.4) and prefill["speedup_ok"]
    assert prefill["tflops"] == pytest.approx(7.5e12 / 11.4e-3 / 1e12)
    assert prefill["peak_fraction"] == pytest.approx(7.5e12 / 11.4e-3 / 7.7e14)
    assert s["speedup_ok"] and s["dtensor_ok"]
    assert "prefill 8192 tok" in results.format_tp_layer(doc)


def test_tp_layer_prediction_is_the_course_model_on_the_measured_card(coll):
    from shardlab import cost

    doc = results.load_result("tp_layer", FIX)
    assert results.gpu_preset(doc) == ("h200-141gb" if "H200" in doc["provenance"]["gpu"]
                                       else "h100-80gb")
    rows = results.predict_tp_layer(doc)
    decode = rows[0]
    ctx, hidden = doc["config"].get("context", 0), 8192
    roof = cost.roofline_time("llama3-70b", results.gpu_preset(doc), batch=1, new_tokens=1,
                              context_len=ctx, dtype="bf16", tp=1, per_layer=True)
    assert decode["predicted_tp1_s"] == pytest.approx(roof.time)
    link = results.preset_link(doc)
    two = cost.roofline_time("llama3-70b", results.gpu_preset(doc), batch=1, new_tokens=1,
                             context_len=ctx, dtype="bf16", tp=2, per_layer=True).time
    assert decode["predicted_tp_s"] == pytest.approx(two + 2 * cost.allreduce_time(hidden * 2, 2, link))
    assert decode["measured_speedup"] == pytest.approx(620 / 350)
    assert decode["tp_error"] == pytest.approx(abs(decode["predicted_tp_s"] - 350e-6) / 350e-6)
    # A calibrated link (tens of microseconds per all-reduce) predicts less TP speedup
    calibrated = results.predict_tp_layer(doc, coll)
    assert calibrated[0]["predicted_speedup"] < decode["predicted_speedup"]
    assert "speedup measured" in results.format_tp_prediction(doc, coll)


def test_overlap_summary():
    doc = results.load_result("overlap", FIX)
    (row,) = results.summarize_overlap(doc)["rows"]
    assert row["best_variant"] == "async_op x4"
    assert row["gain"] == pytest.approx(3.8 / 3.7 - 1)
    assert row["hidden_fraction"] == pytest.approx(0.1e-3 / 0.2e-3)
    assert row["ideal_gain"] == pytest.approx(3.8 / 3.6 - 1)
    assert "async_op x4" in results.format_overlap(doc)


def test_figures_carry_the_provenance_line(coll):
    import matplotlib.pyplot as plt

    from shardlab.viz import measured as vm

    tp = results.load_result("tp_layer", FIX)
    ov = results.load_result("overlap", FIX)
    figs = [vm.collective_figure(coll), vm.busbw_figure(coll), vm.ratio_figure(coll),
            vm.tp_speedup_figure(tp), vm.overlap_figure(ov)]
    for fig, doc in zip(figs, [coll, coll, coll, tp, ov]):
        texts = [t.get_text() for t in fig.texts]
        assert results.provenance_line(doc) in texts
        plt.close(fig)


def test_format_table_shows_missing_values_as_dashes():
    text = results.format_table([{"a": 1, "b": None}], [("a", "A", str), ("b", "B", results._us)])
    assert text.splitlines()[-1].split() == ["1", "-"]
    assert not math.isnan(results.CALIBRATION_GOAL)
