"""python -m compat_matrix verify [--releases R ...] [--subset ci] [--all] [--mlx V ...] [--jobs N]
python -m compat_matrix verify --site-dirs SITES [--releases R ...] [--out FILE]   no venvs: a GPU machine
python -m compat_matrix merge FILE ...  merge the records of a run saved with --out into the evidence
python -m compat_matrix check      compare mlx_threadsafe/compat.toml with the committed evidence
python -m compat_matrix table      regenerate MATRIX.md and the README summary from the evidence

`verify` runs the releases (default: the CI subset), merges the results into
compat_matrix/results/evidence.json, regenerates MATRIX.md and the README summary, then
checks; it exits 1 on any disagreement. With --site-dirs it makes no venv: each release
runs on this interpreter from SITES/<package>-<release> (made with `pip install --no-deps
--target`), first on PYTHONPATH; mlx and this package come from the existing PYTHONPATH.
With --out the records go to that file alone (checked by themselves), for `merge` later.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Dict, List, Optional

from mlx_threadsafe import versions

from . import table, verify


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compat_matrix", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("verify", help="run releases, record evidence, check the matrix")
    run.add_argument("--releases", nargs="*", default=None, help="e.g. mlx-lm==0.31.1 mlx-vlm==0.7.10")
    run.add_argument("--all", action="store_true", help="every release in compat_matrix/releases.toml")
    run.add_argument("--subset", choices=["ci"], default=None, help="the fast subset CI runs")
    run.add_argument("--representatives", action="store_true",
                     help="the representatives of each matrix range, on every mlx in mlx-other (unless --mlx)")
    run.add_argument("--mlx", nargs="*", default=None,
                     help=f"mlx versions (default {verify.RELEASES['mlx']}; with --site-dirs the installed one)")
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--site-dirs", default=None, metavar="SITES",
                     help="run each release from SITES/<package>-<release> on this interpreter (no venvs, no uv)")
    run.add_argument("--device-label", default="auto",
                     help="with --site-dirs: the device the records name ('auto': nvidia-smi and mlx)")
    run.add_argument("--out", default=None, metavar="FILE",
                     help="save this run's records to FILE only (not the evidence, MATRIX.md or README)")
    merge = commands.add_parser("merge", help="merge records saved with verify --out into the evidence, then "
                                              "regenerate the tables and check")
    merge.add_argument("files", nargs="+")
    commands.add_parser("check", help="check the runtime matrix against the committed evidence")
    tables = commands.add_parser("table", help="regenerate MATRIX.md and the README summary from the evidence, "
                                               "then check")
    tables.add_argument("--out-dir", default=None, help="write MATRIX.md and a README.md copy there instead")
    args = parser.parse_args(argv)

    records = verify.load_evidence()
    if args.command == "verify":
        return _verify(args, records)
    if args.command == "merge":
        for path in args.files:
            for key in verify.merge_evidence(records, path):
                print(f"merged {key}: {verify.summarize(records[key])}; {_against_cpu(records, key)}")
        verify.save_evidence(records)
    if args.command in ("merge", "table"):
        table.write(records, getattr(args, "out_dir", None))
    return _report(records, verify.check(records))


def _verify(args: argparse.Namespace, records: Dict[str, Dict[str, Any]]) -> int:
    if args.representatives:
        requirements = verify.RELEASES["representatives"]
        mlx_versions = args.mlx or verify.RELEASES["mlx-other"]
    else:
        requirements = verify.every_release() if args.all else args.releases if args.releases else verify.RELEASES["ci"]
        mlx_versions = args.mlx or verify.RELEASES["mlx"]
    run_one = verify.run_target
    backend = "cpu"
    if args.site_dirs:
        backend = versions.mlx_backend()
        mlx_versions = args.mlx or [versions.distribution_version("mlx") or "not installed"]
        device = verify.device_label(backend) if args.device_label == "auto" else args.device_label
        print(f"site dirs {os.path.abspath(args.site_dirs)}: mlx {', '.join(mlx_versions)} ({backend}) on {device}",
              flush=True)
        run_one = functools.partial(verify.run_site_target, sites=os.path.abspath(args.site_dirs), device=device)
    targets = verify.targets(requirements, mlx_versions, backend)
    print(f"verifying {len(targets)} release/mlx pairs with {args.jobs} jobs", flush=True)
    this_run: Dict[str, Dict[str, Any]] = {}

    def keep(key, record):  # saved as each pair ends: an hour-long sweep cut short keeps its work
        this_run[key] = record
        if args.out:
            verify.save_evidence(this_run, args.out)
        else:
            records[key] = record
            verify.save_evidence(records)

    verify.run(targets, jobs=args.jobs, progress=lambda line: print(line, flush=True), finished=keep,
               run_one=run_one)
    if args.out:
        for key in this_run:
            print(f"{key}: {_against_cpu(dict(records, **this_run), key)}")
        problems = verify.unrun_mlx_patches(this_run, cpu=False) + verify.check_records(this_run)
        return _report(this_run, problems, where=args.out)
    table.write(records)
    return _report(records, verify.check(records))


def _against_cpu(records: Dict[str, Dict[str, Any]], key: str) -> str:
    record = records[key]
    if verify.backend_of(record) == "cpu":
        return "a CPU record"
    cpu = verify.cpu_record(records, record)
    if cpu is None:
        return "no CPU record of this pair"
    differences = verify.verdict_differences(record, cpu)
    return ("verdicts as on the CPU" if not differences
            else "verdicts that differ from the CPU (CPU -> here): " + "; ".join(differences))


def _report(records: Dict[str, Dict[str, Any]], problems: List[str], where: str = "the evidence") -> int:
    for problem in problems:
        print(f"DISAGREES: {problem}")
    print(f"{len(records)} release/mlx pairs in {where}; "
          f"{'the matrix agrees with it' if not problems else f'{len(problems)} disagreements'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
