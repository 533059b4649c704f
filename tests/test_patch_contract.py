"""The contract every patch keeps, checked for every registered patch (dd-trace's PatchTestCase).

Each ordering runs in a fresh interpreter: install then import the trigger, import then
install, install twice, uninstall twice, uninstall then install then import. After each,
the patch is `applied` and every object its record says it replaced holds the
replacement; after uninstall every one holds the very object it held before. A new
patch is covered by adding the environment that applies it to PATCH_ENVIRONMENTS, and
the coverage test fails until it is there.
"""

import pytest
from helpers import AS_CUDA, run_json
from releases import release_python

from mlx_threadsafe.patches import ALL

# Where each patch applies: None is this test environment (mlx 0.32.4, mlx-lm 0.32.2);
# otherwise (requirement, mlx) of a release venv.
PATCH_ENVIRONMENTS = {
    "mlx.thread_cleanup": None,
    "mlx.thread_rng": None,
    "mlx.module_streams": None,
    "mlx.distributed.one_thread": None,
    "mlx_lm.server.stop_at_exit": None,
    "mlx_lm.load.materialize": None,
    "mlx_lm.BatchGenerator.owner": None,
    "mlx_lm.BatchGenerator.close_guard": None,
    "mlx_lm.stream_generate.batch": None,
    "mlx.compile.random_state": ("mlx-lm==0.26.4", "0.31.2"),
    "mlx_lm.TokenizerWrapper.detokenizer": ("mlx-lm==0.26.4", "0.32.4"),
    "mlx_lm.generation_stream": ("mlx-lm==0.31.1", "0.32.4"),
    "mlx_vlm.generation_stream": ("mlx-vlm==0.4.4", "0.32.4"),
    "mlx_vlm.load.materialize": ("mlx-vlm==0.7.10", "0.32.4"),
    "mlx_vlm.BatchGenerator.owner": ("mlx-vlm==0.7.10", "0.32.4"),
    "mlx_vlm.BatchGenerator.close_guard": ("mlx-vlm==0.7.10", "0.32.4"),
    "mlx_vlm.generate_step.request_state": ("mlx-vlm==0.7.10", "0.32.4"),
    "mlx_vlm.server.stop_at_exit": ("mlx-vlm==0.7.10", "0.32.4"),
    # CUDA only: this environment with the backend reported as CUDA (and the graphs opt-in set).
    "mlx.cuda_capture_gate": "as-cuda-opted-in",
    "mlx.cuda_graph_capture": "as-cuda-opted-in",
}
AS_CUDA_OPTED_IN = AS_CUDA + """
    import os
    os.environ["MLX_THREADSAFE_CUDA_GRAPHS"] = "off"
"""
PRELUDES = {"as-cuda-opted-in": AS_CUDA_OPTED_IN}

ORDERINGS = {
    "install_then_import": ["install", "import"],
    "import_then_install": ["import", "install"],
    "install_twice": ["install", "import", "install"],
    "uninstall_twice": ["install", "import", "uninstall", "uninstall", "install"],
    "uninstall_then_install_then_import": ["install", "uninstall", "install", "import"],
}

CONTRACT = """
    {prelude}
    import importlib, json
    import mlx_threadsafe
    from mlx_threadsafe.patches import by_id
    from mlx_threadsafe.patching.originals import MISSING

    patch = by_id({patch_id!r})
    only = [patch.id, *patch.requires]
    record_counts = []
    for step in {steps!r}:
        if step == "install":
            mlx_threadsafe.install(only=only)
        elif step == "uninstall":
            mlx_threadsafe.uninstall()
        else:
            importlib.import_module(patch.trigger)
        record_counts.append(len(patch.replacements()))
    row = mlx_threadsafe.status()[patch.id]
    replaced = patch.replacements()
    # The newest replacement of each (owner, name) is what the owner holds now.
    newest = {{(id(r.owner), r.name): r for r in replaced}}
    in_place = all(r.current() is r.after for r in newest.values())
    oldest = {{}}
    for r in replaced:
        oldest.setdefault((id(r.owner), r.name), r)
    mlx_threadsafe.uninstall()
    restored = [f"{{r.owner!r:.60}}.{{r.name}}" for r in oldest.values() if r.current() is not r.before]
    print(json.dumps([str(row.state), row.reason, len(replaced), in_place, restored, record_counts,
                      len(patch.replacements()), str(mlx_threadsafe.status()[patch.id].state)]))
"""


def _python(patch_id: str):
    environment = PATCH_ENVIRONMENTS[patch_id]
    if environment is None or environment in PRELUDES:
        return None
    requirement, mlx = environment
    extra = () if requirement.startswith("mlx-vlm") else ("mlx-lm",)
    return release_python(requirement, mlx=mlx, extra=extra)


def test_every_registered_patch_has_an_environment_that_applies_it():
    assert sorted(PATCH_ENVIRONMENTS) == sorted(patch.id for patch in ALL)


def test_every_patch_module_is_named_after_its_patch_id():
    for patch in ALL:
        package, *rest = patch.id.split(".")
        expected = f"mlx_threadsafe.patches.{package}.{'_'.join(_snake(part) for part in rest)}"
        assert _declaring_module(patch) == expected, patch.id


def _declaring_module(patch) -> str:
    import sys

    for name, module in sys.modules.items():
        if name.startswith("mlx_threadsafe.patches.") and getattr(module, "PATCH", None) is patch:
            return name
    raise AssertionError(f"no module declares {patch.id}")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _contract_params():
    for patch in ALL:
        marks = [pytest.mark.release] if isinstance(PATCH_ENVIRONMENTS.get(patch.id), tuple) else []
        for ordering in ORDERINGS:
            yield pytest.param(patch.id, ordering, marks=marks, id=f"{patch.id}-{ordering}")


@pytest.mark.parametrize("patch_id,ordering", list(_contract_params()))
def test_patch_keeps_the_contract(patch_id, ordering):
    python = _python(patch_id)
    prelude = PRELUDES.get(PATCH_ENVIRONMENTS[patch_id], "")
    code = CONTRACT.format(prelude=prelude, patch_id=patch_id, steps=ORDERINGS[ordering])
    kwargs = {"python": python} if python else {}
    state, reason, replaced, in_place, not_restored, counts, left, final = run_json(code, **kwargs)
    assert state == "applied", reason
    assert in_place, "an object the patch says it replaced does not hold the replacement"
    assert not_restored == [], f"uninstall left these replaced: {not_restored}"
    assert left == 0 and final == "not-installed"
    if ordering == "install_twice":
        assert counts[1] == counts[2] == replaced, f"a second install applied again: {counts}"


def test_every_target_is_a_dotted_path_and_every_patch_says_what_it_does():
    import re

    dotted = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
    assert [p.id for p in ALL if not dotted.match(p.target)] == []
    assert [p.id for p in ALL if not p.description] == []
