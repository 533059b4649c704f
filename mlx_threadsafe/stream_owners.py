"""Which thread made which stream: one record per stream, written when it is made, never per call.

MLX numbers streams across the process and binds each to the thread that made it;
a stream is named by (device type, index), as in ``str(stream)`` and in MLX's error
``There is no Stream(cpu, 3) in current thread``. The records serve the stream rule
(`mlx.module_streams`: is this stream this thread's own?) and the error notes
(`diagnostics.explain`: which thread made it?).
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any, Dict, NamedTuple, Optional, Tuple

Key = Tuple[str, int]

# "Stream(Device(cpu, 0), 3)" (str of a stream) or "Stream(cpu, 3)" (MLX's error text).
_NAMED = re.compile(r"Stream\((?:Device\()?(\w+)(?:, \d+\))?, (\d+)\)")


class Owner(NamedTuple):
    thread_name: str
    thread: Any  # a weak reference: the OS hands an ended thread's ident to the next one
    kind: str  # "made" (mx.new_stream) or "default" (a thread's default stream)


_owners: Dict[Key, Owner] = {}


def key_in(text: str) -> Optional[Key]:
    """(device type, index) of the first stream named in `text`."""
    match = _NAMED.search(text)
    return (match.group(1), int(match.group(2))) if match else None


def key_of(stream: Any) -> Optional[Key]:
    """The key of an ``mx.Stream`` (the caller checks the exact type: this reads its str)."""
    return key_in(str(stream))


def record(stream: Any, kind: str = "made") -> None:
    """Remember that the calling thread made `stream` (or has it as its default stream)."""
    key = key_of(stream)
    if key is not None:
        thread = threading.current_thread()
        _owners[key] = Owner(thread.name, weakref.ref(thread), kind)


def owner(key: Key) -> Optional[Owner]:
    return _owners.get(key)


def made_here(key: Key) -> Optional[bool]:
    """Whether the calling thread owns the stream; None if no record says."""
    found = _owners.get(key)
    if found is None:
        return None
    return found.thread() is threading.current_thread()


def describe(found: Owner) -> str:
    """The owning thread's name, quoted, with "(it has ended)" where it has."""
    thread = found.thread()
    alive = thread is not None and thread.is_alive()
    return f"{found.thread_name!r}" + ("" if alive else " (it has ended)")
