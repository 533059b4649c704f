"""Benchmarks: overhead, worker hop, install cost, materialize cost, multi-model concurrency.

    python -m benchmarks [--device cpu|gpu] [--smoke]     measure; writes benchmarks/results/<device>.json
    python -m benchmarks --report                          writes benchmarks/REPORT.md and its plots

Every comparison is measured in one run, patched and unpatched processes interleaved,
and reported as a ratio. `--smoke` (what CI runs) only checks that everything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def measure(section: str, *args: str) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", section, *args], capture_output=True,
                          text=True, cwd=os.path.dirname(HERE), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{section} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SECTIONS = ["generation", "round_trip", "install", "materialize", "concurrency"]


def run(device: str, smoke: bool, only=None) -> Dict[str, Any]:
    common = ["--device", device] + (["--smoke"] if smoke else [])
    models = ["tiny", "wide-gpu"] if device == "gpu" else ["tiny", "mid-cpu"]
    results: Dict[str, Any] = {"device": device, "smoke": smoke, "environment": _environment()}
    sections = only or SECTIONS

    if "generation" in sections:
        results["generation"] = {}
        for model in models:
            results["generation"][model] = measure("generation", "--model", model, *common)
            print(f"generation {model}: patched/unpatched = {results['generation'][model]['ratio']:.3f}", flush=True)
    if "round_trip" in sections:
        results["round_trip"] = measure("round_trip", "--pinned", *common)
        results["round_trip_unpinned"] = measure("round_trip", *common)
    if "install" in sections:
        results["install"] = measure("install")
        results["startup_hook"] = measure("startup_hook")
    if "materialize" in sections:
        results["materialize"] = measure("materialize", "--model", models[-1], *common)
    if "concurrency" in sections:
        unpatched = measure("concurrency", "--model", models[-1], *common)
        patched = measure("concurrency", "--model", models[-1], "--shim", *common)
        results["concurrency"] = dict(unpatched, **patched)
        results["concurrency_model"] = models[-1]
    return results


def _environment() -> Dict[str, Any]:
    import platform

    from mlx_threadsafe import versions

    env = versions.detect()
    return {"describe": env.describe(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count()}


# ------------------------------------------------------------------ report


def _ratio_rows(results: Dict[str, Any]) -> List[str]:
    rows = []
    for model, g in results["generation"].items():
        pairs = sorted(p / u for u, p in zip(g["samples"]["unpatched"], g["samples"]["patched"]))
        low, high = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
        verdict = "met" if g["ratio"] >= 0.98 else ("not resolved: the spread spans 1.0" if high >= 1.0 else "missed")
        rows.append(f"| single-thread generation, {model} model | patched / unpatched tokens/s, median of "
                    f"{len(pairs)} pairs | {g['ratio']:.3f} (quartiles {low:.3f}–{high:.3f}) | ≥ 0.98 | {verdict} |")
    rt = results["round_trip"]
    ratio = rt["worker"]["p50_us"] / rt["thread_pool_executor"]["p50_us"]
    rows.append(f"| Worker round trip p50, threads on one core | Worker / ThreadPoolExecutor(1) | {ratio:.2f} "
                f"({rt['worker']['p50_us']:.1f} µs vs {rt['thread_pool_executor']['p50_us']:.1f} µs; p99 "
                f"{rt['worker']['p99_us']:.0f} vs {rt['thread_pool_executor']['p99_us']:.0f}) | ≤ 1.0 | "
                f"{'met' if ratio <= 1.0 else 'missed'} |")
    free = results.get("round_trip_unpinned")
    if free:
        rows.append(f"| the same, threads placed by the scheduler | Worker / ThreadPoolExecutor(1) | "
                    f"{free['worker']['p50_us'] / free['thread_pool_executor']['p50_us']:.2f} "
                    f"({free['worker']['p50_us']:.0f} µs vs {free['thread_pool_executor']['p50_us']:.0f} µs) | "
                    f"context | |")
    inst = results["install"]
    ok = inst["install_ms"] < 50 and not inst["imported_heavy"]
    rows.append(f"| `install()` | time; mlx / mlx_lm / transformers imported | {inst['install_ms']:.1f} ms; "
                f"{', '.join(inst['imported_heavy']) or 'none'} | < 50 ms, none | {'met' if ok else 'missed'} |")
    foreign = [m for m in inst["added_to_mlx_lm_app"] if m not in ("mlx_threadsafe", "wrapt", "packaging")
               and m not in getattr(sys, "stdlib_module_names", ())]
    rows.append(f"| `import mlx_threadsafe` | time; top-level modules it adds to an mlx-lm application | "
                f"{inst['import_ms']:.0f} ms; {', '.join(inst['added_to_mlx_lm_app'])} | itself, its dependencies "
                f"(wrapt, packaging) and the standard library only | "
                f"{'met' if not foreign else 'missed'} |")
    total = inst["import_ms"] + inst["install_ms"]
    rows.append(f"| `import mlx_threadsafe` + `install()`, mlx-lm installed, not imported | time | "
                f"{total:.1f} ms | ≤ 30 ms | {'met' if total <= 30 else 'missed'} |")
    hook = results["startup_hook"]
    if "variable_set_ratio" in hook:
        rows.append(f"| `MLX_THREADSAFE=1`, a process that never imports mlx | whole process / the same unset, "
                    f"median of {hook['variable_pairs']} ABBA pairs | {hook['variable_set_ratio']:.2f} "
                    f"({hook['variable_set_ms']:.0f} vs {hook['variable_unset_ms']:.0f} ms) | ≤ 1.2 | "
                    f"{'met' if hook['variable_set_ratio'] <= 1.2 else 'missed'} |")
    rows.append(f"| start-up hook, variable unset | hook line / interpreter start | {hook['share_of_start']:.5f} "
                f"({hook['hook_line_us']:.2f} µs of {hook['interpreter_start_ms']:.0f} ms) | not measurable | "
                f"{'met' if hook['share_of_start'] < 0.001 else 'missed'} |")
    mat = results["materialize"]
    rows.append(f"| `materialize` after load | materialize / load time | {mat['share_of_load']:.3f} "
                f"({mat['materialize_ms']:.1f} of {mat['load_ms']:.0f} ms, {mat['arrays']} arrays) | ≤ 0.05 | "
                f"{'met' if mat['share_of_load'] <= 0.05 else 'missed'} |")
    c = results["concurrency"]
    serial4 = c["serial/K=4"]["tokens_per_s"]
    workers4 = c["workers/K=4"]["tokens_per_s"]
    raw4 = c["raw_threads/K=4"]["tokens_per_s"]
    if results["device"] == "gpu":
        rows.append(f"| K = 4 models on Workers | Workers / serial tokens/s | {workers4 / serial4:.2f} | ≥ 1.8 | "
                    f"{'met' if workers4 / serial4 >= 1.8 else 'missed'} |")
    else:
        rows.append(f"| K = 4 models on Workers | Workers / raw threads tokens/s | {workers4 / raw4:.2f} "
                    f"(Workers / serial {workers4 / serial4:.2f}) | ≥ 0.95 (no worse) | "
                    f"{'met' if workers4 / raw4 >= 0.95 else 'missed'} |")
    return rows


def _concurrency_table(results: Dict[str, Any]) -> List[str]:
    c = results["concurrency"]
    lines = ["| K | mode | tokens/s | vs serial | request latency p50 | max |", "|---|---|---|---|---|---|"]
    for k in (1, 2, 4):
        serial = c[f"serial/K={k}"]["tokens_per_s"]
        for mode in ("serial", "raw_threads", "global_lock", "workers"):
            row = c[f"{mode}/K={k}"]
            lines.append(f"| {k} | {mode.replace('_', ' ')} | {row['tokens_per_s']:.0f} | "
                         f"{row['tokens_per_s'] / serial:.2f}× | {row['latency_p50_ms']:.0f} ms | "
                         f"{row['latency_max_ms']:.0f} ms |")
    return lines


def _plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = results["concurrency"]
    modes = ["serial", "raw_threads", "global_lock", "workers"]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, mode in enumerate(modes):
        values = [c[f"{mode}/K={k}"]["tokens_per_s"] for k in (1, 2, 4)]
        axis.bar([x + (i - 1.5) * width for x in range(3)], values, width, label=mode.replace("_", " "))
    axis.set_xticks(range(3), ["K = 1", "K = 2", "K = 4"])
    axis.set_ylabel("aggregate tokens/s")
    axis.set_title(f"{results['device'].upper()}: K models, each generating on its own thread "
                   f"({results['concurrency_model']})", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report() -> str:
    sections = []
    for device in ("cpu", "gpu"):
        path = os.path.join(RESULTS, f"{device}.json")
        if not os.path.exists(path):
            sections.append(f"## {device.upper()}\n\nNot measured yet (`python -m benchmarks --device {device}`).\n")
            continue
        with open(path) as source:
            results = json.load(source)
        plot = f"concurrency-{device}.png"
        _plot(results, os.path.join(HERE, plot))
        env = results["environment"]
        sections.append("\n".join([
            f"## {device.upper()}: {env['describe']}",
            f"Python {env['python']} on {env['machine']}, {env['cpus']} CPUs. Raw numbers: `results/{device}.json`.",
            "", "| what | ratio | measured | target | |", "|---|---|---|---|---|", *_ratio_rows(results), "",
            f"### Concurrency ({results['concurrency_model']} model)", "", *_concurrency_table(results), "",
            f"![concurrency on {device}]({plot})", ""]))
    text = "\n".join(["# Benchmarks", "",
                      "Generated by `python -m benchmarks --report` from the committed results; each ratio is "
                      "measured in one run (patched and unpatched processes interleaved).", "",
                      open(os.path.join(HERE, "NOTES.md")).read().strip(), "", *sections])
    with open(os.path.join(HERE, "REPORT.md"), "w") as out:
        out.write(text)
    return text


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; only checks that everything runs")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>.json)")
    parser.add_argument("--report", action="store_true", help="write REPORT.md and plots from the results")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="re-measure these sections, keep the rest")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return 0
    results = run(args.device, args.smoke, args.only)
    out = args.out or (os.path.join(RESULTS, f"{args.device}.json") if not args.smoke else None)
    if out and args.only and os.path.exists(out):
        with open(out) as previous:
            # The machine described is the one of the full run; a section re-measured keeps it.
            results = dict(json.load(previous), **{k: v for k, v in results.items() if k != "environment"})
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as sink:
            json.dump(results, sink, indent=1)
        print(f"wrote {out}")
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
