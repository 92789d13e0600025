"""The whole test suite in one pytest run (the README's test command and CI's).

Unit and multi-rank tests, the exercise/drill self-checks, nbval over every notebook,
solution and solved drill, and finally the book build (warnings as errors) with its
browser check: `tests/conftest.py` orders the book tests last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NBVAL_DIRS = ["notebooks", "solutions"]

if __name__ == "__main__":
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.pop("MPLBACKEND", None)  # kernels keep the inline backend, as in JupyterLab
    cmd = [sys.executable, "-m", "pytest", "tests", *[d for d in NBVAL_DIRS if (ROOT / d).exists()],
           "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg",
           "--nbval-current-env", "--nbval-cell-timeout", "300", "-p", "no:cacheprovider", *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))
