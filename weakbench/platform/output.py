"""One renderer for every table the command line prints: ``--format table|csv|json|markdown``.

A command hands :func:`render` its rows as plain records (dicts of raw values) and a list of
:class:`Column` specs; a new column (a board's interval, flag or verdict) is one more ``Column``.

* ``table`` (the default): a rich table at the terminal's width, or at the pipe's width
  (``COLUMNS``, else 80) as plain text (columns separated by spaces, no rules, no colour) when
  stdout is not a terminal.
  A table whose columns cannot all fit that width is *stacked*, one block of ``header: value``
  lines per row, rather than losing or truncating a column. Path and URI columns
  (``kind="path"``) are never cut: in a table they keep their full width or the table stacks; in a
  stacked block they stay on one line.
* ``csv`` and ``json``: every column's raw fields (``Column.fields``; numbers stay numbers, NaN
  becomes an empty cell / ``null``), for scripts; ``json`` is one list of objects.
* ``markdown``: a GitHub table of the displayed text, for reports.

Progress and notices go to stderr (:data:`err_console`), so a piped table stays clean.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from rich import box
from rich.console import Console
from rich.text import Text

FORMATS = ("table", "csv", "json", "markdown")


class OutputFormat(str, Enum):
    """The values of ``--format`` (typer shows and checks them as a choice)."""

    table = "table"
    csv = "csv"
    json = "json"
    markdown = "markdown"


FORMAT_HELP = "table (fits the terminal, or the pipe's width as plain text), csv, json or markdown."


def make_console(stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr): the terminal's width on a terminal; in a pipe or a
    file plain text (no colour, no markup styles) at ``COLUMNS`` or 80 columns, as rich sizes it."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, no_color=not tty, highlight=tty, emoji=False)


console = make_console()
err_console = make_console(stderr=True)


@dataclass(frozen=True)
class Column:
    """One column of a rendered table.

    Attributes:
        key: the record key (and the csv/json field) of the column.
        header: the header of ``table`` and ``markdown`` (a ``\\n`` gives a two-line table header;
            a stacked block shows it on one line).
        kind: ``"text"`` (wraps at spaces), ``"number"`` (right-aligned) or ``"path"`` (a file,
            directory or URI: never wrapped nor cut).
        text: the displayed text of a record (default ``str(record[key])``, ``""`` for None).
        fields: the record keys csv/json export for the column (default ``(key,)``): a board cell
            ``mean ± std [CI]`` shows one text and exports its four numbers.
        style: a rich style of the cell on a terminal (e.g. ``"red"`` for a flagged row).
    """

    key: str
    header: str
    kind: Literal["text", "number", "path"] = "text"
    text: Callable[[Mapping[str, Any]], str] | None = None
    fields: tuple[str, ...] = ()
    style: Callable[[Mapping[str, Any]], str | None] | None = None

    def cell(self, record: Mapping[str, Any]) -> str:
        if self.text is not None:
            return self.text(record)
        v = record.get(self.key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    def exported(self) -> tuple[str, ...]:
        return self.fields or (self.key,)


def _plain(v: Any) -> Any:
    """A JSON/CSV-safe value: NaN → None, other non-JSON types → str."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def export_records(records: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> list[dict[str, Any]]:
    """The records as csv/json see them: every column's raw fields, in column order."""
    keys = [k for c in columns for k in c.exported()]
    return [{k: _plain(r.get(k)) for k in dict.fromkeys(keys)} for r in records]


