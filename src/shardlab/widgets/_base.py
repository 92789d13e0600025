"""The one mechanism behind every widget: controls that redraw a figure in place."""

from __future__ import annotations

from typing import Callable


def figure_dashboard(draw: Callable, controls: dict, *, title: str | None = None):
    """Show `draw(**values)` for the controls' default values, then redraw it on every change.

    `draw` returns a matplotlib Figure. `controls` maps keyword names to ipywidgets value
    widgets. The figure is displayed through a display handle (a plain image output, which
    the static HTML book keeps); callbacks update that handle, so JupyterLab redraws in place.
    Returns nothing, so that a cell ending in the call shows the dashboard once.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    box = widgets.VBox(([widgets.HTML(f"<b>{title}</b>")] if title else []) + list(controls.values()))

    def current() -> dict:
        return {name: w.value for name, w in controls.items()}

    display(box)
    fig = draw(**current())
    handle = display(fig, display_id=True)
    plt.close(fig)

    def redraw(_change=None) -> None:
        new = draw(**current())
        handle.update(new)
        plt.close(new)

    for w in controls.values():
        w.observe(redraw, names="value")
