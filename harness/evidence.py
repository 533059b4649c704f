"""The harnesses' JSON: stamped with when and where it was measured, written whole or not at all.

An evidence file holds records by key (`mlx-lm==0.31.1@mlx0.32.4`, `server/...`): either
the mapping itself (compat_matrix) or the mapping under "records" beside an "about" line
that says what made it (conformance). Results files (benchmarks) are any JSON object.
Every file is written to a scratch name beside it, then renamed over it: a run cut short
leaves the previous file, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import Any, Callable, Dict, Optional

Records = Dict[str, Dict[str, Any]]

__all__ = ["Records", "today", "machine", "read_json", "write_text", "write_json", "load_records", "save_records"]


def today() -> str:
    """The date stamp of a record or a measurement: 2026-12-04."""
    return time.strftime("%Y-%m-%d")


def machine(**extra: Any) -> Dict[str, Any]:
    """What every harness records of the machine it ran on, with `extra` (the device, versions) added."""
    return {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
            "cpus": os.cpu_count(), **extra}


def read_json(path: str, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as source:
        return json.load(source)


def write_text(path: str, text: str) -> None:
    """`text` in `path`, replaced whole: written to a scratch name beside it, then renamed over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scratch = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(scratch, "w") as out:
            out.write(text)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


def write_json(path: str, data: Any) -> None:
    """`data` as JSON (indent 1, a final newline) in `path`, replaced whole."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def load_records(path: str) -> Records:
    """The records of an evidence file, bare or under "records"; none when there is no file."""
    data = read_json(path, {})
    return data["records"] if set(data) == {"about", "records"} else data


def save_records(path: str, records: Records, about: Optional[str] = None,
                 order: Optional[Callable[[str, Dict[str, Any]], Any]] = None) -> None:
    """Write `records` sorted by `order(key, record)` (default: the key); under "records" beside `about` if given."""
    ordered = dict(sorted(records.items(), key=lambda item: order(*item) if order else item[0]))
    write_json(path, {"about": about, "records": ordered} if about is not None else ordered)
