"""The committed evidence (results/evidence.json), its check, and the RESULTS.md table."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, Tuple

from harness.evidence import load_records, save_records, write_text
from harness.markdown import cell, write_block
from harness.markdown import table as markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
EVIDENCE = os.path.join(HERE, "results", "evidence.json")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
README = os.path.join(os.path.dirname(HERE), "README.md")
SHIM_SIDES = ("run", "env", "batch")
ALWAYS_SHOWN = ("run", "env")  # a shimmed side the table lists as "not run" when missing; `batch` only when run


ABOUT = ("python -m conformance run: third-party servers and upstream test suites, without and with "
         "mlx_threadsafe; see conformance/README.md")


def load(path: str = EVIDENCE) -> Dict[str, Dict[str, Any]]:
    return load_records(path)


def save(records: Dict[str, Dict[str, Any]], path: str = EVIDENCE) -> None:
    save_records(path, records, about=ABOUT)


def check(records: Dict[str, Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    """(problems, notes): a server check that fails with the shim, or an upstream test that
    passes without the shim and fails with it, is a problem; what cannot run is a note."""
    problems: List[str] = []
    notes: List[str] = []
    for key, record in sorted(records.items()):
        if record.get("status") == "cannot-run":
            notes.append(f"{key}: cannot run: {record.get('reason', '')[:200]}")
            continue
        if record["kind"] == "server" and record["side"] in SHIM_SIDES and not record.get("ok"):
            from .servers import summary

            problems.append(f"{key}: fails with the shim: {summary(record)}")
        elif record["kind"] == "server" and record["side"] in SHIM_SIDES and record.get("shim_only_lines") is None:
            notes.append(f"{key}: output not compared with the side without the shim "
                         f"({record.get('output_compared_with') or 'recorded before the comparison existed'})")
        if record["kind"] == "suite":
            for test in record.get("regressions", []):
                problems.append(f"{key}: {test['id']} passes without the shim and fails with it: "
                                f"{test.get('message', '')[:200]}")
    return problems, notes


# ------------------------------------------------------------------ the table

def _server_rows(records: Dict[str, Dict[str, Any]]) -> List[str]:
    from .servers import summary

    groups: Dict[Tuple[str, str, str, str], Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for record in records.values():
        if record["kind"] == "server":
            groups[(record["target"], record["version"], record["mode"], record["model"])][record["side"]] = record
    rows = []
    for (target, version, mode, model), sides in sorted(groups.items()):
        def side_cell(side: str, sides: Dict[str, Dict[str, Any]] = sides) -> str:
            record = sides.get(side)
            if record is None:
                return "not run"
            if record.get("status") == "cannot-run":
                return f"cannot run: {record.get('reason', '')[:120]}"
            mark = "**pass**" if record.get("ok") else "**FAIL**"
            return f"{mark}: {summary(record)}"
        without = sides.get("none")
        if without is None:
            fails_without = "not run"
        elif without.get("status") == "cannot-run":
            fails_without = f"cannot run: {without.get('reason', '')[:120]}"
        elif without.get("ok"):
            fails_without = f"nothing ({summary(without)})"
        else:
            fails_without = summary(without)
        shim = "<br>".join(f"`{side}`: {side_cell(side)}" for side in SHIM_SIDES
                           if side in ALWAYS_SHOWN or side in sides)
        rows.append(f"| {target} | {version} | {mode}, {model} | {cell(fails_without)} | {cell(shim)} |")
    return rows


def _suite_rows(records: Dict[str, Dict[str, Any]]) -> List[str]:
    rows = []
    for _key, record in sorted(records.items()):
        if record["kind"] != "suite":
            continue
        if record.get("status") == "cannot-run":
            rows.append(f"| {record['target']} tests | {record['version']} | {record.get('selection', 'all')} | "
                        f"cannot run: {record.get('reason', '')[:200]} | - |")
            continue
        none, env = record["sides"]["none"], record["sides"]["env"]
        fixed = record.get("fixed", [])
        fails_without = (f"{none['failed']} failed, {none['passed']} passed, {none['skipped']} skipped"
                         + (f", {len(record['not_runnable'])} not runnable offline (both sides)"
                            if record.get("not_runnable") else ""))
        if fixed:
            fails_without += f"; fixed by the shim: {', '.join(t['id'] for t in fixed[:5])}"
        regressions = record.get("regressions", [])
        mark = "**pass**" if not regressions else f"**FAIL**: {len(regressions)} regressions"
        with_shim = (f"{mark}: {env['failed']} failed, {env['passed']} passed, {env['skipped']} skipped"
                     + (f" ({', '.join(t['id'] for t in regressions[:3])})" if regressions else ""))
        rows.append(f"| {record['target']} tests | {record['version']} | {record.get('selection', 'all')} | "
                    f"{fails_without} | {with_shim} |")
    return rows


def _rate(record: Any) -> Any:
    probe = (record or {}).get("throughput") or {}
    return probe.get("tokens_per_s") if (record or {}).get("status") != "cannot-run" else None


def throughput_rows(records: Dict[str, Dict[str, Any]]) -> List[str]:
    """One row per server, mode and model with a throughput probe: tokens/s of each side, batch / env."""
    groups: Dict[Tuple[str, str, str, str], Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for record in records.values():
        if record["kind"] == "server" and record.get("throughput"):
            groups[(record["target"], record["version"], record["mode"], record["model"])][record["side"]] = record
    rows = []
    for (target, version, mode, model), sides in sorted(groups.items()):
        def figure(side: str, sides: Dict[str, Dict[str, Any]] = sides) -> str:
            record = sides.get(side)
            if record is None:
                return "not run"
            rate = _rate(record)
            text = f"{rate:g}" if rate is not None else "no rate"
            if not record.get("ok"):
                text += " (the side fails, see above)"
            return text

        def ratio(top: str, bottom: str, sides: Dict[str, Dict[str, Any]] = sides) -> str:
            a, b = _rate(sides.get(top)), _rate(sides.get(bottom))
            return f"{a / b:.2f}x" if a and b else "-"
        serial = [(r.get("throughput") or {}).get("serial_tokens_per_s") for r in sides.values()]
        serial = [value for value in serial if value]
        rows.append(f"| {target} | {version} | {mode}, {model} | "
                    + " | ".join(cell(figure(side)) for side in ("none", "env", "batch"))
                    + f" | {ratio('batch', 'env')} | {ratio('batch', 'none')} | "
                    + (f"{min(serial):g}" + (f"-{max(serial):g}" if max(serial) != min(serial) else "")
                       if serial else "-") + " |")
    return rows


def table(records: Dict[str, Dict[str, Any]]) -> str:
    problems, notes = check(records)
    dates = sorted({r.get("when", "") for r in records.values() if r.get("when")})
    lines = [
        "# Verified with",
        "",
        "Generated by `python -m conformance table` from `results/evidence.json` "
        f"(runs of {', '.join(dates) or 'nothing yet'}); do not edit by hand.",
        "",
        "Servers: 9 concurrent chat completions (streaming and not, temperature 0) compared with the "
        "same server instance answering the same prompts one at a time, then one conversation sent twice "
        "(cached = prompt tokens the server reports reusing on the second send). With the shim means "
        "`mlx-threadsafe run -- CMD` (`run`) and `MLX_THREADSAFE=1 CMD` (`env`). Upstream suites: the "
        "release's own tests, offline, without and with `MLX_THREADSAFE=1`. `batch` (where run): "
        "`MLX_THREADSAFE=1 MLX_THREADSAFE_BATCH=1 CMD`, the opt-in batch mode.",
        "",
        *_results(records),
        "",
        f"`python -m conformance check`: {'passes' if not problems else f'{len(problems)} problems'}.",
    ]
    speeds = throughput_rows(records)
    if speeds:
        from .servers import THROUGHPUT_BURSTS, THROUGHPUT_REQUESTS, THROUGHPUT_TOKENS

        lines += ["", "## Throughput", "",
                  f"Where a server has the probe: {THROUGHPUT_REQUESTS} non-streaming chat completions at once, "
                  f"{THROUGHPUT_TOKENS} tokens each (temperature 0), one warm-up burst, then {THROUGHPUT_BURSTS} "
                  "bursts; completion tokens/s of a burst (the tokens its answers' usage reports over the time "
                  "from the first request sent to the last answer), the median of the bursts. Each answer must "
                  "equal the same prompt's answer sent alone. Recorded, not judged: the machine is shared "
                  "and loaded, so single figures swing; the ratio is of the two medians. `none` = without "
                  "the shim, `env` = `MLX_THREADSAFE=1`, `batch` = `MLX_THREADSAFE=1 MLX_THREADSAFE_BATCH=1`; "
                  f"the last column is the same {THROUGHPUT_REQUESTS} prompts sent one at a time, over the sides.",
                  "",
                  *markdown_table(["server", "version", "mode, model", "`none` tok/s", "`env` tok/s",
                                   "`batch` tok/s", "batch / env", "batch / none", "one at a time, tok/s"],
                                  speeds)]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    if notes:
        lines += ["", "## Not run, with the reason", ""] + [f"- {n}" for n in notes]
    suites = [r for r in records.values() if r["kind"] == "suite" and r.get("status") != "cannot-run"]
    if any(r.get("not_runnable") for r in suites):
        lines += ["", "## Upstream tests not runnable offline (the same on both sides)", ""]
        for record in suites:
            if record.get("not_runnable"):
                lines.append(f"- {record['target']} {record['version']}: "
                             + ", ".join(record["not_runnable"][:40])
                             + (f", and {len(record['not_runnable']) - 40} more"
                                if len(record["not_runnable"]) > 40 else ""))
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- verified-with:start -->", "<!-- verified-with:end -->")


def readme_table(records: Dict[str, Dict[str, Any]]) -> str:
    """The README's "Verified with" table: the rows of RESULTS.md, without the long lists."""
    return "\n".join(_results(records))


def _results(records: Dict[str, Dict[str, Any]]) -> List[str]:
    """The table of every server and suite, the same in RESULTS.md and the README."""
    return markdown_table(["server / suite", "version", "mode, model / selection", "without the shim",
                           "with the shim"], _server_rows(records) + _suite_rows(records))


def write_table(records: Dict[str, Dict[str, Any]], path: str = RESULTS_MD) -> None:
    """RESULTS.md, and the README's "Verified with" block."""
    write_text(path, table(records))
    write_block(README, README_MARKERS, readme_table(records))
