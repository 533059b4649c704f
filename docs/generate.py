"""Regenerate (or, with --check, verify) the generated tables of the documentation.

    python docs/generate.py           rewrite every generated block in place
    python docs/generate.py --check   exit 1, naming the block, when a committed block is stale

Each block sits between two marker comments in a Markdown file and is made from data:

- docs/compat-matrix.md, `compat-table`: the matrix as data, mlx_threadsafe/compat.toml,
  with each row's range read against the releases in compat_matrix/releases.toml;
- docs/compat-matrix.md, `matrix-summary`: the release evidence, compat_matrix/results/evidence.json
  (also written by `python -m compat_matrix table`);
- README.md, `verified-with`: the conformance evidence, conformance/results/evidence.json
  (also written by `python -m conformance table`);
- docs/benchmarks.md, `startup-wheel`: benchmarks/results/startup-wheel.json
  (`python -m benchmarks.wheel_startup`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPAT_PAGE = os.path.join(ROOT, "docs", "compat-matrix.md")
README = os.path.join(ROOT, "README.md")
BENCHMARKS_PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
PACKAGES = ("mlx", "mlx-lm", "mlx-vlm")

if ROOT not in sys.path:  # the harnesses live at the repository root, beside the package
    sys.path.insert(0, ROOT)


def _toml(path: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(path, "rb") as source:
        return tomllib.load(source)


def _known_releases(package: str, releases: dict) -> List[str]:
    known = list(releases.get(package, []))
    if package == "mlx":
        known += releases.get("mlx-other", [])
    return known


def _range(specifier: str, known: Sequence[str]) -> str:
    """'>=0.20.1,<0.28.0' as '0.20.1 – 0.27.1' (the last release below the bound that the matrix knows)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SpecifierSet(specifier)
    lower = [s.version for s in spec if s.operator == ">="]
    upper = [s.version for s in spec if s.operator == "<"]
    if not upper:
        return f">= {lower[0]}" if lower else specifier
    inside = sorted((Version(v) for v in known if Version(v) in spec), reverse=True)
    if not lower:
        return f"< {upper[0]}"
    last = str(inside[0]) if inside else f"< {upper[0]}"
    return lower[0] if last == lower[0] else f"{lower[0]} – {last}"


def _short(patch: str, package: str) -> str:
    prefix = package.replace("-", "_") + "."
    return patch[len(prefix):] if patch.startswith(prefix) else patch


def compat_table(compat: dict, releases: dict) -> str:
    """One line per compat.toml row: the package, its releases, the patches it applies and why."""
    lines = ["| package | releases | patches | why |", "|---|---|---|---|"]
    for package in PACKAGES:
        known = _known_releases(package, releases)
        for row in compat[package]["rows"]:
            patches = ", ".join(f"`{_short(p, package)}`" for p in row["patches"]) or "none"
            lines.append(f"| {package} | {_range(row['releases'], known)} | {patches} | {row['summary']} |")
    newest = ", ".join(f"{package} {compat[package]['newest_known']}" for package in PACKAGES)
    lines += ["", f"Newest releases the matrix knows: {newest}."]
    return "\n".join(lines)


def _compat_block() -> str:
    return compat_table(_toml(os.path.join(ROOT, "mlx_threadsafe", "compat.toml")),
                        _toml(os.path.join(ROOT, "compat_matrix", "releases.toml")))


def _matrix_summary_block() -> str:
    from compat_matrix import table, verify

    return table.summary(verify.load_evidence())


def _verified_with_block() -> str:
    from conformance import evidence

    return evidence.readme_table(evidence.load())


