"""Dashboard for 3D parallelism: the TP x PP x DP rank grid and a rank's groups (chapter 8)."""

from __future__ import annotations

from ..mesh import ParallelDims
from ..viz import mesh as meshviz

__all__ = ["grid_controls", "grid_dashboard", "draw_grid"]


def draw_grid(tp: int = 2, pp: int = 2, dp: int = 2, gpus_per_node: int = 4, highlight: int = 0):
    """`viz.mesh.grid_figure` from plain numbers (the highlighted rank is clipped to the grid)."""
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    return meshviz.grid_figure(dims, gpus_per_node, min(highlight, dims.world_size - 1))


def grid_controls(tp: int = 2, pp: int = 2, dp: int = 2, gpus_per_node: int = 4,
                  highlight: int = 0) -> dict:
    import ipywidgets as w

    style = {"description_width": "110px"}
    return {
        "tp": w.Dropdown(options=[1, 2, 4, 8], value=tp, description="TP degree", style=style),
        "pp": w.Dropdown(options=[1, 2, 3, 4, 6, 8], value=pp, description="PP degree", style=style),
        "dp": w.Dropdown(options=[1, 2, 3, 4, 6], value=dp, description="DP degree", style=style),
        "gpus_per_node": w.Dropdown(options=[2, 4, 8], value=gpus_per_node,
                                    description="GPUs per node", style=style),
        "highlight": w.BoundedIntText(value=highlight, min=0, max=1023, description="highlight rank",
                                      style=style),
    }


def grid_dashboard(**defaults) -> None:
    """Pick TP, PP, DP and the node size; see where every rank sits and one rank's groups."""
    from . import figure_dashboard

    figure_dashboard(draw_grid, grid_controls(**defaults), title="3D parallelism: the rank grid")