def render(records: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, fmt: str = "table",
           title: str | None = None, notes: Iterable[str] = (), out: Console | None = None) -> None:
    """Print ``records`` under ``columns`` in format ``fmt`` (see the module docstring) on ``out``
    (default: stdout). ``title`` and ``notes`` (a legend, a caption) appear with ``table`` and
    ``markdown`` only.

    Raises:
        ValueError: ``fmt`` not one of :data:`FORMATS` (the CLI's ``--format`` refuses it first).
    """
    out = out or console
    fmt = getattr(fmt, "value", fmt)
    notes = [n for n in notes if n]
    if fmt == "json":
        out.file.write(json.dumps(export_records(records, columns), indent=2) + "\n")
    elif fmt == "csv":
        rows = export_records(records, columns)
        keys = list(dict.fromkeys(k for c in columns for k in c.exported()))
        w = csv.DictWriter(out.file, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    elif fmt == "markdown":
        out.file.write(markdown(records, columns, title=title, notes=notes))
    elif fmt == "table":
        _table(records, columns, title=title, notes=notes, out=out)
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out.file.flush()


def markdown(records: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, title: str | None = None,
             notes: Iterable[str] = ()) -> str:
    """A GitHub-flavoured markdown table of the displayed text (``|`` escaped, line breaks as spaces)."""
    def esc(s: str) -> str:
        return " ".join(s.split("\n")).replace("|", "\\|")

    lines = [f"**{esc(title)}**", ""] if title else []
    lines.append("| " + " | ".join(esc(c.header) for c in columns) + " |")
    lines.append("| " + " | ".join("---:" if c.kind == "number" else "---" for c in columns) + " |")
    lines += ["| " + " | ".join(esc(c.cell(r)) for c in columns) + " |" for r in records]
    lines += [""] + [esc(n) for n in notes] if notes else []
    return "\n".join(lines) + "\n"


def _rich_table(records, columns, out: Console):
    from rich.table import Table

    tty = out.is_terminal
    # a pipe: whitespace-separated columns, no rules (as ps or kubectl print), easy to read and to cut
    t = Table(box=box.SIMPLE_HEAD if tty else None, pad_edge=tty, header_style="bold" if tty else "")
    for c in columns:
        width = max([len(c.cell(r)) for r in records] + [0]) if c.kind == "path" else None
        t.add_column(c.header, justify="right" if c.kind == "number" else "left", no_wrap=c.kind == "path",
                     min_width=width, overflow="fold")
    for r in records:
        cells = []
        for c in columns:
            style = c.style(r) if (c.style and tty) else None
            cells.append(Text(c.cell(r), style=style or ""))
        t.add_row(*cells)
    return t


def fits(table, out: Console) -> bool:
    """Whether rich can lay ``table`` out within ``out``'s width without cutting a word or a path."""
    from rich.measure import Measurement

    wide = out.options.update(width=1_000_000, max_width=1_000_000)  # unclamped: the table's own minimum
    return Measurement.get(out, wide, table).minimum <= out.width


def _table(records, columns, *, title, notes, out: Console) -> None:
    t = _rich_table(records, columns, out)
    if not records or fits(t, out):
        if title:  # above the table, at the page's width (a table's own title wraps at the table's)
            out.print(Text(_wrap(title, out.width), style="bold" if out.is_terminal else ""), soft_wrap=True)
        out.print(t)
    else:
        stacked(records, columns, title=title, out=out)
    for n in notes:
        out.print(Text(_wrap(n, out.width), style="dim" if out.is_terminal else ""), soft_wrap=True)


def _wrap(text: str, width: int) -> str:
    """``text`` wrapped at spaces to ``width`` columns; a word longer than that (a path, a URI) stays whole."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))


def stacked(records: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, title: str | None = None,
            out: Console | None = None) -> None:
    """Each record as a block of ``header  value`` lines (a table too wide for the screen): every
    column kept (a line per non-empty cell), prose wrapped at spaces beside its header, paths and
    URIs on one line, uncut."""
    out = out or console
    heads = [" ".join(c.header.split("\n")) for c in columns]
    pad = min(max(len(h) for h in heads), max(12, out.width // 3))
    if title:
        out.print(Text(_wrap(title, out.width), style="bold" if out.is_terminal else ""), soft_wrap=True)
    for i, r in enumerate(records, 1):
        out.print(Text(f"-- {i} of {len(records)} " + "-" * max(0, min(out.width, 60) - 10 - len(str(i)) - len(str(len(records))))),
                  soft_wrap=True)
        for c, h in zip(columns, heads):
            value = c.cell(r)
            if not value:
                continue  # nothing to say under this header for this row
            lead = f"{h:<{pad}}  " if len(h) <= pad else f"{h}\n{'':<{pad}}  "
            indent = " " * (pad + 2)
            if c.kind == "path":
                body = value  # paths: one line, never cut (a terminal wraps what it must)
            else:  # each line of a multi-line cell (one verdict a line) wrapped on its own, under the value column
                lines: list[str] = []
                for line in value.split("\n"):
                    fits = len(lead.split("\n")[-1]) + len(line) <= out.width
                    lines += [line] if fits else textwrap.wrap(line, max(20, out.width - len(indent)),
                                                               break_long_words=False, break_on_hyphens=False)
                body = ("\n" + indent).join(lines)
            style = (c.style(r) if c.style else None) if out.is_terminal else None
            out.print(Text(lead) + Text(body, style=style or ""), soft_wrap=True, highlight=False)
    empty = [h for c, h in zip(columns, heads) if not any(c.cell(r) for r in records)]
    if empty:  # every column is named, even one no row has a value in
        out.print(Text(_wrap(f"(no value in any row: {', '.join(empty)})", out.width)), soft_wrap=True)
