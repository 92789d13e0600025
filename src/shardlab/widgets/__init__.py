"""ipywidgets dashboards built on the course's plotting functions.

Every dashboard is made by `figure_dashboard`: the figure for the default settings is
shown as an ordinary image output, so the HTML book (no kernel) shows it, and the
controls redraw that same output in place when a learner moves them in JupyterLab.
"""

from ._base import figure_dashboard  # noqa: F401
