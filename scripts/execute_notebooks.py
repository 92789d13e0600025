"""Execute notebooks in place so that their stored outputs are the ones nbval compares.

    .venv/bin/python scripts/execute_notebooks.py notebooks/01_memory_wall.ipynb [...]

Run it after editing a notebook; commit the notebook with its outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, timeout: int = 300) -> float:
    nb = nbformat.read(path, as_version=4)
    os.environ.pop("MPLBACKEND", None)  # the inline backend, as in JupyterLab and the book
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return seconds


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {execute(Path(arg)):.1f} s")
