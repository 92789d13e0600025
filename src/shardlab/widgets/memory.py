"""Dashboards for the memory wall (chapter 1) and data parallelism (chapter 2)."""

from __future__ import annotations

from ..viz import memory as memviz

__all__ = ["memory_controls", "memory_dashboard", "dp_scaling_controls", "dp_scaling_dashboard"]

MODELS_SHOWN = ("llama3-8b", "llama2-70b", "llama3-70b", "llama3-405b")
GPUS_SHOWN = ("h100-80gb", "a100-80gb", "h200-141gb", "l40s-48gb")
STYLE = {"description_width": "110px"}


def memory_controls(model: str = "llama3-70b", dtype: str = "fp16", seq_len: int = 8192,
                    batch: int = 8, tp: int = 4, gpu: str = "h100-80gb",
                    kv_dtype: str = "fp16") -> dict:
    """The controls of `memory_dashboard`, keyed like `viz.memory.memory_per_gpu_figure`."""
    import ipywidgets as w

    return {
        "model": w.Dropdown(options=list(MODELS_SHOWN), value=model, description="model",
                            style=STYLE),
        "dtype": w.Dropdown(options=["fp32", "fp16", "bf16", "int8", "int4"], value=dtype,
                            description="weight precision", style=STYLE),
        "kv_dtype": w.Dropdown(options=["fp32", "fp16", "int8"], value=kv_dtype,
                               description="KV precision", style=STYLE),
        "seq_len": w.SelectionSlider(options=[2**k for k in range(10, 18)], value=seq_len,
                                     description="context", style=STYLE),
        "batch": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128], value=batch,
                                   description="batch", style=STYLE),
        "tp": w.Dropdown(options=[1, 2, 4, 8], value=tp, description="TP degree", style=STYLE),
        "gpu": w.Dropdown(options=list(GPUS_SHOWN), value=gpu, description="GPU", style=STYLE),
    }


def memory_dashboard(**defaults) -> None:
    """Model x weight precision x context length x batch x TP degree -> inference memory per
    GPU against the card's capacity. Shows the default figure as an image; the controls
    redraw it (in JupyterLab)."""
    from . import figure_dashboard

    figure_dashboard(memviz.memory_per_gpu_figure, memory_controls(**defaults),
                     title="Inference memory per GPU")


def dp_scaling_controls(model: str = "llama3-8b", gpu: str = "h100-80gb",
                        link: str = "auto", micro_batch: int = 1, seq_len: int = 4096,
                        zero: int = 0, overlap: float = 0.0, max_dp: int = 64) -> dict:
    """The controls of `dp_scaling_dashboard`, keyed like `viz.memory.dp_scaling_figure`."""
    import ipywidgets as w

    from ..hardware import LINKS

    return {
        "model": w.Dropdown(options=list(MODELS_SHOWN), value=model, description="model",
                            style=STYLE),
        "gpu": w.Dropdown(options=list(GPUS_SHOWN), value=gpu, description="GPU", style=STYLE),
        "link": w.Dropdown(options=[("auto: NVLink in a node, IB across", "auto")]
                           + [(k, k) for k in LINKS], value=link,
                           description="all-reduce link", style=STYLE),
        "micro_batch": w.SelectionSlider(options=[1, 2, 4, 8], value=micro_batch,
                                         description="sequences/GPU", style=STYLE),
        "seq_len": w.SelectionSlider(options=[1024, 2048, 4096, 8192], value=seq_len,
                                     description="seq length", style=STYLE),
        "overlap": w.FloatSlider(min=0.0, max=1.0, step=0.25, value=overlap,
                                 description="comm overlap", style=STYLE),
        "zero": w.Dropdown(options=[0, 1, 2, 3], value=zero, description="ZeRO stage",
                           style=STYLE),
        "max_dp": w.Dropdown(options=[8, 16, 32, 64, 128, 256], value=max_dp,
                             description="max GPUs", style=STYLE),
    }


def dp_scaling_dashboard(**defaults) -> None:
    """Data-parallel degree -> modelled throughput and memory per GPU (training)."""
    from . import figure_dashboard

    figure_dashboard(memviz.dp_scaling_figure, dp_scaling_controls(**defaults),
                     title="Data parallelism: throughput vs memory per GPU")
