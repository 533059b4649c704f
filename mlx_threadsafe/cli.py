"""mlx-threadsafe status | doctor | run"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional


def _verdict(without, with_shim) -> str:
    if with_shim.ok and not without.ok:
        return "fixed by the shim"
    if with_shim.ok:
        return "works either way"
    return "STILL FAILS"


def doctor(scenarios: List[str]) -> int:
    from . import install, versions
    from .scenarios import DESCRIPTIONS, run_batch
    from .testing import build_lm, build_lora_adapter

    env = versions.detect()
    print(f"mlx_threadsafe doctor: {env.describe()}")
    if env.mlx is None or env.mlx_lm is None:
        print("doctor needs mlx and mlx-lm: pip install 'mlx-threadsafe[cpu,lm]' (or [lm] on macOS)")
        return 2
    print("building tiny offline models ...", flush=True)
    for arch in ("llama", "llama3rope", "gemma3_text", "qwen3"):
        build_lm(arch)
    build_lora_adapter("llama")
    started = time.monotonic()
    print("running the scenarios in two fresh processes at once, one without the shim and one with it (a "
          "scenario that kills its process is named, and the ones after it run again, each alone):\n", flush=True)
    # The sides run side by side: each process spends most of its time starting the
    # backend and compiling kernels, not computing.
    with ThreadPoolExecutor(2, thread_name_prefix="doctor-side") as sides:
        without_side = sides.submit(run_batch, scenarios, shim=False)
        with_all = run_batch(scenarios, shim=True)
        without_all = without_side.result()
    rows = []
    for name in scenarios:
        without, with_shim = without_all[name], with_all[name]
        rows.append((DESCRIPTIONS[name], without, with_shim, _verdict(without, with_shim)))
        mark = lambda o: "ok" if o.ok else "FAILS"  # noqa: E731
        print(f"- {DESCRIPTIONS[name]}\n    without shim: {mark(without):5}  {'' if without.ok else without.detail}"
              f"\n    with shim:    {mark(with_shim):5}  {'' if with_shim.ok else with_shim.detail}"
              f"\n    => {rows[-1][3]}", flush=True)
    print()
    print(install())
    still_failing = [r for r in rows if r[3] == "STILL FAILS"]
    print(f"\n{len(rows) - len(still_failing)} of {len(rows)} scenarios work with the shim "
          f"({time.monotonic() - started:.1f} s).")
    return 1 if still_failing else 0


def _interpreter_for(executable: str) -> Optional[str]:
    """The Python that `executable` runs on: itself, or its shebang's interpreter (console scripts)."""
    if os.path.basename(executable).startswith("python"):
        return executable
    try:
        with open(executable, "rb") as script:
            first_line = script.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first_line.startswith("#!"):
        return None
    words = first_line[2:].split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
        return shutil.which(words[0]) if words else None
    return words[0] if words else None


def run(command: List[str], info: bool) -> int:
    from .bootstrap import DIRECTORY

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("mlx-threadsafe run: give a command, e.g. mlx-threadsafe run -- mlx_lm.server --model ./m",
              file=sys.stderr)
        return 2
    executable = shutil.which(command[0])
    if executable is None:
        print(f"mlx-threadsafe run: command not found: {command[0]}", file=sys.stderr)
        return 127
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([DIRECTORY] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if info:
        python = _interpreter_for(executable)
        if python is None:
            print(f"{executable} is not a Python program; its Python child processes get the shim "
                  f"when they can import mlx_threadsafe")
            return 0
        print(f"command: {' '.join(command)}\ninterpreter: {python}\n", flush=True)
        return subprocess.call([python, "-m", "mlx_threadsafe", "status"], env=env)
    # exec, like ddtrace-run: the command keeps our pid, so signals reach it directly.
    os.execve(executable, command, env)
    return 0  # not reached


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-threadsafe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="versions and the patch table, as install() would leave them")
    doctor_parser = commands.add_parser("doctor", help="run cross-thread scenarios without and with the shim")
    doctor_parser.add_argument("scenario", nargs="*", help="run only these scenarios")
    run_parser = commands.add_parser(
        "run", help="run a command with the shim installed in every Python process it starts")
    run_parser.add_argument(
        "--info", action="store_true", help="print what would be applied for that command's Python, and exit")
    run_parser.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.command_line, args.info)
    if args.command == "status":
        import mlx_threadsafe

        print(mlx_threadsafe.install())
        return 0
    from .scenarios import SCENARIOS, doctor_scenarios

    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    return doctor(args.scenario or doctor_scenarios())


if __name__ == "__main__":
    sys.exit(main())
