"""The `learning-path` directive: the intro's chapter list, linking only chapters that exist.

Chapters land one at a time, and a `{doc}` link to a page that is not in the book yet is a
warning, which the `-W` build turns into an error. So the intro lists every planned chapter
once, in this directive, and the directive links those in the book and leaves out the rest:

    ```{learning-path}
    Why split a model
    - 01_memory_wall: Count the bytes before choosing how to split them.
    - 02_data_parallelism: Replicas, data shards and the gradient all-reduce;
      continuation lines are indented.
    ```

A line starting with `- ` is an entry (`docname: description`, MyST inline markup allowed);
an indented line continues it; any other line names a group, shown only if one of its
chapters exists. Adding a chapter is one line here; `tests/test_book.py` fails when a chapter
in `_toc.yml` is not linked from the intro.
"""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def parse_entries(lines: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(group, [(docname, description), ...]), ...] from the directive's body."""
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    for raw in lines:
        line = raw.rstrip()
        if not line.strip():
            continue
        if line.startswith("- "):
            doc, sep, text = line[2:].partition(":")
            if not sep or not doc.strip():
                raise ValueError(f"learning-path entry needs 'docname: description': {line!r}")
            if any(doc.strip() == d for _, entries in groups for d, _ in entries):
                raise ValueError(f"learning-path lists {doc.strip()!r} twice")
            if not groups:
                groups.append(("", []))
            groups[-1][1].append((doc.strip(), text.strip()))
        elif line[0].isspace():
            if not groups or not groups[-1][1]:
                raise ValueError(f"learning-path continuation line without an entry: {line!r}")
            doc, text = groups[-1][1][-1]
            groups[-1][1][-1] = (doc, f"{text} {line.strip()}")
        else:
            groups.append((line.strip(), []))
    return groups


class LearningPath(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        env = self.env
        env.learning_path_docs = getattr(env, "learning_path_docs", set()) | {env.docname}
        try:
            groups = parse_entries(list(self.content))
        except ValueError as err:
            raise self.error(str(err)) from err
        markdown: list[str] = []
        missing: list[str] = []
        for group, entries in groups:
            present = [(doc, text) for doc, text in entries if doc in env.found_docs]
            missing += [doc for doc, _ in entries if doc not in env.found_docs]
            if not present:
                continue
            if group:
                markdown += [f"**{group}**", ""]
            markdown += [f"- {{doc}}`{doc}`: {text}" for doc, text in present]
            markdown.append("")
        if missing:
            logger.info("learning-path: not in the book yet: %s", ", ".join(missing))
        container = nodes.container(classes=["learning-path"])
        self.state.nested_parse(StringList(markdown, source=env.docname), self.content_offset,
                                container)
        return [container]


def always_reread(app, env, added, changed, removed) -> list[str]:
    # Which chapters exist can change without the intro changing: read it again every build.
    return sorted(getattr(env, "learning_path_docs", set()) - set(removed))


def purge(app, env, docname) -> None:
    getattr(env, "learning_path_docs", set()).discard(docname)


def merge(app, env, docnames, other) -> None:
    env.learning_path_docs = (getattr(env, "learning_path_docs", set())
                              | getattr(other, "learning_path_docs", set()))


def setup(app):
    app.add_directive("learning-path", LearningPath)
    app.connect("env-get-outdated", always_reread)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
