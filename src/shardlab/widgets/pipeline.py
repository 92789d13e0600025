"""Dashboard for pipeline parallelism (chapters 5 and 6): schedule x stages x micro-batches
x backward/forward ratio -> the simulated Gantt chart, its bubble and its peak memory."""

from __future__ import annotations

from ..pipeline import SCHEDULE_NAMES
from ..viz import pipeline as pviz

__all__ = ["pipeline_controls", "pipeline_dashboard"]

STYLE = {"description_width": "130px"}


def pipeline_controls(name: str = "1f1b", stages: int = 4, microbatches: int = 8, chunks: int = 2,
                      backward_ratio: float = 2.0, weight_fraction: float = 0.5) -> dict:
    """The controls of `pipeline_dashboard`, keyed like `viz.pipeline.schedule_figure`."""
    import ipywidgets as w

    return {
        "name": w.Dropdown(options=list(SCHEDULE_NAMES), value=name, description="schedule",
                           style=STYLE),
        "stages": w.IntSlider(value=stages, min=1, max=8, description="stages p", style=STYLE),
        "microbatches": w.IntSlider(value=microbatches, min=1, max=32,
                                    description="micro-batches m", style=STYLE),
        "chunks": w.IntSlider(value=chunks, min=2, max=4, description="chunks v (interleaved)",
                              style=STYLE),
        "backward_ratio": w.FloatSlider(value=backward_ratio, min=0.5, max=4.0, step=0.25,
                                        description="t_b / t_f", style=STYLE),
        "weight_fraction": w.FloatSlider(value=weight_fraction, min=0.0, max=1.0, step=0.05,
                                         description="W share of t_b (zb-h1)", style=STYLE),
    }


def pipeline_dashboard(**defaults) -> None:
    """Schedule x stages x micro-batches x t_b/t_f -> the simulated timeline, with its
    bubble fraction and per-stage peak activations in the title. Shows the default
    figure as an image; the controls redraw it (in JupyterLab)."""
    from . import figure_dashboard

    figure_dashboard(pviz.schedule_figure, pipeline_controls(**defaults),
                     title="Pipeline schedules, simulated")
