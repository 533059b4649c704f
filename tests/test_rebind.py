"""rebind_everywhere(_many): every module global and default argument that holds an original.

One heap pass for several originals leaves exactly what one pass per original leaves, and
the undo records put back the very objects.
"""

import gc
import sys
import types

import pytest

from mlx_threadsafe.patching.originals import Originals
from mlx_threadsafe.patching.rebind import rebind_everywhere, rebind_everywhere_many

SOURCE = """
def positional(x=A, y=None): return x
def keyword(*, k=B): return k
def both(a=A, b=B): return a
def untracked(s=S): return s
class Holder:
    def method(self, s=S): return s
    @staticmethod
    def static(a=A): return a
"""


@pytest.fixture
def world():
    """Two fake modules: one defines functions whose defaults hold the originals, one name-imports them."""
    originals = {"A": lambda: "A", "B": lambda: "B", "S": float(7)}  # a float: gc never tracks it
    home, copy = types.ModuleType("rebind_home"), types.ModuleType("rebind_copy")
    vars(home).update(originals)
    exec(SOURCE, vars(home))
    vars(copy).update(A=originals["A"], S=originals["S"])
    sys.modules.update({home.__name__: home, copy.__name__: copy})
    gc.collect()  # untracks the defaults tuple that holds only the float
    yield originals, home, copy
    for module in (home, copy):
        sys.modules.pop(module.__name__, None)


def _state(home, copy):
    # The globals by id: a list of them would be one more holder of the originals.
    return [id(vars(home)["A"]), id(vars(home)["B"]), id(vars(home)["S"]), id(vars(copy)["A"]), id(vars(copy)["S"]),
            home.positional.__defaults__, home.keyword.__kwdefaults__, home.both.__defaults__,
            home.untracked.__defaults__, home.Holder.method.__defaults__, home.Holder.static.__defaults__]


def _rebind(world, many):
    originals, home, copy = world
    before = _state(home, copy)
    replacements = {name: object() for name in originals}
    record = Originals()
    pairs = [(originals[name], replacements[name]) for name in originals]
    if many:
        unreachable = rebind_everywhere_many(pairs, record)
    else:
        unreachable = [rebind_everywhere(original, replacement, record) for original, replacement in pairs]
    after = _state(home, copy)
    record.restore()
    restored = _state(home, copy)
    assert restored == before
    return replacements, after, unreachable


@pytest.mark.parametrize("many", [False, True], ids=["one_pass_each", "one_pass"])
def test_globals_copies_and_defaults_are_repointed_and_restored(world, many):
    replacements, after, _ = _rebind(world, many)
    A, B, S = (replacements[name] for name in "ABS")
    assert after[:5] == [id(A), id(B), id(S), id(A), id(S)]
    assert after[5:] == [(A, None), {"k": B}, (A, B), (S,), (S,), (A,)]


def test_one_pass_reports_each_unreachable_holder_under_the_original_it_holds(world):
    originals, _, _ = world
    instance = types.SimpleNamespace(a=originals["A"])
    held = [originals["B"]]
    _, _, unreachable = _rebind(world, many=True)
    # "a dict": the fixture's own dict of the originals; the pairs handed in are no holders.
    assert [sorted(found) for found in unreachable] == [
        ["a dict", "an attribute of a types.SimpleNamespace"], ["a builtins.list", "a dict"], ["a dict"]]
    del instance, held
