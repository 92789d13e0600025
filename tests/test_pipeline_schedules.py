"""Pipeline schedules as data: op orders, dependencies, errors, the validity check."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from shardlab.pipeline import (
    SCHEDULE_NAMES,
    Op,
    Schedule,
    execution_order,
    schedule,
    validate_schedule,
)

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "src" / "shardlab" / "pipeline"


def cases():
    """(name, p, m, v) for every schedule over a grid of sizes."""
    for name in SCHEDULE_NAMES:
        for p in range(1, 9):
            for m in range(1, 17):
                if name == "interleaved-1f1b":
                    if m % p == 0:
                        for v in (2, 3, 4):
                            yield name, p, m, v
                else:
                    yield name, p, m, 1


def test_names_are_the_contract():
    assert SCHEDULE_NAMES == ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


# --------------------------------------------------------------------------- pinned orders


def test_1f1b_p4_m8_pinned():
    s = schedule("1f1b", 4, 8)
    assert (s.name, s.stages, s.microbatches, s.chunks) == ("1f1b", 4, 8, 1)
    assert " ".join(s.labels(0)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    assert " ".join(s.labels(1)) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7"
    assert " ".join(s.labels(3)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"


def test_1f1b_is_not_gpipe_with_reversed_backwards():
    # Syllabus errata 7: "F0..F3 then B3 B2 B1 B0 on every stage" is not 1F1B.
    s = schedule("1f1b", 4, 4)
    wrong = ["F0", "F1", "F2", "F3", "B3", "B2", "B1", "B0"]
    assert all(s.labels(st) != wrong for st in range(4))
    assert s.labels(3) == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
def test_1f1b_warmup_and_backward_order(p, m):
    s = schedule("1f1b", p, m)
    for st in range(p):
        kinds = [op.kind for op in s.ops[st]]
        warmup = kinds.index("B")  # forwards before the first backward
        # The first backward comes right after F of micro-batch `warmup`, if any is left.
        expected = min(p - 1 - st, m)
        assert warmup == (expected + 1 if expected < m else m), (p, m, st)
        assert [op.microbatch for op in s.ops[st] if op.kind == "B"] == list(range(m))
        assert [op.microbatch for op in s.ops[st] if op.kind == "F"] == list(range(m))
        # After the warm-up, never two forwards in a row.
        steady = kinds[expected:]
        assert "FF" not in "".join(steady)


def test_gpipe_and_naive_pinned():
    assert schedule("gpipe", 2, 3).labels(1) == ["F0", "F1", "F2", "B0", "B1", "B2"]
    assert schedule("naive", 3, 3).labels(0) == ["F0", "B0", "F1", "B1", "F2", "B2"]
    assert schedule("naive", 3, 3).labels(2) == ["F0", "B0", "F1", "B1", "F2", "B2"]


def test_interleaved_p2_m4_v2_pinned():
    # Megatron order: micro-batches in groups of p per chunk; backwards with chunks reversed.
    s = schedule("interleaved-1f1b", 2, 4, chunks=2)
    assert " ".join(s.labels(0)) == "F0 F1 F0c1 F1c1 F2 B0c1 F3 B1c1 F2c1 B0 F3c1 B1 B2c1 B3c1 B2 B3"
    assert " ".join(s.labels(1)) == "F0 F1 F0c1 B0c1 F1c1 B1c1 F2 B0 F3 B1 F2c1 B2c1 F3c1 B3c1 B2 B3"


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 9, 4)])
def test_interleaved_warmup_counts(p, m, v):
    s = schedule("interleaved-1f1b", p, m, chunks=v)
    for st in range(p):
        kinds = "".join(op.kind for op in s.ops[st])
        warmup = min(2 * (p - 1 - st) + (v - 1) * p, v * m)
        assert kinds[:warmup] == "F" * warmup
        assert kinds[warmup : warmup + 2] in ("FB", "B", "BB", "")
        # Rank st holds virtual stages st, st+p, ...: every chunk's F and B, m of each.
        for c in range(v):
            assert sorted(op.microbatch for op in s.ops[st] if op.chunk == c and op.kind == "F") == list(range(m))


def test_zb_h1_p4_m6_pinned():
    # Step x on stage i runs F_x, B_{x-(p-1-i)}, W_{x-(p-1)}: W is held back i steps.
    s = schedule("zb-h1", 4, 6)
    assert " ".join(s.labels(0)) == "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 B3 W3 B4 W4 B5 W5"
    assert " ".join(s.labels(1)) == "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 B4 W3 B5 W4 W5"
    assert " ".join(s.labels(3)) == "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 W3 W4 W5"


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "zb-h1"])
def test_micro_batch_order_on_every_stage(name):
    s = schedule(name, 5, 7)
    for st in range(5):
        for kind in ("F", "B", "W"):
            mbs = [op.microbatch for op in s.ops[st] if op.kind == kind]
            assert mbs == (list(range(7)) if kind != "W" or name == "zb-h1" else [])


# --------------------------------------------------------------------------- dependencies


def test_deps_one_chunk():
    s = schedule("1f1b", 4, 3)
    assert s.deps(Op("F", 1, 0, 0)) == ()
    assert s.deps(Op("F", 1, 0, 2)) == (Op("F", 1, 0, 1),)
    assert s.deps(Op("B", 1, 0, 3)) == (Op("F", 1, 0, 3),)  # the loss
    assert s.deps(Op("B", 1, 0, 0)) == (Op("B", 1, 0, 1),)
    z = schedule("zb-h1", 4, 3)
    assert z.deps(Op("W", 2, 0, 1)) == (Op("B", 2, 0, 1),)
    assert z.deps(Op("B", 2, 0, 1)) == (Op("B", 2, 0, 2),)


def test_deps_interleaved_cross_the_chunk_boundary():
    s = schedule("interleaved-1f1b", 4, 4, chunks=2)
    assert s.virtual_stages == 8
    assert s.virtual_stage(Op("F", 0, 1, 2)) == 6
    # Chunk 1 on rank 0 is virtual stage 4: its input comes from chunk 0 on rank 3.
    assert s.deps(Op("F", 2, 1, 0)) == (Op("F", 2, 0, 3),)
    assert s.deps(Op("B", 2, 0, 3)) == (Op("B", 2, 1, 0),)
    # Last virtual stage: chunk 1 on rank 3.
    assert s.deps(Op("B", 2, 1, 3)) == (Op("F", 2, 1, 3),)
    assert s.deps(Op("F", 2, 0, 0)) == ()


def test_every_scheduled_op_has_its_deps_scheduled_and_position_works():
    s = schedule("interleaved-1f1b", 3, 6, chunks=2)
    for st, ops in enumerate(s.ops):
        for i, op in enumerate(ops):
            assert s.position(op) == (st, i)
            for d in s.deps(op):
                s.position(d)  # KeyError if not scheduled


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("name,p,m,v", list(cases()))
def test_every_schedule_is_valid(name, p, m, v):
    s = schedule(name, p, m, v)
    validate_schedule(s)
    per_op = 3 if name == "zb-h1" else 2
    assert sum(len(ops) for ops in s.ops) == p * m * v * per_op
    assert all(op.stage == st for st, ops in enumerate(s.ops) for op in ops)
    order = execution_order(s)
    assert len(order) == len(set(order)) == p * m * v * per_op
    # The order respects dependencies and per-rank order.
    seen = set()
    for op in order:
        assert all(d in seen for d in s.deps(op))
        st, i = s.position(op)
        assert i == 0 or s.ops[st][i - 1] in seen
        seen.add(op)


def _replace(s: Schedule, ops) -> Schedule:
    return Schedule(s.name, s.stages, s.microbatches, s.chunks, tuple(tuple(o) for o in ops))


def test_validator_catches_a_missing_op():
    s = schedule("1f1b", 3, 4)
    ops = [list(o) for o in s.ops]
    ops[1].remove(Op("B", 2, 0, 1))
    with pytest.raises(ValueError, match="missing"):
        validate_schedule(_replace(s, ops))


def test_validator_catches_a_duplicate_and_a_wrong_stage():
    s = schedule("gpipe", 2, 2)
    ops = [list(o) for o in s.ops]
    ops[0].append(Op("F", 0, 0, 0))
    with pytest.raises(ValueError, match="twice"):
        validate_schedule(_replace(s, ops))
    ops = [list(o) for o in s.ops]
    ops[0][0] = Op("F", 0, 0, 1)
    with pytest.raises(ValueError, match="stage"):
        validate_schedule(_replace(s, ops))


def test_validator_catches_missing_w_in_split_schedule():
    s = schedule("zb-h1", 2, 3)
    ops = [list(o) for o in s.ops]
    ops[0].remove(Op("W", 1, 0, 0))
    with pytest.raises(ValueError, match="W1"):
        validate_schedule(_replace(s, ops))


def test_validator_catches_a_deadlock():
    s = schedule("naive", 2, 2)
    # Rank 0 waits for B0 from rank 1 before sending F1; rank 1 wants F1 first.
    ops = [
        [Op("F", 0, 0, 0), Op("B", 0, 0, 0), Op("F", 1, 0, 0), Op("B", 1, 0, 0)],
        [Op("F", 1, 0, 1), Op("B", 1, 0, 1), Op("F", 0, 0, 1), Op("B", 0, 0, 1)],
    ]
    with pytest.raises(ValueError, match="deadlock"):
        validate_schedule(_replace(s, ops))
    # A backward before its own forward on the last stage is a deadlock too.
    g = schedule("gpipe", 2, 2)
    with pytest.raises(ValueError, match="deadlock.*stage 1 waits at B1 for F1 on stage 1"):
        validate_schedule(_replace(g, [g.ops[0], tuple(reversed(g.ops[1]))]))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,match",
    [
        (("pipedream", 4, 8), r"unknown schedule 'pipedream'.*naive, gpipe, 1f1b, interleaved-1f1b, zb-h1"),
        (("1f1b", 0, 8), "stages must be at least 1"),
        (("1f1b", 4, 0), "microbatches must be at least 1"),
        (("gpipe", 4, 8, 0), "chunks must be at least 1"),
        (("1f1b", 4, 8, 2), "use chunks=1.*interleaved-1f1b"),
        (("zb-h1", 4, 8, 2), "use chunks=1"),
        (("naive", 4, 8, 3), "use chunks=1"),
        (("interleaved-1f1b", 4, 8, 1), r"chunks >= 2.*'1f1b'"),
        (("interleaved-1f1b", 4, 10, 2), "multiple of stages.*use 8 or 12"),
        (("interleaved-1f1b", 4, 3, 2), "multiple of stages.*use 4"),
        (("1f1b", 2.0, 8), "stages must be an int"),
        (("1f1b", 2, True), "microbatches must be an int"),
    ],
)
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        schedule(*args)


# --------------------------------------------------------------------------- imports


@pytest.mark.parametrize("module", ["__init__.py", "schedules.py", "simulator.py"])
def test_module_level_imports_are_stdlib_or_numpy(module):
    tree = ast.parse((PIPELINE_DIR / module).read_text())
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    for node in tree.body:  # module level only: torch inside a function would be fine
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                continue
            names = [node.module or ""]
        else:
            continue
        for n in names:
            assert n.split(".")[0] in allowed, f"{module} imports {n} at module level"
