"""Dashboard for sequence parallelism: activation memory against sequence length (chapter 7)."""

from __future__ import annotations

from ..viz import sequence_parallel as spviz

__all__ = ["activation_controls", "activation_dashboard"]

MODELS_SHOWN = ("llama3-8b", "llama2-70b", "llama3-70b", "llama3-405b")


def activation_controls(model: str = "llama3-70b", tp: int = 8, seq_len: int = 131072,
                        batch: int = 1, flash_attention: bool = True) -> dict:
    """The controls of `activation_dashboard`, keyed like the figure's arguments."""
    import ipywidgets as w

    style = {"description_width": "110px"}
    return {
        "model": w.Dropdown(options=list(MODELS_SHOWN), value=model, description="model", style=style),
        "tp": w.Dropdown(options=[2, 4, 8], value=tp, description="TP degree", style=style),
        "seq_len": w.SelectionSlider(options=[2**k for k in range(12, 21)], value=seq_len,
                                     description="longest sequence", style=style),
        "batch": w.Dropdown(options=[1, 2, 4, 8], value=batch, description="batch", style=style),
        "flash_attention": w.Checkbox(value=flash_attention, description="flash attention"),
    }


def activation_dashboard(**defaults) -> None:
    """Training activations per GPU (one layer, all layers) for no parallelism, TP, TP + SP."""
    from . import figure_dashboard

    figure_dashboard(spviz.activation_memory_figure, activation_controls(**defaults),
                     title="Sequence parallelism: activation memory per GPU")
