"""What install() reports: a row per patch, the environment, and whether the shim is on.

Apart from the registry (which loads the compat matrix, `packaging`, wrapt and the
patches) so that an install() made before anything of MLX is imported can hand back a
Status without loading any of them: such a Status plans the install when first read.
"""

from __future__ import annotations

from collections import namedtuple
from enum import Enum

TYPE_CHECKING = False
if TYPE_CHECKING:  # `import mlx_threadsafe; install()` loads this module: no typing at start-up
    from typing import Callable, Dict, Iterator, List, Optional, Tuple

    from .versions import Environment


class State(str, Enum):
    """The state of one patch in this process (compares equal to its string value)."""

    APPLIED = "applied"
    PENDING = "pending-import"
    SKIPPED = "skipped"
    FAILED = "failed"
    DISABLED = "disabled"
    NOT_INSTALLED = "not-installed"

    def __str__(self) -> str:
        return self.value


# A named tuple, not a dataclass: dataclasses imports inspect, which would triple the
# cost of an install() made before MLX is imported.
class PatchStatus(namedtuple("PatchStatus", "id target trigger state reason", defaults=("",))):
    """One row of the status table: the patch `id`, its `target` (what it rewrites), its
    `trigger` (the module whose import applies it), its `state` and the `reason`."""

    __slots__ = ()


class Status:
    """The status table: `rows` (one PatchStatus per patch), `environment`, `installed`."""

    def __init__(self, rows: "Tuple[PatchStatus, ...]", environment: "Environment", installed: bool) -> None:
        self._values: "Optional[Tuple[Tuple[PatchStatus, ...], Environment, bool]]" = (
            tuple(rows), environment, installed)
        self._plan: "Optional[Callable[[], Status]]" = None

    @classmethod
    def planned_on_read(cls, plan: "Callable[[], Status]") -> "Status":
        """A Status whose first read calls `plan()` (the planning install() put off) and shows its result."""
        status = cls.__new__(cls)
        status._values, status._plan = None, plan
        return status

    def _read(self) -> "Tuple[Tuple[PatchStatus, ...], Environment, bool]":
        if self._values is None:
            assert self._plan is not None
            planned = self._plan()
            self._values = (planned.rows, planned.environment, planned.installed)
        return self._values

    @property
    def rows(self) -> "Tuple[PatchStatus, ...]":
        return self._read()[0]

    @property
    def environment(self) -> "Environment":
        return self._read()[1]

    @property
    def installed(self) -> bool:
        return self._read()[2]

    @property
    def versions(self) -> "Dict[str, Optional[str]]":
        from .versions import TRACKED

        return {name: self.environment.version_of(name) for name in TRACKED}

    def __repr__(self) -> str:
        return f"<Status installed={self.installed} {len(self.rows)} patches>"

    def __iter__(self) -> "Iterator[PatchStatus]":
        return iter(self.rows)

    def __getitem__(self, patch_id: str) -> PatchStatus:
        for row in self.rows:
            if row.id == patch_id:
                return row
        raise KeyError(patch_id)

    def ids(self, state: str) -> "List[str]":
        """The ids of the patches in `state` (a State or its string value)."""
        return [row.id for row in self.rows if row.state == state]

    def __str__(self) -> str:
        header = ("patch", "target", "state", "reason")
        lines = [(r.id, r.target, str(r.state), r.reason) for r in self.rows]
        widths = [max(len(x[i]) for x in [header] + lines) for i in range(3)]
        out = [
            f"mlx_threadsafe ({'installed' if self.installed else 'not installed'}): "
            + self.environment.describe()
        ]
        for row in [header] + lines:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        out.append("protection on this platform:")
        out.extend(f"  {subject}: {what}" for subject, what in self.protection)
        return "\n".join(line.rstrip() for line in out)

    @property
    def protection(self) -> "List[Tuple[str, str]]":
        """What this platform gets: thread-bound streams, the exit wait, join() semantics, fork."""
        from .diagnostics import protection

        return protection(self.environment)
