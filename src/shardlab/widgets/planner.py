"""The strategy planner as a dashboard (chapter 11): model, GPUs, memory, link, workload,
context -> the ranked layouts as a table and a chart."""

from __future__ import annotations

from ..memory import MODELS
from ..hardware import LINKS

__all__ = ["planner_controls", "planner_draw", "planner_dashboard"]

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MEMORY_CHOICES = (24, 40, 48, 80, 94, 141, 192)
CONTEXT_CHOICES = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def planner_controls(model: str = "llama3-70b", gpus: int = 4, gpu_memory_gb: float = 80,
                     link: str = "nvlink-h100", workload: str = "inference",
                     context: int = 8192, batch: int = 32) -> dict:
    """The dashboard's controls, keyed like :func:`shardlab.planner.plan`'s arguments."""
    import ipywidgets as w

    style = {"description_width": "110px"}
    real_models = [k for k in MODELS if not k.startswith("tiny")]
    return {
        "model": w.Dropdown(options=real_models, value=model, description="model", style=style),
        "gpus": w.SelectionSlider(options=list(GPU_COUNTS), value=gpus, description="GPUs", style=style),
        "gpu_memory_gb": w.SelectionSlider(options=list(MEMORY_CHOICES), value=gpu_memory_gb,
                                           description="GB per GPU", style=style),
        "link": w.Dropdown(options=list(LINKS), value=link, description="link in a node", style=style),
        "workload": w.ToggleButtons(options=["inference", "training"], value=workload,
                                    description="workload", style=style),
        "context": w.SelectionSlider(options=list(CONTEXT_CHOICES), value=context,
                                     description="context", style=style),
        "batch": w.SelectionSlider(options=list(BATCH_CHOICES), value=batch,
                                   description="sequences", style=style),
    }


def planner_draw(model: str, gpus: int, gpu_memory_gb: float, link: str, workload: str,
                 context: int, batch: int):
    """Plan and draw (:func:`shardlab.viz.planner.planner_figure`); a figure with the error
    message when the inputs make no sense (e.g. a context shorter than the output)."""
    from matplotlib.figure import Figure

    from ..planner import plan
    from ..viz.planner import planner_figure

    try:
        result = plan(model, gpus, gpu_memory_gb, link, workload, context=context, batch=batch,
                      output_tokens=min(512, context // 2))
    except ValueError as err:
        fig = Figure(figsize=(10, 1.2))
        fig.text(0.01, 0.5, f"cannot plan: {err}", fontsize=9, va="center")
        return fig
    return planner_figure(result)


def planner_dashboard(**defaults) -> None:
    """Show the planner's figure for the defaults as an image (the static book keeps it);
    in JupyterLab the controls re-plan and redraw it in place."""
    from . import figure_dashboard

    figure_dashboard(planner_draw, planner_controls(**defaults), title="Choose a strategy")
