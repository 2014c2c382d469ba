"""The one table renderer of qpass and its tools, and the writers of generated docs.

    markdown(["recipe", "perplexity"], [["w8a8", "87.14"]], align="lr")
    text(["pass", "time"], [["quantize", "0.12s"]])          # fixed-width columns for a terminal
    replace_section("docs/x.md", "parity", table)           # between <!-- BEGIN parity --> and <!-- END parity -->
    write_atomic("docs/benchmarks.md", report)

Cells are ``str(cell)``. A Markdown cell escapes ``|`` (``\\|``) and puts a newline as a space, so a cell never
splits a row; the widths of :func:`text` are ``len`` of each cell.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

# align letter -> the rule under a Markdown header ("l" is the plain rule, as the generated docs have it)
RULES = {"l": "---", "r": "---:", "c": ":---:"}


def _cells(headers: Sequence, rows: Iterable[Sequence]) -> tuple[list[str], list[list[str]]]:
    head = [str(h) for h in headers]
    body = []
    for i, row in enumerate(rows):
        cells = [str(c) for c in row]
        if len(cells) != len(head):
            raise ValueError(f"table row {i} has {len(cells)} cells, the header {len(head)}: {cells!r}")
        body.append(cells)
    return head, body


def escape(cell: str) -> str:
    """A Markdown table cell: ``|`` escaped, newlines as spaces."""
    return " ".join(cell.replace("|", "\\|").splitlines()) if cell else cell


def markdown(headers: Sequence, rows: Iterable[Sequence], align: str | None = None, *,
             spaced_rule: bool = False) -> str:
    """A Markdown (GFM) table, no trailing newline: ``| a | b |`` lines and a ``|---|---:|`` rule.

    align: one letter per column, ``l`` (plain rule), ``r`` (right, ``---:``) or ``c`` (``:---:``); default all
    ``l``. spaced_rule: ``| --- | ---: |`` instead of ``|---|---:|`` (docs/benchmarks.md's style)."""
    head, body = _cells(headers, rows)
    align = align if align is not None else "l" * len(head)
    if len(align) != len(head) or set(align) - set(RULES):
        raise ValueError(f"align {align!r}: one of {'/'.join(RULES)} per column ({len(head)} columns)")
    rule = [RULES[a] for a in align]
    line = lambda cells: "| " + " | ".join(escape(c) for c in cells) + " |"  # noqa: E731
    rule_line = "| " + " | ".join(rule) + " |" if spaced_rule else "|" + "|".join(rule) + "|"
    return "\n".join([line(head), rule_line, *(line(r) for r in body)])


def text(headers: Sequence, rows: Iterable[Sequence], sep: str = "  ") -> str:
    """Fixed-width columns for a terminal: every column left-aligned and padded to its widest cell (header
    included), joined by `sep`, a rule of dashes under the header; no trailing newline."""
    head, body = _cells(headers, rows)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: sep.join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in body)])


def write_atomic(path: str | os.PathLike, content: str) -> None:
    """Write `content` (UTF-8) to `path` through a temporary file beside it: readers see the old file or the
    new one, never half of one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    os.replace(tmp, path)


def markers(name: str) -> tuple[str, str]:
    """The lines that delimit generated section `name` in a docs file."""
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def replace_section(path: str | os.PathLike, name: str, body: str) -> bool:
    """Replace what lies between the marker lines of section `name` (:func:`markers`) in the file at `path`
    with `body` (the marker lines stay); written atomically. Returns whether the file changed.

    Raises ValueError naming the file and the missing marker if the section is not there, or is there twice,
    or ends before it begins: nothing is written then."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        old = f.read()
    lines = old.split("\n")
    start, stop = _section_lines(lines, path, name)
    new = "\n".join(lines[: start + 1] + ([body.rstrip("\n")] if body.strip("\n") else []) + lines[stop:])
    if new == old:
        return False
    write_atomic(path, new)
    return True


def check_section(path: str | os.PathLike, name: str) -> None:
    """Raise what :func:`replace_section` would (ValueError; OSError if the file cannot be read) before a tool
    spends minutes on the body."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        _section_lines(f.read().split("\n"), path, name)


def _section_lines(lines: list[str], path: str, name: str) -> tuple[int, int]:
    """The indices of section `name`'s BEGIN and END lines, or a ValueError naming the file and the marker."""
    begin, end = markers(name)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == begin]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == end]
    for marker, found in ((begin, starts), (end, ends)):
        if len(found) != 1:
            raise ValueError(f"{path}: {'no' if not found else 'more than one'} line {marker!r} "
                             f"(section {name!r} needs one {begin!r} line and one {end!r} line after it)")
    if ends[0] < starts[0]:
        raise ValueError(f"{path}: {end!r} comes before {begin!r}")
    return starts[0], ends[0]
