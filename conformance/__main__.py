"""python -m conformance run [--fast] [--servers ...] [--suites ...] [--sides ...]
python -m conformance table     regenerate conformance/RESULTS.md from the evidence
python -m conformance check     exit 1 if a committed check fails with the shim, or an upstream
                                test passes without the shim and fails with it

`run` runs third-party servers and upstream test suites without and with the shim (each
in its own venv under .venvs/conformance/, this package installed editable), merges the
records into conformance/results/evidence.json, regenerates RESULTS.md, then checks.
`--fast` is the CI subset (a few minutes): vllm-mlx in continuous-batching mode on the
tiny llama without the shim and under `mlx-threadsafe run`, and a handful of mlx-lm
0.32.2's own tests. Sides: `none`, `run`, `env`, and `batch` (`MLX_THREADSAFE=1
MLX_THREADSAFE_BATCH=1`), run where a server lists it or --sides asks
(`--servers to-thread-app --sides none env batch`: the batch mode's throughput against the
other sides).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import evidence, servers, upstream

FAST = dict(servers=["vllm-mlx"], modes=["continuous-batching"], models=["llama"], sides=["none", "run"],
            suites=[upstream.FAST_SUITE])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run servers and suites, record the evidence, check it")
    run.add_argument("--fast", action="store_true", help="the CI subset")
    run.add_argument("--servers", nargs="*", default=None, choices=sorted(servers.SERVERS))
    run.add_argument("--modes", nargs="*", default=None)
    run.add_argument("--models", nargs="*", default=None, choices=list(servers.MODELS))
    run.add_argument("--sides", nargs="*", default=None, choices=list(servers.SIDES))
    run.add_argument("--suites", nargs="*", default=None, choices=sorted(upstream.SUITES),
                     help="upstream suites (default: all; none with --servers alone)")
    run.add_argument("--evidence", default=evidence.EVIDENCE, help="where to merge the records")
    commands.add_parser("table", help="regenerate RESULTS.md from the evidence")
    check = commands.add_parser("check", help="check the committed evidence")
    check.add_argument("--evidence", default=evidence.EVIDENCE)
    args = parser.parse_args(argv)

    path = getattr(args, "evidence", evidence.EVIDENCE)
    records = evidence.load(path)
    if args.command == "run":
        if args.fast:
            selection = dict(FAST)
        else:
            selection = dict(servers=args.servers, modes=args.modes, models=args.models, sides=args.sides,
                             suites=args.suites)
            if args.servers is not None and args.suites is None:
                selection["suites"] = []
            if args.suites is not None and args.servers is None:
                selection["servers"] = []

        def keep(key, record):  # saved as each check ends: a long run cut short keeps its work
            records[key] = record
            evidence.save(records, path)

        if selection["servers"] != []:
            servers.run(selection["servers"], selection["modes"], selection["models"], selection["sides"],
                        progress=lambda line: print(line, flush=True), finished=keep)
        if selection["suites"] != []:
            upstream.run(selection["suites"], progress=lambda line: print(line, flush=True), finished=keep)
    if args.command in ("run", "table") and path == evidence.EVIDENCE:
        evidence.write_table(records)
    problems, notes = evidence.check(records)
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"FAILS: {problem}")
    print(f"{len(records)} records; {'check passes' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
