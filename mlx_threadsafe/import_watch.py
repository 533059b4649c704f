"""See every module right after its code has run, with the standard library only.

A meta-path finder that finds nothing itself: it asks the finders after it, and on the
spec they return wraps that loader instance's ``exec_module`` (the loader's type and
identity stay, so resource readers and ``pkg_resources`` providers keep working). Only
the file loaders, which path finders make anew for each module, are wrapped; modules
other loaders bring in are not seen.

It imports nothing beyond the standard library, so the start-up hook can start it in
every process at the cost of a few microseconds per import: the full install waits
until the first import of mlx, mlx_lm or mlx_vlm.
"""

import _frozen_importlib_external  # what importlib.machinery re-exports, without importing importlib
import _thread
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # the start-up hook imports this module: no typing, no threading
    from types import ModuleType
    from typing import Callable, List

_PER_MODULE_LOADERS = (_frozen_importlib_external.SourceFileLoader, _frozen_importlib_external.SourcelessFileLoader,
                       _frozen_importlib_external.ExtensionFileLoader)

# Called with each module once its code has run, in the order they were added.
after_import: "List[Callable[[ModuleType], None]]" = []
# Called with each module name before the import system looks for it (before any of its
# code runs): the start-up hook installs there, so that no target is half imported.
before_import: "List[Callable[[str], None]]" = []


class _AfterImport:
    def __init__(self) -> None:
        self._finding: set = set()  # the threads inside find_spec

    def find_spec(self, name, path, target=None):
        me = _thread.get_ident()
        if me in self._finding or not (after_import or before_import):
            return None
        self._finding.add(me)  # imports made from here on (by a callback too) pass straight through
        try:
            for callback in list(before_import):
                callback(name)
            spec = self._spec_from_the_others(name, path, target)
        finally:
            self._finding.discard(me)
        loader = getattr(spec, "loader", None)
        if type(loader) in _PER_MODULE_LOADERS and "exec_module" not in vars(loader):
            exec_module = loader.exec_module

            def exec_module_then_look(module):
                try:
                    exec_module(module)
                finally:
                    del loader.exec_module  # the loader is back to itself
                for callback in list(after_import):
                    try:
                        callback(module)
                    except Exception:  # noqa: BLE001 - never fail the user's import
                        import logging  # only now: start-up imports nothing it does not need

                        logging.getLogger("mlx_threadsafe").debug(
                            "after-import step %r failed for %s", callback, name, exc_info=True)

            try:
                loader.exec_module = exec_module_then_look
            except (AttributeError, TypeError):
                pass  # a loader with __slots__: its module is not looked at
        return spec

    def _spec_from_the_others(self, name, path, target):
        # Every other finder, those before this one too: a before-import step may have put
        # one there (wrapt's post-import finder, when the shim installs) that must see this
        # import. The ones that were there already found nothing for it; asking again is harmless.
        for finder in [finder for finder in sys.meta_path if finder is not self]:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None:
                spec = find_spec(name, path, target)
                if spec is not None:
                    return spec
        return None


_finder = _AfterImport()


def watch(callback: "Callable[[ModuleType], None]") -> None:
    """Call `callback(module)` after every later import; the watcher goes first in sys.meta_path."""
    _add(after_import, callback)


def watch_before(callback: "Callable[[str], None]") -> None:
    """Call `callback(name)` before every later import looks for its module."""
    _add(before_import, callback)


def unwatch(callback: "Callable") -> None:
    """Stop calling `callback`; the watcher leaves sys.meta_path with its last callback."""
    for callbacks in (after_import, before_import):
        if callback in callbacks:
            callbacks.remove(callback)
    if not (after_import or before_import) and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def _add(callbacks: "List", callback: "Callable") -> None:
    if callback not in callbacks:
        callbacks.append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
