"""Build the HTML book (notebooks executed on mock devices) with warnings as errors.

Used by `make book` and by the test suite. Prints the build time and where the HTML is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"


def build(clean: bool = False) -> float:
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(BOOK), "--warningiserror", "--keep-going", "--builder", "html"]
    if clean:
        cmd.insert(2, "--all")
    # The kernels need matplotlib's inline backend: under "Agg", plt.show() and display(fig)
    # emit no image, and the book would lose every figure, widget figures included.
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"),
               MPLBACKEND="module://matplotlib_inline.backend_inline",
               SHARDLAB_BOOK_BUILD="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    print(f"book built in {seconds:.0f} s: {HTML / 'index.html'}")
    return seconds


if __name__ == "__main__":
    build(clean="--clean" in sys.argv)
