"""CSV files that a spreadsheet opens as data, and read back as they were.

A cell that a spreadsheet would run as a formula (text starting with `=`, `+`, `-`, `@`, a tab
or a carriage return: OWASP's CSV-injection advice) is written with a leading apostrophe, which
spreadsheets take as "text". A cell that starts with an apostrophe gets one more, so `original`
gives every string back exactly. Numbers (`-0.25`, `+3`, `1e-05`) are written as they are.
"""

import csv
import io
import os
import re
from typing import Iterable, Sequence

FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')
TEXT_MARK = "'"
NUMBER = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')


def cell(value) -> str:
    """`value` (None: empty) as a cell that no spreadsheet runs as a formula."""
    text = '' if value is None else str(value)
    if text.startswith(TEXT_MARK) or (text.startswith(FORMULA_STARTS)
                                      and not NUMBER.fullmatch(text)):
        return TEXT_MARK + text
    return text


def original(text: str) -> str:
    """The value that `cell` wrote as `text`."""
    return text[1:] if text.startswith(TEXT_MARK) else text


def to_text(rows: Iterable[Sequence]) -> str:
    """CSV text of `rows` (header first), each value written by `cell`. A row with a carriage
    return in a cell has every cell quoted (with '\\n' line ends, Python's csv module would
    leave that cell bare, and a reader would end the row there)."""
    out = io.StringIO()
    minimal = csv.writer(out, lineterminator='\n')
    quoted = csv.writer(out, lineterminator='\n', quoting=csv.QUOTE_ALL)
    for row in rows:
        cells = [cell(v) for v in row]
        (quoted if any('\r' in text for text in cells) else minimal).writerow(cells)
    return out.getvalue()


def read(path: str | os.PathLike) -> list[list[str]]:
    """The rows (header first) of a CSV file written with `to_text`, each cell's `original`."""
    with open(path, newline='') as f:
        return [[original(text) for text in row] for row in csv.reader(f)]


def read_records(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows after the header of a file written with `to_text`, as {column: value}."""
    header, *rows = read(path) or [[]]
    return [dict(zip(header, row)) for row in rows]
