"""One lookup for the preset tables (MODELS, LINKS, GPUS): a spec passes through, a key is
looked up, anything else gets an error that lists the valid keys."""

from __future__ import annotations


def lookup(value, table: dict, spec_type: type, what: str):
    if isinstance(value, spec_type):
        return value
    if isinstance(value, str) and value in table:
        return table[value]
    raise ValueError(f"unknown {what} {value!r}; use a {spec_type.__name__} or one of: "
                     f"{', '.join(table)}")
