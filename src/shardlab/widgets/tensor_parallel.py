"""Dashboards for tensor parallelism: communication against compute (chapter 4)."""

from __future__ import annotations

from ..viz import tensor_parallel as tpviz

__all__ = ["comm_vs_compute_dashboard", "comm_vs_compute_controls"]

MODELS_SHOWN = ("llama3-8b", "llama2-70b", "llama3-70b", "llama3-405b")
GPUS_SHOWN = ("h100-80gb", "a100-80gb", "h200-141gb", "l40s-48gb")


def comm_vs_compute_controls(model: str = "llama3-70b", gpu: str = "h100-80gb",
                             link: str = "nvlink-h100", phase: str = "decode", batch: int = 1,
                             seq_len: int = 4096, tp: int = 4) -> dict:
    """The controls of `comm_vs_compute_dashboard`, keyed like the figure's arguments."""
    import ipywidgets as w

    style = {"description_width": "90px"}
    return {
        "phase": w.ToggleButtons(options=["decode", "prefill"], value=phase, description="phase",
                                 style=style),
        "tp": w.Dropdown(options=[1, 2, 4, 8], value=tp, description="TP degree", style=style),
        "batch": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=batch,
                                   description="batch", style=style),
        "seq_len": w.SelectionSlider(options=[128, 512, 1024, 2048, 4096, 8192, 16384, 32768],
                                     value=seq_len, description="seq length", style=style),
        "link": w.Dropdown(options=list(tpviz.LINK_CHOICES), value=link, description="link",
                           style=style),
        "model": w.Dropdown(options=list(MODELS_SHOWN), value=model, description="model", style=style),
        "gpu": w.Dropdown(options=list(GPUS_SHOWN), value=gpu, description="GPU", style=style),
    }


def comm_vs_compute_dashboard(**defaults) -> None:
    """TP degree x batch x sequence length x link -> all-reduce time against compute time
    of one forward pass (decode: one token after ``seq_len`` cached; prefill: ``seq_len``
    prompt tokens). Shows the default figure as an image; the controls redraw it."""
    from . import figure_dashboard

    figure_dashboard(tpviz.comm_vs_compute_figure, comm_vs_compute_controls(**defaults),
                     title="Tensor parallelism: communication vs compute per forward pass")
