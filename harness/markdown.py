"""The harnesses' Markdown: table rows, and the generated blocks between two marker comments."""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple, Union

from .evidence import write_text

Markers = Tuple[str, str]

__all__ = ["Markers", "cell", "row", "table", "replace_block", "write_block"]


def cell(text: str) -> str:
    """`text` made safe for one table cell: its pipes escaped, its lines joined."""
    return text.replace("|", "\\|").replace("\n", " ")


def row(cells: Sequence[str]) -> str:
    """One table row: | a | b |."""
    return "| " + " | ".join(cells) + " |"


def table(columns: Sequence[str], rows: Sequence[Union[str, Sequence[str]]] = ()) -> List[str]:
    """The lines of a table: its header, the separator, then each row (cells, or a line made already)."""
    return [row(columns), "|" + "---|" * len(columns)] + [r if isinstance(r, str) else row(r) for r in rows]


def replace_block(text: str, markers: Markers, content: str) -> str:
    """`text` with what lies between the two marker lines replaced by `content`."""
    start, end = markers
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{content}\n{end}", text, flags=re.S)


def write_block(path: str, markers: Markers, content: str) -> None:
    """Replace the block between `markers` in the file `path` with `content` (a file without them is left alone)."""
    with open(path) as source:
        text = source.read()
    if markers[0] in text:
        write_text(path, replace_block(text, markers, content))
