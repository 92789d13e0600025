"""Helpers for the interview drills (``solutions/drill_*.ipynb``): checks that fail with an
explanation, and question variants drawn from a seed.

A drill's check cell computes the reference answer with ``shardlab`` and calls one of the
``check_*`` functions; a wrong answer raises AssertionError whose message gives the right
answer and why. A missing answer (``None``) raises too, without giving the answer away.

>>> q = variant(0, model=["llama3-8b", "llama3-70b"], batch=[1, 8, 32])
>>> sorted(vars(q))
['batch', 'model']
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

__all__ = ["variant", "check_close", "check_equal", "check_choice"]


def variant(seed: int, **choices) -> SimpleNamespace:
    """One value from each list of ``choices``, drawn with ``random.Random(seed)`` in keyword
    order: the same seed always gives the same question; change it for a new one."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    picked = {}
    for name, options in choices.items():
        options = list(options)
        if not options:
            raise ValueError(f"choices for {name!r} are empty; give at least one value")
        picked[name] = rng.choice(options)
    return SimpleNamespace(**picked)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


def _missing(answer, name: str) -> None:
    if answer is None:
        raise AssertionError(f"no answer yet: set {name} in the cell above, then run this check again")


def check_close(answer, expected: float, *, rel: float = 0.01, abs_tol: float = 0.0,
                explain: str = "", name: str = "answer", unit: str = "") -> None:
    """Pass when the number ``answer`` is within ``rel`` (relative) or ``abs_tol`` of
    ``expected``; else AssertionError with the expected value and ``explain``."""
    _missing(answer, name)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        raise AssertionError(f"{name} should be a number, got {answer!r}") from None
    if not math.isclose(value, expected, rel_tol=rel, abs_tol=abs_tol):
        raise AssertionError(f"{name} = {_fmt(value)}{unit} is not right: expected {_fmt(float(expected))}"
                             f"{unit} (within {rel:.0%}). {explain}".rstrip())
    print(f"correct: {name} = {_fmt(value)}{unit}")


def _normalise(x):
    if isinstance(x, str):
        return x.strip().lower()
    if isinstance(x, (list, tuple)):
        return tuple(_normalise(v) for v in x)
    return x


def check_equal(answer, expected, *, explain: str = "", name: str = "answer") -> None:
    """Pass when ``answer == expected`` (strings compared case-insensitively, lists as
    tuples); else AssertionError with the expected value and ``explain``."""
    _missing(answer, name)
    if _normalise(answer) != _normalise(expected):
        raise AssertionError(f"{name} = {_fmt(answer)} is not right: expected {_fmt(expected)}. "
                             f"{explain}".rstrip())
    print(f"correct: {name} = {_fmt(answer)}")


def check_choice(answer, expected: str, options, *, explain: str = "", name: str = "answer") -> None:
    """Pass when ``answer`` is the option ``expected`` (case, spaces and hyphens ignored);
    AssertionError listing the options when ``answer`` is none of them."""
    _missing(answer, name)
    key = lambda s: str(s).strip().lower().replace("-", "").replace(" ", "").replace("_", "")  # noqa: E731
    options = list(options)
    if key(answer) not in {key(o) for o in options}:
        raise AssertionError(f"{name} = {answer!r} is not one of the options: "
                             f"{', '.join(map(repr, options))}")
    if key(answer) != key(expected):
        raise AssertionError(f"{name} = {answer!r} is not right: expected {expected!r}. {explain}".rstrip())
    print(f"correct: {name} = {answer!r}")
