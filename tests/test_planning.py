"""planning decides whether each patch applies, and says why; the order of ALL follows `requires`.

Wiring tests: fake patches and environments, no MLX call (what they decide is held to real
MLX by the contract and scenario tests).
"""

import pytest

from mlx_threadsafe import planning
from mlx_threadsafe.patch_status import PatchStatus, State
from mlx_threadsafe.patches import ALL, in_dependency_order
from mlx_threadsafe.registry import Patch
from mlx_threadsafe.versions import Environment

MATRIX = planning.load_matrix("""
[mlx]
newest_known = "0.32.4"

[[mlx.rows]]
releases = ">=0.31.2"
patches = ["mlx.a", "mlx.b", "mlx.stream"]
summary = "per-thread state"
reason = "why"

[[mlx.rows]]
releases = "<0.31.2"
patches = []
summary = "process-wide state"
reason = "why"
""")


def patch(patch_id, requires=(), streams=False):
    return Patch(id=patch_id, package="mlx", trigger="mlx.core", target="mlx.core.eval", requires=requires,
                 needs_thread_bound_streams=streams)


def env(mlx="0.32.4", backend="cpu"):
    return Environment(mlx=mlx, mlx_lm=None, mlx_vlm=None, backend=backend)


def decide(p, environment=None, options=None, states=None):
    return planning.decide(p, environment or env(), MATRIX, options or planning.Options(), states or {})


def test_the_matrix_row_of_the_installed_release_decides_and_is_the_reason():
    assert decide(patch("mlx.a")) == planning.Decision(True, "mlx 0.32.4: per-thread state")
    skipped = decide(patch("mlx.a"), env("0.31.0"))
    assert (skipped.apply, skipped.state, skipped.reason) == (False, State.SKIPPED,
                                                              "not needed on mlx 0.31.0: process-wide state")
    assert not decide(patch("mlx.unlisted")).apply


def test_a_release_newer_than_the_matrix_applies_where_the_probe_holds():
    decision = decide(patch("mlx.unlisted"), env("0.40.0"))
    assert decision.apply and decision.unknown_release


def test_options_come_first_and_disable():
    options = planning.Options(only=frozenset({"mlx.b"}), disabled_by_env=frozenset({"mlx.b"}))
    assert decide(patch("mlx.a"), options=options).reason == "not in install(only=...)"
    assert decide(patch("mlx.b"), options=options) == planning.Decision(False, "MLX_THREADSAFE_DISABLE",
                                                                         state=State.DISABLED)


def test_stream_patches_skip_where_streams_are_not_bound_to_threads():
    assert decide(patch("mlx.stream", streams=True), env("0.31.2", "cpu")).reason == \
        "mlx 0.31.2 on cpu does not bind streams to threads"
    assert decide(patch("mlx.stream", streams=True), env("0.31.2", "cuda")).apply


def test_a_patch_whose_requirement_was_disabled_is_disabled_with_the_reason():
    disabled = {"mlx.a": PatchStatus("mlx.a", "t", "mlx.core", State.DISABLED, "install(exclude=...)")}
    decision = decide(patch("mlx.b", requires=["mlx.a"]), states=disabled)
    assert (decision.apply, decision.state) == (False, State.DISABLED)
    assert decision.reason == "requires mlx.a, which is disabled: install(exclude=...)"
    skipped = {"mlx.a": PatchStatus("mlx.a", "t", "mlx.core", State.SKIPPED, "not needed")}
    assert decide(patch("mlx.b", requires=["mlx.a"]), states=skipped).apply


def test_every_patch_comes_after_the_patches_it_requires():
    b, a, c = patch("mlx.b", requires=["mlx.a"]), patch("mlx.a"), patch("mlx.c")
    assert [p.id for p in in_dependency_order([b, c, a])] == ["mlx.c", "mlx.a", "mlx.b"]
    position = {p.id: i for i, p in enumerate(ALL)}
    assert all(position[r] < position[p.id] for p in ALL for r in p.requires)


def test_a_cycle_of_requirements_is_refused():
    from graphlib import CycleError

    with pytest.raises(CycleError):
        in_dependency_order([patch("mlx.a", requires=["mlx.b"]), patch("mlx.b", requires=["mlx.a"])])
