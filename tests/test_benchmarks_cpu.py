"""The GPU benchmarks' own code paths, on mock devices: each script's --cpu mode runs in
seconds and writes a valid result with provenance that shardlab.results can read.

The timings of these runs mean nothing (gloo on a CPU); the checks are that every variant
runs, passes its correctness check, and lands in the JSON the book reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from shardlab import cost, results

from conftest import ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = ("collectives", "tp_layer", "overlap")

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MPLBACKEND="Agg")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    """Run every script once in --cpu mode (about 5-10 s each)."""
    out = tmp_path_factory.mktemp("bench")
    docs = {}
    for name in SCRIPTS:
        path = out / f"{name}.json"
        proc = _run([str(BENCH / f"{name}.py"), "--cpu", "--out", str(path)])
        assert proc.returncode == 0, f"{name} --cpu failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        docs[name] = json.loads(path.read_text())
    return out, docs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_needs_no_gpu(name):
    proc = _run([str(BENCH / f"{name}.py"), "--help"], timeout=60)
    assert proc.returncode == 0 and "--cpu" in proc.stdout and "--out" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_result_envelope_and_provenance(cpu_results, name):
    sys.path.insert(0, str(BENCH))
    import provenance

    doc = cpu_results[1][name]
    assert doc["schema"] == results.SCHEMA and doc["benchmark"] == name
    assert doc["complete"] is True and doc["errors"] == []
    prov = doc["provenance"]
    assert set(provenance.PROVENANCE_KEYS) <= set(prov)
    assert prov["backend"] == "gloo" and prov["world_size"] == 2 and prov["device_kind"] == "mock"
    assert prov["torch"] and prov["python"] and prov["date"]
    assert prov["env"]["NCCL_NVLS_ENABLE"] == "0"
    host = socket.gethostname()
    if len(host) > 4:
        assert host not in json.dumps(doc)
    # shardlab.results reads it back.
    assert results.load_result(cpu_results[0] / f"{name}.json")["benchmark"] == name
    assert "mock devices" in results.provenance_line(doc)


def test_collectives_cover_every_op_dtype_and_size(cpu_results):
    doc = cpu_results[1]["collectives"]
    ms = doc["results"]["measurements"]
    sizes = doc["config"]["sizes"]
    assert sizes[0] == 4096
    assert {(m["op"], m["dtype"]) for m in ms} == {(op, dt) for op in
                                                  ("all_reduce", "all_gather", "reduce_scatter",
                                                   "all_to_all", "send_recv")
                                                  for dt in ("bf16", "fp16")}
    assert len(ms) == 10 * len(sizes)
    for m in ms:
        assert m["shardlab_s"] > 0 and m["raw_s"] > 0
        assert len(m["shardlab_repeats_s"]) == doc["config"]["repeats"]
        assert m["ratio"] == pytest.approx(m["shardlab_s"] / m["raw_s"])
    assert all(c["ok"] for c in doc["results"]["checks"]) and len(doc["results"]["checks"]) == 10
    assert len(doc["summary"]["fits"]) == 10
    model = results.calibrated_model(doc)
    assert isinstance(model, cost.CollectiveModel) and "allreduce" in model.params


def test_tp_layer_variants_are_correct(cpu_results):
    doc = cpu_results[1]["tp_layer"]
    res = doc["results"]
    assert res["ceilings"]["hbm_bandwidth"] > 0 and res["ceilings"]["bf16_peak"] > 0
    checks = res["checks"]
    assert checks and all(c["ok"] for c in checks), checks
    variants = {m["variant"] for m in res["measurements"]}
    assert variants == {"tp1", "shardlab", "shardlab-overlap", "dtensor"}  # graphs need CUDA
    assert {s["why"] for s in res["skipped"]} == {"CUDA graphs need a GPU"}
    assert {(r["phase"], r["tp"]) for r in res["roofline"]} == {
        ("decode", 1), ("decode", 2), ("prefill", 1), ("prefill", 2)}
    rows = doc["summary"]["rows"]
    assert [r["shape"] for r in rows] == ["decode b=1", "decode b=4", "prefill 16 tok", "prefill 32 tok"]
    assert all(r["speedup"] is not None and r["vs_dtensor"] is not None for r in rows)


def test_overlap_variants_are_correct(cpu_results):
    doc = cpu_results[1]["overlap"]
    checks = doc["results"]["checks"]
    assert checks and all(c["ok"] for c in checks)
    assert {m["variant"] for m in doc["results"]["measurements"]} == {
        "compute_only", "allreduce_only", "sequential", "chunked", "async_op"}
    assert doc["summary"]["rows"][0]["best_variant"].startswith("async_op")


def test_run_gpu_script_is_valid_bash_and_keeps_multicast_off():
    script = BENCH / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in text
    for name in ("collectives", "tp_mlp", "tp_layer", "overlap", "pipeline", "alltoall", "pytest-gpu"):
        assert name in text


def test_pipeline_figure_draws_a_mock_device_result(tmp_path):
    """A learner's own --cpu run (no CUDA memory) still draws; every schedule has its line."""
    import matplotlib.pyplot as plt

    from shardlab.viz import pipeline as pviz

    path = tmp_path / "pipeline.json"
    proc = _run([str(BENCH / "pipeline.py"), "--cpu", "--microbatches", "2,4", "--out", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(path.read_text())
    fig = pviz.benchmark_figure(doc)
    bubble, memory = fig.axes[:2]
    labels = [line.get_label() for line in bubble.lines]
    for name in ("gpipe", "1f1b", "interleaved-1f1b"):
        assert f"{name} measured" in labels
    assert "interleaved-1f1b closed form (v=2)" in labels
    assert not memory.lines and "not measured" in memory.get_title(loc="left")
    assert "interleaved-1f1b" in pviz.format_benchmark(doc)
    plt.close(fig)
