"""Benchmarks: overhead, worker hop, install, materialize, concurrency, shared model, thread churn, hand-over.

    python -m benchmarks [--device cpu|gpu] [--smoke]     measure; writes benchmarks/results/<device>.json
    python -m benchmarks --report                          writes benchmarks/REPORT.md and its plots

Every comparison is measured in one run, patched and unpatched processes interleaved,
and reported as a ratio. `--smoke` (what CI runs) only checks that everything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional

from harness.evidence import machine, read_json, today, write_json, write_text
from harness.markdown import table

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def measure(section: str, *args: str) -> Dict[str, Any]:
    for attempt in range(3):
        done = subprocess.run([sys.executable, "-m", "benchmarks.measure", section, *args], capture_output=True,
                              text=True, cwd=os.path.dirname(HERE), timeout=1800)
        # The rare abort at interpreter exit after the measurement was printed (MLX tearing
        # down ended threads' state; see benchmarks/exit_runs): re-run, as the tests do.
        exit_abort = done.returncode != 0 and "terminate called" in done.stderr and bool(done.stdout.strip())
        if done.returncode == 0 or not exit_abort or attempt == 2:
            break
        print(f"{section}: aborted at exit after measuring; run again", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"{section} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SECTIONS = ["generation", "round_trip", "install", "materialize", "concurrency", "shared_model", "thread_churn",
            "handover", "streams"]


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
    # The three below use the tiny model in the smoke pass, to keep it to seconds.
    if "shared_model" in sections:
        model = "tiny" if smoke else models[-1]
        results["shared_model"] = measure("shared_model", "--model", model, "--shim", *common)
        # The same batches in a process without the shim: where a batch differs from one at
        # a time, does it differ there too?
        results["shared_model"]["batch_without_shim"] = measure("batch_equality", "--model", model, *common)
        n = max(results["shared_model"]["ns"])
        print(f"shared_model {model}, N = {n}: batch/threads tokens/s = "
              f"{_batch_over_threads(results['shared_model'], n):.2f}", flush=True)
    if "thread_churn" in sections:
        results["thread_churn"] = _thread_churn(common, smoke)
        print("thread_churn KB per thread (without / with shim): " + ", ".join(
            f"{kind} {results['thread_churn']['without_shim'][kind]['kb_per_thread']:.1f} / "
            f"{results['thread_churn']['with_shim'][kind]['kb_per_thread']:.1f}" for kind in CHURN_KINDS), flush=True)
    if "handover" in sections:
        results["handover"] = {}
        # The tiny model shows the hop at its largest share of a step; on the CPU the larger
        # model's step (about 100 ms on 2 cores) would bury it in noise.
        for model in (["tiny"] if smoke or device == "cpu" else ["tiny", models[-1]]):
            results["handover"][model] = measure("handover", "--model", model, "--shim", *common)
            print(f"handover {model}: worker/direct µs per next() = {results['handover'][model]['ratio']:.3f}",
                  flush=True)
    if "streams" in sections:
        results["streams"] = measure("streams", *common)
        print("streams: " + ", ".join(f"{case} x{row['ratio']:.2f}" for case, row in
                                      results["streams"]["cases"].items() if row["ratio"]), flush=True)
    # Sections may be re-measured apart (--only), on another machine: each names its own.
    where = f"{_device_name(device)}, {today()}"
    results["measured_on"] = {section: where for section in sections}
    return results


def _device_name(device: str) -> str:
    code = ("import mlx.core as mx; mx.set_default_device(mx.gpu if %r == 'gpu' else mx.cpu); "
            "print(mx.device_info().get('device_name', '') if hasattr(mx, 'device_info') else '')" % device)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or device


CHURN_KINDS = ("no_mlx", "eval", "generate")


def _churn_kinds(churn: Dict[str, Any]) -> List[str]:
    # Results measured before the no_mlx kind existed lack it.
    return [kind for kind in CHURN_KINDS if kind in churn["without_shim"]]


def _thread_churn(common: List[str], smoke: bool) -> Dict[str, Any]:
    """Processes without and with the shim, ABBA (one pair in the smoke pass), medians per side.

    If the side without the shim cannot share the model across threads (its threads
    fail), it loads one per thread, and every later process does the same.
    """
    runs: List[Dict[str, Any]] = []
    own_model = False
    for shim in ((False, True) if smoke else (False, True, True, False)):
        run = measure("thread_churn", "--model", "tiny", *common, *(["--shim"] if shim else []),
                      *(["--own-model"] if own_model else []))
        own_model = own_model or run["generate"]["model"] != "shared"
        runs.append(run)
    summary: Dict[str, Any] = {key: runs[0][key] for key in ("threads", "warm_up_threads", "rss_source",
                                                             "model", "measured_on")}
    for side, shim in (("without_shim", False), ("with_shim", True)):
        mine = [run for run in runs if run["shim"] == shim]
        summary[side] = {kind: {
            "kb_per_thread": statistics.median(run[kind]["kb_per_thread"] for run in mine),
            "samples_kb_per_thread": [run[kind]["kb_per_thread"] for run in mine],
            "us_per_thread": statistics.median(run[kind]["us_per_thread"] for run in mine),
            "error_count": sum(run[kind]["error_count"] for run in mine),
            "errors": [e for run in mine for e in run[kind]["errors"]][:5]} for kind in CHURN_KINDS}
        summary[side]["generate"]["model"] = mine[-1]["generate"]["model"]
        summary[side]["generate"]["probe_error"] = next(
            (run["generate"]["probe_error"] for run in mine if run["generate"]["probe_error"]), None)
    return summary


def _batch_over_threads(shared: Dict[str, Any], n: int) -> float:
    return shared[f"batch/N={n}"]["tokens_per_s"] / shared[f"threads/N={n}"]["tokens_per_s"]


def _environment() -> Dict[str, Any]:
    from mlx_threadsafe import versions

    return machine(describe=versions.detect().describe())


# ------------------------------------------------------------------ report


def _ratio_rows(results: Dict[str, Any]) -> List[str]:
    rows = []
    for model, g in results["generation"].items():
        pairs = sorted(p / u for u, p in zip(g["samples"]["unpatched"], g["samples"]["patched"]))
        low, high = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
        verdict = "met" if g["ratio"] >= 0.99 else ("not resolved: the spread spans 1.0" if high >= 1.0 else "missed")
        rows.append(f"| single-thread generation, {model} model | patched / unpatched tokens/s, median of "
                    f"{len(pairs)} pairs | {g['ratio']:.3f} (quartiles {low:.3f}–{high:.3f}) | ≥ 0.99 | {verdict} |")
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
    rows.append(f"| `install()` | time; mlx / mlx_lm / transformers / wrapt imported | {inst['install_ms']:.1f} ms; "
                f"{', '.join(inst['imported_heavy']) or 'none'} | < 50 ms, none | {'met' if ok else 'missed'} |")
    foreign = [m for m in inst["added_to_mlx_lm_app"] if m not in ("mlx_threadsafe", "wrapt", "packaging")
               and m not in getattr(sys, "stdlib_module_names", ())]
    rows.append(f"| `import mlx_threadsafe` | time; top-level modules it adds to an mlx-lm application | "
                f"{inst['import_ms']:.1f} ms; {', '.join(inst['added_to_mlx_lm_app'])} | itself, its dependencies "
                f"(wrapt, packaging) and the standard library only | "
                f"{'met' if not foreign else 'missed'} |")
    total = inst["import_ms"] + inst["install_ms"]
    per = f", median of {inst['samples']} processes" if "samples" in inst else ""
    rows.append(f"| `import mlx_threadsafe` + `install()`, mlx-lm installed, not imported | time{per} | "
                f"{total:.1f} ms | ≤ 30 ms | {'met' if total <= 30 else 'missed'} |")
    if "planning_ms" in inst:
        rows.append(f"| the planning install() puts off, paid at the first MLX import | planning / "
                    f"`import mlx_lm` | {inst['planning_ms'] / inst['mlx_lm_import_ms']:.2f} "
                    f"({inst['planning_ms']:.0f} of {inst['mlx_lm_import_ms']:.0f} ms) | context | |")
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
    lines = table(["K", "mode", "tokens/s", "vs serial", "request latency p50", "max"])
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


def _on(section: Dict[str, Any]) -> str:
    """The device a section ran on, by name, and its versions (a section may come from another machine)."""
    on = section.get("measured_on") or {}
    return f"{on.get('device_name', '?')}; {on.get('describe', '?')}; {on.get('cpus', '?')} CPUs"


def _new_section_rows(results: Dict[str, Any]) -> List[str]:
    """Rows of the ratio table for shared_model, thread_churn and handover (when measured)."""
    rows = []
    gpu = results["device"] == "gpu"

    def where(section: Dict[str, Any]) -> str:
        return f" ({section['measured_on']['device_name']})" if gpu and "measured_on" in section else ""

    shared = results.get("shared_model")
    if shared:
        n = max(shared["ns"])
        threads, batch = shared[f"threads/N={n}"], shared[f"batch/N={n}"]
        rows.append(f"| one {shared['model']} model, N = {n} requests{where(shared)} | one BatchGenerator / N threads "
                    f"(shim), tokens/s | {_batch_over_threads(shared, n):.2f} ({batch['tokens_per_s']:.0f} vs "
                    f"{threads['tokens_per_s']:.0f}; latency max {batch['latency_max_ms']:.0f} vs "
                    f"{threads['latency_max_ms']:.0f} ms) | context | |")
        keys = [f"threads/N={k}" for k in shared["ns"]]
        equal = sum(shared[key]["equal_to_serial"] and not shared[key]["errors"] for key in keys)
        rows.append(f"| one model shared by N threads, temperature 0{where(shared)} | threaded outputs equal to "
                    f"one-at-a-time, rows | {equal} of {len(keys)} | all | "
                    f"{'met' if equal == len(keys) else 'missed'} |")
    churn = results.get("thread_churn")
    if churn:
        for kind in _churn_kinds(churn):
            without, with_ = churn["without_shim"][kind], churn["with_shim"][kind]
            errors = without["error_count"] + with_["error_count"]
            timed = (f"; {with_['us_per_thread']:.0f} vs {without['us_per_thread']:.0f} µs a thread"
                     if "us_per_thread" in without else "")
            rows.append(f"| a short-lived thread that ran {_CHURN_WHAT[kind]}{where(churn)} | with / without the shim: "
                        f"memory kept once it ended{'; its time, start to gone' if timed else ''} | "
                        f"{with_['kb_per_thread']:.1f} vs {without['kb_per_thread']:.1f} "
                        f"KB{timed}{f'; {errors} threads failed' if errors else ''} | context | |")
    for model, hand in (results.get("handover") or {}).items():
        rows.append(f"| BatchGenerator moved to a Worker, {model} model{where(hand)} | µs per next(): driven from "
                    f"another thread / on its building thread, median of {hand['rounds']} pairs | "
                    f"{hand['ratio']:.3f} ({hand['worker']['us_per_next']:.0f} vs "
                    f"{hand['direct']['us_per_next']:.0f} µs) | context | |")
    return rows


_CHURN_WHAT = {"no_mlx": "nothing of MLX", "eval": "one small `mx.eval`",
               "generate": "`mlx_lm.generate` (4 tokens)"}


def _shared_model_table(shared: Dict[str, Any]) -> List[str]:
    lines = [f"### {_TITLES['shared_model']} ({shared['model']} model, "
             f"{shared['tokens']} tokens each)", "", f"Measured on {_on(shared)}. The shim installed for every mode; "
             "latency is from the burst's start (every request arrives at once) to the request's last token; "
             "outputs compared with one request at a time, temperature 0.", "",
             *table(["N", "mode", "tokens/s", "vs serial", "latency p50", "max", "outputs equal to serial"])]
    plain = shared.get("batch_without_shim")
    if plain:
        counts = {int(key[2:]): count for key, count in plain["equal_to_serial"].items()}
        with_shim = {n: shared[f"batch/N={n}"]["requests_equal_to_serial"] for n in counts if f"batch/N={n}" in shared}
        same = all(with_shim.get(n) == count for n, count in counts.items())
        differs = any(count < n for n, count in counts.items())
        lines[2:2] = [f"Without the shim (another process, one thread), one BatchGenerator answers "
                      f"{', '.join(f'{count} of {n}' for n, count in counts.items())} requests as one at a time "
                      f"does; with it (below) {', '.join(f'{count} of {n}' for n, count in with_shim.items())}"
                      + (": the batched arithmetic differs from one at a time, with or without the shim."
                         if same and differs else "."), ""]
    for n in shared["ns"]:
        serial = shared[f"serial/N={n}"]["tokens_per_s"]
        for mode in ("serial", "threads", "batch"):
            row = shared[f"{mode}/N={n}"]
            equal = "yes" if row["equal_to_serial"] else f"no ({row['requests_equal_to_serial']} of {n})"
            if row["errors"]:
                equal += f"; {len(row['errors'])} failed"
            name = {"serial": "one at a time", "threads": "N threads", "batch": "one BatchGenerator"}[mode]
            lines.append(f"| {n} | {name} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / serial:.2f}× | "
                         f"{row['latency_p50_ms']:.0f} ms | {row['latency_max_ms']:.0f} ms | {equal} |")
    return lines


def _thread_churn_table(churn: Dict[str, Any]) -> List[str]:
    runs = len(churn["without_shim"]["eval"]["samples_kb_per_thread"])
    lines = [f"### {_TITLES['thread_churn']} ({churn['model']} model)", "",
             f"Measured on {_on(churn)}. RSS ({churn['rss_source']}) after {churn['warm_up_threads']} warm-up "
             f"threads and after {churn['threads']} more, one at a time, each gone before the next; median of "
             f"{runs} process{'es' if runs > 1 else ''} per side, the sides interleaved. Time: start, join "
             "and the OS thread gone, per thread.", "",
             *table(["each thread runs", "without the shim, KB per thread", "with the shim",
                     "µs per thread, without / with", "failed threads (without / with)",
                     "model of the generate threads"])]
    for kind in _churn_kinds(churn):
        without, with_ = churn["without_shim"][kind], churn["with_shim"][kind]
        model = (f"{without.get('model', '')} / {with_.get('model', '')}" if kind == "generate" else "")
        timed = (f"{without['us_per_thread']:.0f} / {with_['us_per_thread']:.0f}" if "us_per_thread" in without
                 else "not measured")
        lines.append(f"| {_CHURN_WHAT[kind]} | {without['kb_per_thread']:.1f} | {with_['kb_per_thread']:.1f} | "
                     f"{timed} | {without['error_count']} / {with_['error_count']} | {model} |")
    return lines


def _handover_table(handover: Dict[str, Any]) -> List[str]:
    first = next(iter(handover.values()))
    lines = [f"### {_TITLES['handover']} ({first['sequences']} sequences, {first['tokens']} tokens)", "",
             f"Measured on {_on(first)}. Built on the main thread; driven there (direct), or from another thread, "
             "which moves it to a dedicated Worker: each next() hops there and back and its responses are evaluated "
             "on the worker. One process, the two alternated; the first next() (prompt, and the move) apart.", "",
             *table(["model", "direct, µs per next()", "from another thread", "ratio", "added µs",
                     "first next(), direct / moved", "outputs equal"])]
    for model, hand in handover.items():
        direct, worker = hand["direct"], hand["worker"]
        lines.append(f"| {model} | {direct['us_per_next']:.0f} | {worker['us_per_next']:.0f} | {hand['ratio']:.3f} | "
                     f"{worker['us_per_next'] - direct['us_per_next']:.0f} | {direct['first_next_us']:.0f} / "
                     f"{worker['first_next_us']:.0f} µs | {'yes' if hand['outputs_equal'] else 'no'} |")
    return lines


_TITLES = {"shared_model": "One model, N requests at once: N threads or one BatchGenerator",
           "thread_churn": "Short-lived threads: memory kept and time",
           "handover": "A BatchGenerator moved to a Worker",
           "streams": "The stream rule: per with mx.stream(...) and per op"}


def _streams_table(section: Dict[str, Any]) -> List[str]:
    lines = [f"### {_TITLES['streams']}", "",
             f"Measured on {_on(section)}. µs per call, {section['calls_per_sample']} calls a sample, "
             f"{section['samples_per_side']} samples a side, the rule off and on alternated in one process (ABBA).",
             "", *table(["call", "rule off, µs", "rule on, µs", "ratio"])]
    for case, row in section["cases"].items():
        off = f"{row['off_us']:.2f}" if row["off_us"] is not None else row.get("note", "-")
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        lines.append(f"| {case} | {off} | {row['on_us']:.2f} | {ratio} |")
    return lines


def _not_measured(name: str, device: str) -> List[str]:
    flag = " --device gpu" if device == "gpu" else ""
    return [f"### {_TITLES[name]}", "", f"Not measured yet (`python -m benchmarks{flag} --only {name}`).", ""]


def _device_text(device: str, results: Dict[str, Any], plot: Optional[str]) -> str:
    """One device's part of REPORT.md; `plot` names the concurrency plot written beside it (None: none)."""
    env = results["environment"]
    lines = [f"## {device.upper()}: {env['describe']}",
             f"Python {env['python']} on {env['machine']}, {env['cpus']} CPUs. Raw numbers: `results/{device}.json`.",
             *_measured_on(results), "",
             "| what | ratio | measured | target | |", "|---|---|---|---|---|", *_ratio_rows(results),
             *_new_section_rows(results), "",
             f"### Concurrency ({results['concurrency_model']} model)", "", *_concurrency_table(results), ""]
    if plot:
        lines += [f"![concurrency on {device}]({plot})", ""]
    for name, section_table in (("shared_model", _shared_model_table), ("thread_churn", _thread_churn_table),
                                ("handover", _handover_table), ("streams", _streams_table)):
        lines += [*section_table(results[name]), ""] if results.get(name) else _not_measured(name, device)
    return "\n".join(lines)


