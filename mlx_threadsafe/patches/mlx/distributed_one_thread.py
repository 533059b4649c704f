"""mlx.distributed.one_thread: a collective issued while another thread has one pending is an error.

A collective pairs up with the same call on every other rank, in the order each rank issues
them; two threads of one rank interleave them differently on each rank and the results are
silently wrong. Each collective records, per group, its thread until that thread's next
``mx.eval`` returns; another live thread's collective meanwhile raises `ConcurrentCollectives`
(one read with ``.item()`` stays pending until its thread evaluates again or ends).
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any, Dict, Tuple

import wrapt

from ...errors import ConcurrentCollectives, TargetMissing
from ..common import thread_adoption

COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "sum_scatter", "send", "recv", "recv_like")

# Collectives issued and not yet evaluated: group key -> (thread ident, thread name, collective).
pending: Dict[Any, Tuple[int, str, str]] = {}
_lock = threading.Lock()


SAFE_RULE = ("Collectives pair up across ranks in the order each rank issues them: from two threads at once "
             "they pair wrongly and the results are silently wrong. Issue every collective of a rank from one "
             "thread, in the same order on every rank (a mlx_threadsafe.Worker can be that thread), or mx.eval a "
             "collective's result before another thread issues one.")


def _group_key(args, kwargs) -> Any:
    group = kwargs.get("group")
    return None if group is None else id(group)


def _describe_group(args, kwargs) -> str:
    group = kwargs.get("group")
    if group is None:
        return "the default group"
    try:
        return f"its group (rank {group.rank()} of {group.size()})"
    except Exception:  # noqa: BLE001 - only a description
        return "its group"


def _guard(wrapped, instance, args, kwargs):
    key = _group_key(args, kwargs)
    me = threading.get_ident()
    holder = pending.get(key)
    if holder is None or holder[0] != me:
        with _lock:
            holder = pending.get(key)
            if holder is not None and holder[0] != me and _alive(holder[0]):
                raise ConcurrentCollectives(
                    f"mlx_threadsafe: thread {threading.current_thread().name!r} issued "
                    f"mx.distributed.{wrapped.__name__} while thread {holder[1]!r} has "
                    f"mx.distributed.{holder[2]} pending on {_describe_group(args, kwargs)}. {SAFE_RULE}")
            pending[key] = (me, threading.current_thread().name, wrapped.__name__)
    return wrapped(*args, **kwargs)


def _alive(ident: int) -> bool:
    return any(thread.ident == ident for thread in threading.enumerate())


def settle_collectives_of_this_thread() -> None:
    """The calling thread's mx.eval returned: every collective it issued has run."""
    if not pending:  # the one check the single-thread path pays
        return
    me = threading.get_ident()
    with _lock:
        for key in [key for key, holder in pending.items() if holder[0] == me]:
            del pending[key]


class DistributedOneThreadPatch(thread_adoption.AdoptionLayerPatch):
    """The layer's mx.eval wrapper settles a thread's pending collectives."""

    use = thread_adoption.Use(after_eval=settle_collectives_of_this_thread)

    def _apply_with_layer(self, mlx_core: ModuleType) -> None:
        distributed = getattr(mlx_core, "distributed", None)
        if distributed is None or not hasattr(distributed, "all_sum"):
            raise TargetMissing("no mlx.core.distributed.all_sum in this mlx")
        for name in COLLECTIVES:
            if hasattr(distributed, name):
                self.originals.set_attribute(distributed, name,
                                             wrapt.FunctionWrapper(getattr(distributed, name), _guard))
        self.originals.on_restore(pending.clear)


# Interleaved collectives are wrong whether or not streams are thread-bound.
PATCH = DistributedOneThreadPatch(id="mlx.distributed.one_thread", package="mlx", trigger="mlx.core",
                                  target="mlx.core.distributed",
                                  description="a collective from a second thread of a rank is an error")
