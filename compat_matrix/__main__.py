"""python -m compat_matrix verify [--releases R ...] [--subset ci] [--all] [--mlx V ...] [--jobs N]
python -m compat_matrix check      compare mlx_threadsafe/compat.toml with the committed evidence
python -m compat_matrix table      regenerate MATRIX.md and the README summary from the evidence

`verify` runs the releases (default: the CI subset), merges the results into
compat_matrix/results/evidence.json, regenerates MATRIX.md and the README summary, then
checks; it exits 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

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
    run.add_argument("--mlx", nargs="*", default=None, help=f"mlx versions (default {verify.RELEASES['mlx']})")
    run.add_argument("--jobs", type=int, default=2)
    commands.add_parser("check", help="check the runtime matrix against the committed evidence")
    commands.add_parser("table", help="regenerate MATRIX.md and the README summary from the evidence, then check")
    args = parser.parse_args(argv)

    records = verify.load_evidence()
    if args.command == "verify":
        if args.representatives:
            targets = verify.targets(verify.RELEASES["representatives"], args.mlx or verify.RELEASES["mlx-other"])
        else:
            requirements = (verify.every_release() if args.all else args.releases
                            if args.releases else verify.RELEASES["ci"])
            targets = verify.targets(requirements, args.mlx or verify.RELEASES["mlx"])
        print(f"verifying {len(targets)} release/mlx pairs with {args.jobs} jobs", flush=True)

        def keep(key, record):  # saved as each pair ends: an hour-long sweep cut short keeps its work
            records[key] = record
            verify.save_evidence(records)

        verify.run(targets, jobs=args.jobs, progress=lambda line: print(line, flush=True), finished=keep)
    if args.command in ("verify", "table"):
        table.write(records)
    problems = verify.check(records)
    for problem in problems:
        print(f"DISAGREES: {problem}")
    print(f"{len(records)} release/mlx pairs in the evidence; "
          f"{'the matrix agrees with it' if not problems else f'{len(problems)} disagreements'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
