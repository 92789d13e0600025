"""Exercises and drills: the learner's copy is generated from the solution, and its
self-checks fail until solved. (nbval runs the solutions themselves and checks they pass.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The notebook tooling is installed by `make test`; a bare GPU machine may lack it.
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_exercises  # noqa: E402

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_learner_notebooks_are_generated_from_solutions():
    assert make_exercises.main(check=True) == 0


def test_stub_generation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n"
    assert make_exercises.strip_source(src) == \
        'def f(x):\n    raise NotImplementedError("your turn: replace this line with your code")'
    src = "### BEGIN SOLUTION\n### STUB: answer = None\nanswer = 42\n### END SOLUTION"
    assert make_exercises.strip_source(src) == "answer = None"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[s.stem for s in SOLUTIONS])
def test_every_check_fails_on_the_unsolved_notebook(solution):
    nb = make_exercises.learner_notebook(solution)
    checks = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    assert checks, "no cell tagged 'check'"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(solution.parent)}})
    client.execute()

    def errored(cell) -> bool:
        return any(o.get("output_type") == "error" for o in cell.get("outputs", []))

    passing = [c.source.splitlines()[0] for c in checks if not errored(c)]
    assert not passing, f"checks that pass without an answer: {passing}"
    crashes = [c.source.splitlines()[0] for c in nb.cells
               if c.cell_type == "code" and errored(c) and c not in checks]
    assert not crashes, f"non-check cells that fail on the stub: {crashes}"
