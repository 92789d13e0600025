"""Load each script and stylesheet once per page.

Under Sphinx 7.4, the inline scripts that sphinx-thebe and sphinx-togglebutton add while the
builder starts end up twice in every page; the second `const THEBE_JS_URL = ...` is a
JavaScript SyntaxError in every reader's browser console. Dropping exact duplicates (same
file or body, same attributes) fixes it and changes nothing else.
"""

from __future__ import annotations


def _unique(assets: list) -> list:
    seen: set = set()
    out = []
    for asset in assets:
        # An inline script's filename is None or "" depending on how it was added.
        key = (getattr(asset, "filename", asset) or None, getattr(asset, "priority", None),
               tuple(sorted(getattr(asset, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            out.append(asset)
    return out


def dedupe(app, pagename, templatename, context, doctree) -> None:
    for name in ("script_files", "css_files"):
        if name in context:
            context[name] = _unique(context[name])


def setup(app):
    app.connect("html-page-context", dedupe, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
