"""Generate the learner's notebooks from the solved ones: solutions/ is the single source.

    solutions/ex03_column_row.ipynb  ->  exercises/ex03_column_row.ipynb
    solutions/drill_02_tensor.ipynb  ->  drills/drill_02_tensor.ipynb

In a solved notebook, the lines between `### BEGIN SOLUTION` and `### END SOLUTION` are the
answer. The learner's copy gets, in their place, the block's `### STUB:` lines (uncommented,
e.g. `### STUB: answer = None`) or, if there are none, a `raise NotImplementedError`. Outputs
are cleared. Cells tagged `check` hold the self-checks that must fail on the stub and pass on
the solution (tests/test_exercises.py proves both).

    .venv/bin/python scripts/make_exercises.py          # regenerate all
    .venv/bin/python scripts/make_exercises.py --check  # exit 1 if any is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
BEGIN = re.compile(r"^(\s*)### BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
STUB = re.compile(r"^\s*### STUB: ?(.*)$")


def target_for(solution: Path) -> Path:
    folder = "drills" if solution.name.startswith("drill") else "exercises"
    return ROOT / folder / solution.name


def strip_source(source: str) -> str:
    out: list[str] = []
    block: list[str] | None = None
    indent = ""
    for line in source.splitlines():
        if block is None:
            m = BEGIN.match(line)
            if m:
                block, indent = [], m.group(1)
            else:
                out.append(line)
        elif END.match(line):
            stubs = [STUB.match(x).group(1) for x in block if STUB.match(x)]
            out += [indent + s for s in stubs] or \
                [indent + 'raise NotImplementedError("your turn: replace this line with your code")']
            block = None
        else:
            block.append(line)
    if block is not None:
        raise ValueError("### BEGIN SOLUTION without ### END SOLUTION")
    return "\n".join(out)


def learner_notebook(solution: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = strip_source(cell.source)
            cell.outputs = []
            cell.execution_count = None
    return nb


def main(check: bool = False) -> int:
    stale = []
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        target = target_for(solution)
        text = nbformat.writes(learner_notebook(solution)) + "\n"
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.relative_to(ROOT))
        else:
            target.parent.mkdir(exist_ok=True)
            target.write_text(text)
    if stale:
        print("out of date (run scripts/make_exercises.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
