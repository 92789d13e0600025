"""Measurements from real GPUs, read back with their provenance, and the cost model they calibrate.

The scripts in ``benchmarks/`` write one JSON document per benchmark into
``benchmarks/results/`` (the envelope is described in ``benchmarks/provenance.py``)::

    {"schema": "shardlab.benchmark/1", "benchmark": "collectives", "complete": true,
     "provenance": {"gpu": ..., "gpu_count": 2, "link": "NV18", "driver": ..., ...},
     "config": {...}, "results": {...}, "summary": {...}, "errors": [...]}

This module turns them into what the book shows: a provenance line for every caption
(:func:`provenance_line`), the alpha-beta model fitted on the measured collectives
(:func:`calibrated_model`) next to the link presets it replaces
(:func:`compare_collective`), and the tensor-parallel layer and overlap tables. Nothing
here needs torch or a GPU: it reads files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import cost
from .hardware import LINKS, LinkSpec, get_link, parse_topology

__all__ = [
    "SCHEMA", "BENCHMARKS", "OP_TO_COLLECTIVE", "RATIO_GOAL", "CALIBRATION_GOAL",
    "DECODE_SPEEDUP_GOAL", "PREFILL_SPEEDUP_GOAL",
    "results_dir", "result_path", "available", "load_result", "try_load", "missing_note",
    "provenance_line", "preset_link", "measured_curve", "calibrated_model",
    "compare_collective", "summarize_collectives", "format_collectives",
    "summarize_tp_layer", "format_tp_layer", "predict_tp_layer", "format_tp_prediction",
    "summarize_overlap", "format_overlap",
    "format_table", "format_bytes", "format_seconds", "format_bandwidth",
    "predicted_rows",
]

SCHEMA = "shardlab.benchmark/1"
# The benchmarks whose results the book reads, with the script that makes each.
BENCHMARKS = {
    "collectives": "benchmarks/collectives.py",
    "tp_layer": "benchmarks/tp_layer.py",
    "overlap": "benchmarks/overlap.py",
    "tp_mlp": "benchmarks/tp_mlp.py",
    "pipeline": "benchmarks/pipeline.py",
    "alltoall": "benchmarks/alltoall.py",
}
# Benchmark op names (torch.distributed's) -> shardlab.cost collective names.
OP_TO_COLLECTIVE = {"all_reduce": "allreduce", "all_gather": "allgather",
                    "reduce_scatter": "reduce_scatter", "all_to_all": "alltoall",
                    "send_recv": "p2p"}

RATIO_GOAL = 1.03  # shardlab.comm within 3% of raw torch.distributed at every size
CALIBRATION_GOAL = 0.25  # calibrated alpha-beta model within 25% at every size
DECODE_SPEEDUP_GOAL = 1.5  # TP=2 decode vs one GPU
PREFILL_SPEEDUP_GOAL = 1.9  # TP=2 prefill vs one GPU

_REQUIRED = ("schema", "benchmark", "provenance", "config", "results")
_PROVENANCE_REQUIRED = ("gpu", "gpu_count", "driver", "cuda", "torch", "python", "date",
                        "backend", "world_size")


# --------------------------------------------------------------------------- files

def results_dir(directory: str | Path | None = None) -> Path:
    """Where stored results live: `directory`, else $SHARDLAB_RESULTS, else the checkout's
    ``benchmarks/results``."""
    if directory is not None:
        return Path(directory)
    if os.environ.get("SHARDLAB_RESULTS"):
        return Path(os.environ["SHARDLAB_RESULTS"])
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def result_path(name: str, directory: str | Path | None = None) -> Path:
    return results_dir(directory) / f"{name}.json"


def available(directory: str | Path | None = None) -> list[str]:
    """Names of the stored benchmark results (``collectives``, ``tp_layer``, ...), sorted.
    Other JSON files in the folder (notes without this schema) are left out."""
    d = results_dir(directory)
    names = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            with open(path, encoding="utf-8") as f:
                if json.load(f).get("schema") == SCHEMA:
                    names.append(path.stem)
        except (OSError, ValueError, AttributeError):
            continue
    return names


def _validate(doc: dict, where: str) -> dict:
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ValueError(f"{where} is not a shardlab benchmark result: it lacks {missing}")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"{where} has schema {doc['schema']!r}; this shardlab reads {SCHEMA!r}")
    gone = [k for k in _PROVENANCE_REQUIRED if k not in doc["provenance"]]
    if gone:
        raise ValueError(f"{where}: provenance lacks {gone}; re-run the benchmark to regenerate it")
    return doc


def load_result(name: str | Path, directory: str | Path | None = None) -> dict:
    """Load one stored result by benchmark name (``"collectives"``) or by path, and check
    that it carries its provenance. Raises FileNotFoundError with the command that makes it."""
    path = Path(name)
    if path.suffix != ".json":
        path = result_path(str(name), directory)
    if not path.is_file():
        raise FileNotFoundError(missing_note(path.stem, path))
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return _validate(doc, str(path))


def try_load(name: str, directory: str | Path | None = None) -> dict | None:
    """`load_result`, or None when the file is absent (a malformed file still raises)."""
    try:
        return load_result(name, directory)
    except FileNotFoundError:
        return None


def missing_note(name: str, path: Path | None = None) -> str:
    """What the book prints in place of an absent result, and how to produce it."""
    script = BENCHMARKS.get(name, f"benchmarks/{name}.py")
    where = path or Path("benchmarks/results") / f"{name}.json"
    return (f"No stored result for '{name}' yet ({where} is absent). It is measured on real "
            f"GPUs by `{script}`; `bash benchmarks/run_gpu.sh` runs every benchmark and "
            f"writes the JSON files (see benchmarks/README.md).")


# --------------------------------------------------------------------------- provenance

def provenance_line(result: dict) -> str:
    """One line for a caption: what the numbers were measured on, with which software, when.

    >>> provenance_line(doc)                                   # doctest: +SKIP
    'collectives: 2 x NVIDIA H100 80GB HBM3 (NV18), driver 580.159.04, CUDA 12.8, NCCL 2.27.5, torch 2.11.0, Python 3.12.3, 2026-11-26'
    """
    p = result["provenance"]
    date = str(p.get("date") or "")[:10]
    if p.get("backend") == "nccl" and p.get("gpu"):
        link = f" ({p['link']})" if p.get("link") else ""
        parts = [f"{p.get('world_size') or p['gpu_count']} x {p['gpu']}{link}"]
        for key, label in (("driver", "driver"), ("cuda", "CUDA"), ("nccl", "NCCL")):
            if p.get(key):
                parts.append(f"{label} {p[key]}")
    else:
        parts = [f"{p.get('world_size')} mock devices (gloo on CPU: timings not meaningful)"]
    parts += [f"torch {p['torch']}", f"Python {p['python']}"]
    if date:
        parts.append(date)
    return f"{result.get('benchmark', 'result')}: " + ", ".join(parts)


def preset_link(result: dict) -> LinkSpec:
    """The link preset the course would use before measuring: from the stored topology
    (``NV18`` -> 18 x 25 GB/s), else from the GPU model, else ``nvlink-h100``."""
    p = result["provenance"]
    topo = p.get("topology")
    if topo:
        try:
            t = parse_topology(topo)
            if t.num_gpus >= 2:
                return t.link_spec(0, 1)
        except ValueError:
            pass
    gpu = str(p.get("gpu") or "").upper()
    for key, link in (("H200", "nvlink-h200"), ("H100", "nvlink-h100"), ("A100", "nvlink-a100")):
        if key in gpu:
            return LINKS[link]
    return get_link("nvlink-h100")


# --------------------------------------------------------------------------- collectives

def _measurements(result: dict, op: str | None = None, dtype: str | None = None) -> list[dict]:
    rows = result["results"].get("measurements", [])
    return [m for m in rows if (op is None or m["op"] == op) and (dtype is None or m["dtype"] == dtype)]


def _default_dtype(result: dict) -> str:
    dtypes = [m["dtype"] for m in _measurements(result)]
    if not dtypes:
        raise ValueError("this result holds no collective measurements")
    return "bf16" if "bf16" in dtypes else dtypes[0]


def measured_curve(result: dict, op: str, dtype: str | None = None,
                   impl: str = "shardlab") -> tuple[np.ndarray, np.ndarray]:
    """Sizes (bytes) and median times (s) of one collective, sorted by size."""
    dtype = dtype or _default_dtype(result)
    rows = sorted(_measurements(result, op, dtype), key=lambda m: m["bytes"])
    if not rows:
        have = sorted({(m["op"], m["dtype"]) for m in _measurements(result)})
        raise ValueError(f"no measurements of {op} in {dtype}; the result has {have}")
    return (np.array([m["bytes"] for m in rows], dtype=float),
            np.array([m[f"{impl}_s"] for m in rows], dtype=float))


def _world(result: dict) -> int:
    return int(result["config"].get("world_size") or result["provenance"]["world_size"])


def calibrated_model(result: dict, dtype: str | None = None, impl: str = "shardlab",
                     objective: str = "minimax") -> cost.CollectiveModel:
    """A `cost.CollectiveModel` with alpha and B fitted per collective on the stored times.

    Refitted from the raw measurements (not from stored parameters), so the calibration is
    reproducible from the data. Collectives that were not measured fall back to the preset.
    The default objective, "minimax", gives the alpha and B whose worst relative error over
    all sizes is smallest: the fit that a goal like "within 25% at every size" asks for, and
    the best any alpha-beta model can do on these times (see `cost.fit_alpha_beta`).
    """
    dtype = dtype or _default_dtype(result)
    p = _world(result)
    model = None
    for op, collective in OP_TO_COLLECTIVE.items():
        if not _measurements(result, op, dtype):
            continue
        sizes, times = measured_curve(result, op, dtype, impl)
        fit = cost.fit_alpha_beta(sizes, times, p, collective, objective=objective,
                                  name=f"calibrated ({dtype})", source=provenance_line(result),
                                  fallback=preset_link(result))
        model = fit if model is None else model.merged(fit)
    if model is None:
        raise ValueError("this result holds no collective measurements to calibrate on")
    return model


def compare_collective(result: dict, op: str = "all_reduce", dtype: str | None = None,
                       impl: str = "shardlab", model: cost.CollectiveModel | None = None) -> list[dict]:
    """Per size: measured time and bus bandwidth, the preset's and the calibrated model's
    predictions with their relative errors, and the shardlab / raw ratio."""
    dtype = dtype or _default_dtype(result)
    collective = OP_TO_COLLECTIVE[op]
    p = _world(result)
    model = model or calibrated_model(result, dtype, impl)
    preset = preset_link(result)
    rows = []
    for m in sorted(_measurements(result, op, dtype), key=lambda m: m["bytes"]):
        t = m[f"{impl}_s"]
        pre = float(cost.collective_time(collective, m["bytes"], p, preset))
        cal = float(cost.collective_time(collective, m["bytes"], p, model))
        rows.append({"bytes": m["bytes"], "measured_s": t, "raw_s": m["raw_s"],
                     "ratio": m["shardlab_s"] / m["raw_s"],
                     "busbw": cost.bus_bandwidth(m["bytes"], t, p, collective),
                     "preset_s": pre, "preset_error": cost.relative_error(pre, t),
                     "calibrated_s": cal, "calibrated_error": cost.relative_error(cal, t),
                     "spread": m.get(f"{impl}_spread")})
    return rows


def summarize_collectives(result: dict, impl: str = "shardlab") -> dict:
    """Fits and goal verdicts per (collective, dtype): the summary the benchmark stores."""
    preset = preset_link(result)
    fits = []
    pairs = sorted({(m["op"], m["dtype"]) for m in _measurements(result)},
                   key=lambda od: (list(OP_TO_COLLECTIVE).index(od[0]), od[1]))
    models: dict[str, cost.CollectiveModel] = {}
    for op, dtype in pairs:
        collective = OP_TO_COLLECTIVE[op]
        if dtype not in models:  # one fit of every collective per dtype
            models[dtype] = calibrated_model(result, dtype, impl)
        model = models[dtype]
        ab = model.alpha_beta(collective)
        rows = compare_collective(result, op, dtype, impl, model)
        worst_ratio = max(rows, key=lambda r: r["ratio"])
        fits.append({
            "op": op, "collective": collective, "dtype": dtype,
            "alpha_s": ab.alpha, "bandwidth": ab.bandwidth,
            "max_error_preset": max(r["preset_error"] for r in rows),
            "max_error_calibrated": max(r["calibrated_error"] for r in rows),
            "worst_calibrated_bytes": max(rows, key=lambda r: r["calibrated_error"])["bytes"],
            "max_ratio": worst_ratio["ratio"], "worst_ratio_bytes": worst_ratio["bytes"],
            "min_ratio": min(r["ratio"] for r in rows),
            "peak_busbw": max(r["busbw"] for r in rows),
            "ratio_ok": worst_ratio["ratio"] <= RATIO_GOAL,
            "calibration_ok": max(r["calibrated_error"] for r in rows) <= CALIBRATION_GOAL,
        })
    return {"preset": preset.name, "preset_alpha_s": preset.alpha,
            "preset_bandwidth": preset.bandwidth, "impl": impl,
            "goals": {"ratio": RATIO_GOAL, "calibrated_error": CALIBRATION_GOAL},
            "fits": fits, "ratio_ok": all(f["ratio_ok"] for f in fits),
            "calibration_ok": all(f["calibration_ok"] for f in fits)}


# --------------------------------------------------------------------------- formatting

def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def _us(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:,.1f} us" if s < 1e-3 else f"{s * 1e3:,.2f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _x(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def _gbps(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.0f} GB/s"


format_bytes = _bytes  # "4 KiB", "1 GiB"
format_seconds = _us  # "65.0 us", "3.24 ms"
format_bandwidth = _gbps  # "332 GB/s"


def predicted_rows(link="nvlink-h100", p: int = 2, collective: str = "allreduce",
                   sizes: Sequence[int] | None = None) -> list[dict]:
    """What the alpha-beta model predicts on ``link`` (a preset, LinkSpec or CollectiveModel)
    before any measurement: time and bus bandwidth per size, 4 KiB to 1 GiB by default."""
    sizes = sizes or [4096 * 4**k for k in range(10)]
    rows = []
    for nbytes in sizes:
        t = float(cost.collective_time(collective, nbytes, p, link))
        rows.append({"bytes": nbytes, "predicted_s": t,
                     "busbw": cost.bus_bandwidth(nbytes, t, p, collective)})
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A plain-text table: `columns` are (key, header, formatter) triples."""
    header = [h for _, h, _ in columns]
    body = [["-" if r.get(k) is None else fmt(r[k]) for k, _, fmt in columns] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def format_collectives(result: dict, ops: Iterable[str] | None = None, dtype: str | None = None) -> str:
    """The fits, then each collective's per-size comparison, as text."""
    summary = result.get("summary") or summarize_collectives(result)
    dtype = dtype or _default_dtype(result)
    out = [provenance_line(result), "",
           f"alpha-beta fits ({dtype}; preset {summary['preset']}: alpha "
           f"{_us(summary['preset_alpha_s'])}, B {_gbps(summary['preset_bandwidth'])})"]
    fits = [f for f in summary["fits"] if f["dtype"] == dtype]
    out.append(format_table(fits, [
        ("op", "collective", str), ("alpha_s", "alpha", _us), ("bandwidth", "B", _gbps),
        ("peak_busbw", "peak busbw", _gbps), ("max_error_preset", "max err preset", _pct),
        ("max_error_calibrated", "max err calibrated", _pct),
        ("max_ratio", "worst shardlab/raw", lambda v: _x(v, 3)),
        ("worst_ratio_bytes", "at", _bytes)]))
    for op in ops or [f["op"] for f in fits]:
        out += ["", f"{op} ({dtype})"]
        out.append(format_table(compare_collective(result, op, dtype), [
            ("bytes", "size", _bytes), ("measured_s", "shardlab", _us), ("raw_s", "raw", _us),
            ("ratio", "ratio", lambda v: _x(v, 3)), ("busbw", "busbw", _gbps),
            ("preset_s", "preset", _us), ("preset_error", "err", _pct),
            ("calibrated_s", "calibrated", _us), ("calibrated_error", "err", _pct)]))
    return "\n".join(out)


# --------------------------------------------------------------------------- TP layer

def _shape_key(m: dict) -> tuple:
    return (m["phase"], m.get("batch"), m.get("tokens"))


def _best(rows: list[dict], tp: int, prefix: str) -> dict | None:
    ok = [r for r in rows if r["tp"] == tp and r["variant"].startswith(prefix)
          and r.get("seconds") is not None]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def summarize_tp_layer(result: dict) -> dict:
    """Per shape: the best one-GPU time, the best shardlab and DTensor TP=2 times, the
    speedup and its roofline bound, achieved TFLOP/s against the measured peak, and goals."""
    res = result["results"]
    peak = (res.get("ceilings") or {}).get("bf16_peak")
    roof = {(r["phase"], r.get("batch"), r.get("tokens"), r["tp"]): r for r in res.get("roofline", [])}
    shapes: dict[tuple, list] = {}
    for m in res.get("measurements", []):
        shapes.setdefault(_shape_key(m), []).append(m)
    tp = max((m["tp"] for m in res.get("measurements", [])), default=2)
    rows = []
    for key in sorted(shapes, key=lambda k: (k[0] != "decode", k[1] or 0, k[2] or 0)):
        ms = shapes[key]
        one, sl, dt = _best(ms, 1, "tp1"), _best(ms, tp, "shardlab"), _best(ms, tp, "dtensor")
        sl_eager = next((m for m in ms if m["variant"] == "shardlab" and m.get("seconds")), None)
        dt_eager = next((m for m in ms if m["variant"] == "dtensor" and m.get("seconds")), None)
        r1, r2 = roof.get((*key, 1)), roof.get((*key, tp))
        phase, batch, tokens = key
        row = {"phase": phase, "batch": batch, "tokens": tokens,
               "shape": f"decode b={batch}" if phase == "decode" else f"prefill {tokens} tok",
               "tp1_s": one and one["seconds"], "tp1_variant": one and one["variant"],
               "shardlab_s": sl and sl["seconds"], "shardlab_variant": sl and sl["variant"],
               "dtensor_s": dt and dt["seconds"], "dtensor_variant": dt and dt["variant"],
               "roofline_tp1_s": r1 and r1["time_s"], "roofline_tp_s": r2 and r2["time_s"]}
        row["speedup"] = one["seconds"] / sl["seconds"] if one and sl else None
        row["roofline_speedup"] = r1["time_s"] / r2["time_s"] if r1 and r2 else None
        row["vs_dtensor"] = sl["seconds"] / dt["seconds"] if sl and dt else None
        row["vs_dtensor_eager"] = (sl_eager["seconds"] / dt_eager["seconds"]
                                   if sl_eager and dt_eager else None)
        if sl and r2 and r2.get("flops"):
            row["tflops"] = r2["flops"] / sl["seconds"] / 1e12
            row["peak_fraction"] = r2["flops"] / sl["seconds"] / peak if peak else None
            row["roofline_fraction"] = r2["time_s"] / sl["seconds"]
        goal = DECODE_SPEEDUP_GOAL if phase == "decode" else PREFILL_SPEEDUP_GOAL
        row["speedup_goal"] = goal
        row["speedup_ok"] = row["speedup"] is not None and row["speedup"] >= goal
        row["dtensor_ok"] = row["vs_dtensor"] is None or row["vs_dtensor"] <= 1.0
        rows.append(row)
    return {"tp": tp, "rows": rows, "peak_flops": peak,
            "hbm_bandwidth": (res.get("ceilings") or {}).get("hbm_bandwidth"),
            "goals": {"decode_speedup": DECODE_SPEEDUP_GOAL, "prefill_speedup": PREFILL_SPEEDUP_GOAL,
                      "shardlab_vs_dtensor": 1.0},
            "speedup_ok": bool(rows) and all(r["speedup_ok"] for r in rows),
            "dtensor_ok": all(r["dtensor_ok"] for r in rows)}


def format_tp_layer(result: dict) -> str:
    s = result.get("summary") or summarize_tp_layer(result)
    if "rows" not in s:
        s = summarize_tp_layer(result)
    ceil = result["results"].get("ceilings") or {}
    head = [provenance_line(result),
            f"measured ceilings: copy {_gbps(ceil.get('hbm_bandwidth'))}, bf16 matmul "
            f"{(ceil.get('bf16_peak') or 0) / 1e12:,.0f} TFLOP/s"]
    return "\n".join(head + [format_table(s["rows"], [
        ("shape", "shape", str), ("tp1_s", "1 GPU", _us), ("shardlab_s", f"shardlab TP={s['tp']}", _us),
        ("shardlab_variant", "how", str), ("dtensor_s", "DTensor", _us),
        ("speedup", "speedup", _x), ("roofline_speedup", "roofline", _x),
        ("vs_dtensor", "shardlab/DTensor", _x), ("tflops", "TFLOP/s", lambda v: f"{v:,.0f}"),
        ("peak_fraction", "of peak", _pct)])])


def gpu_preset(result: dict) -> str:
    """The course's GPU preset for the card a result was measured on (H100 if unknown)."""
    gpu = str(result["provenance"].get("gpu") or "").upper()
    for key, preset in (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100", "a100-80gb"),
                        ("L40S", "l40s-48gb")):
        if key in gpu:
            return preset
    return "h100-80gb"


def predict_tp_layer(result: dict, collectives: dict | None = None,
                     model: str = "llama3-70b") -> list[dict]:
    """The course's model of every shape in a tp_layer result, beside the measurement.

    Prediction, per layer: `cost.roofline_time` on the datasheet preset of the measured card
    (weights and KV cache over HBM bandwidth, or FLOPs over the bf16 peak), plus at TP > 1
    the layer's two all-reduces on the link model: the alpha-beta model calibrated on
    `collectives` (measured on the same machine) if given, else the link preset.
    """
    gpu = gpu_preset(result)
    link = calibrated_model(collectives) if collectives else preset_link(result)
    hidden = (result["config"].get("shape") or {}).get("hidden") or cost.get_model(model).hidden
    context = result["config"].get("context", 0)
    summary = summarize_tp_layer(result)
    tp, rows = summary["tp"], []
    for r in summary["rows"]:
        decode = r["phase"] == "decode"
        batch, new = (r["batch"], 1) if decode else (1, r["tokens"])
        ctx = context if decode else 0

        def predicted(degree: int) -> float:
            t = cost.roofline_time(model, gpu, batch=batch, new_tokens=new, context_len=ctx,
                                   dtype="bf16", tp=degree, per_layer=True).time
            if degree > 1:
                t += 2 * float(cost.allreduce_time(batch * new * hidden * 2, degree, link))
            return t

        p1, p2 = predicted(1), predicted(tp)
        row = {"shape": r["shape"], "tp": tp, "measured_tp1_s": r["tp1_s"], "predicted_tp1_s": p1,
               "measured_tp_s": r["shardlab_s"], "predicted_tp_s": p2,
               "measured_speedup": r["speedup"], "predicted_speedup": p1 / p2}
        row["tp1_error"] = cost.relative_error(p1, r["tp1_s"]) if r["tp1_s"] else None
        row["tp_error"] = cost.relative_error(p2, r["shardlab_s"]) if r["shardlab_s"] else None
        rows.append(row)
    return rows


def format_tp_prediction(result: dict, collectives: dict | None = None) -> str:
    rows = predict_tp_layer(result, collectives)
    tp = rows[0]["tp"] if rows else 2
    return format_table(rows, [
        ("shape", "shape", str), ("measured_tp1_s", "1 GPU measured", _us),
        ("predicted_tp1_s", "model", _us), ("tp1_error", "err", _pct),
        ("measured_tp_s", f"TP={tp} measured", _us), ("predicted_tp_s", "model", _us),
        ("tp_error", "err", _pct), ("measured_speedup", "speedup measured", _x),
        ("predicted_speedup", "model", _x)])


# --------------------------------------------------------------------------- overlap

def summarize_overlap(result: dict) -> dict:
    """Per token count: sequential time, the best overlapped variant, the gain, and how much
    of the all-reduce was hidden."""
    ms = result["results"].get("measurements", [])
    rows = []
    for tokens in sorted({m["tokens"] for m in ms}):
        mt = [m for m in ms if m["tokens"] == tokens and m.get("seconds") is not None]
        get = {(m["variant"], m["chunks"]): m["seconds"] for m in mt}
        seq = get.get(("sequential", 1))
        over = [m for m in mt if m["variant"] in ("async_op", "side_stream")]
        best = min(over, key=lambda m: m["seconds"]) if over else None
        comp, ar = get.get(("compute_only", 1)), get.get(("allreduce_only", 1))
        row = {"tokens": tokens, "sequential_s": seq, "compute_s": comp, "allreduce_s": ar,
               "best_variant": best and f"{best['variant']} x{best['chunks']}",
               "best_s": best and best["seconds"]}
        row["gain"] = seq / best["seconds"] - 1 if seq and best else None
        row["hidden_fraction"] = ((seq - best["seconds"]) / ar) if seq and best and ar else None
        row["ideal_gain"] = (seq / max(comp, ar) - 1) if seq and comp and ar else None
        rows.append(row)
    return {"rows": rows}


def format_overlap(result: dict) -> str:
    s = summarize_overlap(result)
    return "\n".join([provenance_line(result), format_table(s["rows"], [
        ("tokens", "tokens", str), ("compute_s", "MLP only", _us), ("allreduce_s", "all-reduce only", _us),
        ("sequential_s", "MLP then all-reduce", _us), ("best_s", "overlapped", _us),
        ("best_variant", "how", str), ("gain", "gain", _pct),
        ("hidden_fraction", "all-reduce hidden", _pct), ("ideal_gain", "ideal gain", _pct)])])
