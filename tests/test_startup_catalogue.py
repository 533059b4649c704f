"""What install() does to start fast stays what it did: the catalogue, the matrix matcher, compat.json.

install() imports only the patch modules planning leaves on (patches.CATALOGUE, data), matches
final releases against compat.toml without packaging.specifiers (planning.Releases), and reads
the wheel's compat.json (hatch_build.py) in place of compat.toml. Each is held here to the
thing it stands in for: the modules' PATCH objects, SpecifierSet, compat.toml.
"""

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT, run_json
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import mlx_threadsafe.patches as patches
from mlx_threadsafe import planning

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

COMPAT_TOML = os.path.join(ROOT, "mlx_threadsafe", "compat.toml")


def test_the_catalogue_declares_every_patch_as_its_module_does_in_planning_order():
    assert [d.id for d in patches.CATALOGUE] == [p.id for p in patches.ALL]
    for declared, patch in zip(patches.CATALOGUE, patches.ALL):
        assert (declared.package, declared.trigger, declared.target) == (patch.package, patch.trigger, patch.target)
        assert sys.modules[f"mlx_threadsafe.patches.{declared.module}"].PATCH is patch
        assert patches.load(declared) is patch and patches.by_id(declared.id) is patch


def test_every_patch_module_is_in_the_catalogue():
    modules = set()
    for family in ("mlx", "mlx_lm", "mlx_vlm"):
        folder = os.path.join(os.path.dirname(patches.__file__), family)
        modules |= {f"{family}.{info.name}" for info in pkgutil.iter_modules([folder])}
    assert modules == {d.module for d in patches.CATALOGUE}


def _versions_around(bound: Version):
    major, minor, micro = (bound.release + (0, 0))[:3]
    below, above = f"{major}.{minor}.{micro - 1}" if micro else f"{major}.{minor - 1}.99" if minor else "0", \
        f"{major}.{minor}.{micro + 1}"
    base = f"{major}.{minor}.{micro}"
    for text in (below, base, above, f"{base}rc1", f"{base}.dev0", f"{base}.post1", f"{base}+local", f"{above}a1",
                 f"{below}.post2", f"{major}.{minor}", f"{base}.0", "0", "99.0"):
        yield Version(text)


def _specifiers():
    with open(COMPAT_TOML, "rb") as toml:
        data = tomllib.load(toml)
    found = [row["releases"] for entry in data.values() for row in entry.get("rows", ())]
    # forms compat.toml does not use today: left to SpecifierSet
    return found + [">0.3.1", "<=0.3.1", "==0.3.*", "~=0.3.1", "!=0.3.1", "", ">=0.3.1rc1", "<0.4.0.post1"]


@pytest.mark.parametrize("text", _specifiers())
def test_releases_match_what_specifier_set_says(text):
    bounds = [Version(part.strip().lstrip("<>=!~").rstrip(".*")) for part in text.split(",") if part.strip()]
    releases = planning.Releases(text)
    for bound in bounds or [Version("0.3.1")]:
        for version in _versions_around(bound):
            expected = SpecifierSet(text).contains(version, prereleases=True)
            assert releases.contains(version) == expected, (text, str(version))


def test_the_matrix_read_from_json_is_the_matrix_read_from_toml():
    with open(COMPAT_TOML, encoding="utf-8") as toml:
        text = toml.read()

    def shown(matrix):
        return {package: (m.newest_known, [(str(r.releases), r.patches, r.summary, r.reason) for r in m.rows])
                for package, m in matrix.items()}

    assert shown(planning._matrix(json.loads(json.dumps(tomllib.loads(text))))) == shown(planning.load_matrix(text))


UV = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")


@pytest.mark.skipif(not os.path.exists(UV), reason="uv builds the wheel")
def test_the_wheel_carries_compat_toml_as_json(tmp_path):
    subprocess.run([UV, "build", "-q", "--wheel", "--out-dir", str(tmp_path), ROOT], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive, open(COMPAT_TOML, "rb") as toml:
        assert json.loads(archive.read("mlx_threadsafe/compat.json")) == tomllib.load(toml)


_ROWS = """
import json, sys
import mlx_threadsafe, mlx_threadsafe.patches as patches
if sys.argv[-1] == "all":
    patches.CATALOGUE = patches.ALL  # the registry as it was: every patch module imported
mlx_threadsafe.install()
import mlx_lm
rows = [list(row) for row in mlx_threadsafe.status().rows]
imported = sorted(name for name in ("packaging.specifiers", "mlx_threadsafe.patches.mlx_vlm.load_materialize")
                  if name in sys.modules)
print(json.dumps([rows, imported]))
"""


def test_the_status_rows_are_those_of_a_registry_of_every_patch():
    lazy_rows, lazy_imported = run_json(_ROWS.replace("sys.argv[-1]", "'catalogue'"))
    all_rows, _ = run_json(_ROWS.replace("sys.argv[-1]", "'all'"))
    assert lazy_rows == all_rows
    skipped_vlm = any(row[0] == "mlx_vlm.load.materialize" and row[3] != "applied" for row in lazy_rows)
    assert lazy_imported == ([] if skipped_vlm else ["mlx_threadsafe.patches.mlx_vlm.load_materialize"])