def _measured_on(results: Dict[str, Any]) -> List[str]:
    """Which machine measured which sections (a section re-measured alone names its own)."""
    by_machine: Dict[str, List[str]] = {}
    for section, where in results.get("measured_on", {}).items():
        by_machine.setdefault(where, []).append(section)
    return ["", *(f"- Measured on {where}: {', '.join(sections)}." for where, sections in by_machine.items())]


def report() -> str:
    sections = []
    for device in ("cpu", "gpu"):
        path = os.path.join(RESULTS, f"{device}.json")
        if not os.path.exists(path):
            sections.append(f"## {device.upper()}\n\nNot measured yet (`python -m benchmarks --device {device}`).\n")
            continue
        results = read_json(path)
        plot = f"concurrency-{device}.png"
        _plot(results, os.path.join(HERE, plot))
        sections.append(_device_text(device, results, plot))
    text = "\n".join(["# Benchmarks", "",
                      "Generated by `python -m benchmarks --report` from the committed results; each ratio is "
                      "measured in one run (patched and unpatched processes interleaved).", "",
                      open(os.path.join(HERE, "NOTES.md")).read().strip(), "", *sections])
    write_text(os.path.join(HERE, "REPORT.md"), text)
    return text


def check_smoke(results: Dict[str, Any], render: bool = True) -> None:
    """What the smoke pass holds the results to: the report renders, and the sections measured what they say."""
    if render:
        _device_text(results["device"], results, plot=None)  # every key the report reads is there
    problems = []
    shared = results.get("shared_model")
    if shared:
        for n in shared["ns"]:
            for mode in ("serial", "threads", "batch"):
                row = shared[f"{mode}/N={n}"]
                if row["errors"]:
                    problems.append(f"shared_model {mode}/N={n}: {row['errors'][0]}")
            if not shared[f"threads/N={n}"]["equal_to_serial"]:
                problems.append(f"shared_model: {n} threads gave other tokens than one request at a time")
    churn = results.get("thread_churn")
    if churn:
        for side in ("without_shim", "with_shim"):
            for kind in _churn_kinds(churn):
                if churn[side][kind]["error_count"]:
                    problems.append(f"thread_churn {side} {kind}: {churn[side][kind]['errors'][0]}")
    for model, hand in (results.get("handover") or {}).items():
        if not hand["worker"]["on_worker"] or hand["direct"]["on_worker"]:
            problems.append(f"handover {model}: the generator driven from another thread did not move to a Worker")
        if not hand["outputs_equal"]:
            problems.append(f"handover {model}: the generator moved to a Worker gave other tokens")
    if problems:
        raise SystemExit("benchmarks smoke check failed:\n  " + "\n  ".join(problems))


def main(argv: Optional[List[str]] = None) -> int:
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
    if args.smoke:
        check_smoke(results, render=not args.only)
    out = args.out or (os.path.join(RESULTS, f"{args.device}.json") if not args.smoke else None)
    if out and args.only and os.path.exists(out):
        # The machine described is the one of the full run; a section re-measured keeps it.
        merged = read_json(out)
        measured_on = dict(merged.get("measured_on", {}), **results.pop("measured_on"))
        results = dict(merged, **{k: v for k, v in results.items() if k != "environment"},
                       measured_on=measured_on)
    if out:
        write_json(out, results)
        print(f"wrote {out}")
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