def startup_table(result: dict) -> str:
    """The start-up figures of a wheel install, against their targets."""
    on = result["measured_on"]
    targets = result["targets"]

    def verdict(value: float, target: float) -> str:
        return "met" if value <= target else "**missed**"

    shim_first = result["install_first_total_ms"]
    return "\n".join([
        f"Measured {on['date']} on {on['cpus']} CPUs ({on['platform']}), Python {on['python']}, mlx {on['mlx']}, "
        f"mlx-lm {on['mlx-lm']}, 1-minute load average {on.get('load_average_1min', 'not recorded')}; "
        f"`{result['wheel']}`.",
        "",
        "| what | measured | target | |",
        "|---|---|---|---|",
        f"| `python -c pass`, MLX_THREADSAFE=1 against unset (median of {result['pairs']} ABBA pairs) | "
        f"+{result['pass_added_ms']:.1f} ms ({result['pass_variable_ms']:.1f} vs {result['pass_bare_ms']:.1f} ms, "
        f"{result['pass_ratio']:.2f}x) | ≤ +{targets['pass_added_ms']:.0f} ms | "
        f"{verdict(result['pass_added_ms'], targets['pass_added_ms'])} |",
        f"| `install()` first, then `import mlx_lm`: install() + what the import adds (median of "
        f"{result['samples']} pairs) | {result['install_first_install_ms']:.1f} + "
        f"{result['install_first_planning_ms']:.1f} = {shim_first:.1f} ms | ≤ {targets['shim_part_ms']:.0f} ms | "
        f"{verdict(shim_first, targets['shim_part_ms'])} |",
        f"| `import mlx_lm` first, then `import mlx_threadsafe; install()` (median of {result['samples']}) | "
        f"{result['install_after_ms']:.1f} ms | ≤ {targets['shim_part_ms']:.0f} ms | "
        f"{verdict(result['install_after_ms'], targets['shim_part_ms'])} |",
        f"| for scale: a bare `import mlx_lm` | {result['mlx_lm_import_bare_ms']:.0f} ms | | |",
    ] + ([
        f"| the same install() first, with mlx_lm's non-MLX dependencies (numpy, huggingface_hub, "
        f"transformers) loaded before the clock on both sides, so the difference is read against a "
        f"{result['mlx_lm_import_preloaded_ms']:.0f} ms import (median of {result['samples']} pairs) | "
        f"{result['install_first_preloaded_install_ms']:.1f} + {result['install_first_preloaded_planning_ms']:.1f} = "
        f"{result['install_first_preloaded_total_ms']:.1f} ms | ≤ {targets['shim_part_ms']:.0f} ms | "
        f"{verdict(result['install_first_preloaded_total_ms'], targets['shim_part_ms'])} |",
    ] if "install_first_preloaded_total_ms" in result else []))


def _startup_block() -> str:
    import json

    with open(os.path.join(ROOT, "benchmarks", "results", "startup-wheel.json")) as source:
        return startup_table(json.load(source))


BLOCKS: List[Tuple[str, str, Callable[[], str]]] = [
    (COMPAT_PAGE, "compat-table", _compat_block),
    (COMPAT_PAGE, "matrix-summary", _matrix_summary_block),
    (README, "verified-with", _verified_with_block),
    (BENCHMARKS_PAGE, "startup-wheel", _startup_block),
]


def _replace(text: str, name: str, content: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"docs/generate.py: the markers of {name} are missing")
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{content}\n{end}", text,
                  flags=re.S)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed block differs from its data")
    args = parser.parse_args(argv)
    stale: List[str] = []
    texts: Dict[str, str] = {}
    for path, name, make in BLOCKS:
        if path not in texts:
            with open(path) as source:
                texts[path] = source.read()
        updated = _replace(texts[path], name, make())
        if updated != texts[path]:
            stale.append(f"{os.path.relpath(path, ROOT)}: {name}")
        texts[path] = updated
    if args.check:
        for block in stale:
            print(f"stale generated block {block} (run: python docs/generate.py)")
        if not stale:
            print("generated tables: current")
        return 1 if stale else 0
    for path, text in texts.items():
        with open(path, "w") as sink:
            sink.write(text)
    for block in stale:
        print(f"regenerated {block}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
