"""Dashboard for expert parallelism: routing, capacity and dropped tokens (chapter 9)."""

from __future__ import annotations

from ..viz import expert_parallel as epviz

__all__ = ["routing_controls", "routing_dashboard"]


def routing_controls(tokens: int = 512, experts: int = 8, top_k: int = 2,
                     capacity_factor: float = 1.25, skew: float = 0.5, ep: int = 4) -> dict:
    import ipywidgets as w

    style = {"description_width": "110px"}
    return {
        "capacity_factor": w.SelectionSlider(options=[0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
                                             value=capacity_factor,
                                             description="capacity factor (0: dropless)", style=style),
        "skew": w.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="router skew",
                              style=style),
        "top_k": w.Dropdown(options=[1, 2], value=top_k, description="top-k", style=style),
        "experts": w.Dropdown(options=[4, 8, 16], value=experts, description="experts", style=style),
        "ep": w.Dropdown(options=[1, 2, 4, 8], value=ep, description="EP degree", style=style),
        "tokens": w.Dropdown(options=[128, 512, 2048], value=tokens, description="tokens", style=style),
    }


def routing_dashboard(**defaults) -> None:
    """Tokens per expert under top-k routing, with the capacity line and the dropped part."""
    from . import figure_dashboard

    figure_dashboard(epviz.routing_figure, routing_controls(**defaults),
                     title="Expert parallelism: routing and capacity")
