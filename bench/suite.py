"""`make bench`: run every benchmark, print one table of their ratios, record it in BENCHMARKS.md.

    .venv/bin/python bench/suite.py [--quick] [--no-write] [--only NAME ...] [--json PATH]

Each bench runs in its own process, one after another (so none shares a CPU or an allocator
with another), and writes its result with `--json PATH`:

    {"bench": "<name>", "machine": {...},
     "rows": [{"metric": "<what>", "value": <float>, "goal": "<= 1.15" | ">= 0.8" | null,
               "unit": "ratio" | "bytes/token" | "tokens/s" | "MFU"}]}

Every ratio in a row was measured side by side, interleaved, within that bench's own run;
how is in the bench's docstring and its section of BENCHMARKS.md. The suite prints the rows
as one table (value, goal, met?) and replaces the "## Summary (make bench)" section at the
top of BENCHMARKS.md with it and a description of the machine (re-running replaces it
again); the per-bench sections below it are left as they are (`bench/prepare.py` is run
with `--no-write` here). `gpu` runs by default only where CUDA is available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = BENCH_DIR.parent / "BENCHMARKS.md"
SUMMARY_HEADING = "## Summary (make bench)"
UNITS = ("ratio", "bytes/token", "tokens/s", "MFU", "MB")
GOAL = re.compile(r"^(<=|>=) (\d+(?:\.\d+)?)$")

# name -> its arguments besides --json (and --quick, which every bench takes). cache runs on
# one torch thread, as its BENCHMARKS section explains; prepare leaves its section alone.
BENCHES: dict[str, list[str]] = {"prepare": ["--no-write"], "cache": ["--threads", "1"], "train": [], "gpu": []}


def check_result(result: object, where: str) -> None:
    """Refuse a result that does not follow the format in the module docstring (one line naming what is wrong)."""
    if not isinstance(result, dict) or set(result) != {"bench", "machine", "rows"}:
        raise ValueError(f"{where}: expected an object with exactly bench, machine and rows")
    if not isinstance(result["bench"], str) or not isinstance(result["machine"], dict) or not isinstance(result["rows"], list):
        raise ValueError(f"{where}: bench must be a string, machine an object, rows a list")
    if not result["rows"]:
        raise ValueError(f"{where}: no rows")
    for i, row in enumerate(result["rows"]):
        at = f"{where} row {i}"
        if not isinstance(row, dict) or set(row) != {"metric", "value", "goal", "unit"}:
            raise ValueError(f"{at}: expected exactly metric, value, goal and unit")
        if not isinstance(row["metric"], str) or not row["metric"]:
            raise ValueError(f"{at}: metric must be a non-empty string")
        value = row["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{at} ({row['metric']}): value {value!r} is not a finite number")
        if row["goal"] is not None and not (isinstance(row["goal"], str) and GOAL.match(row["goal"])):
            raise ValueError(f"{at} ({row['metric']}): goal {row['goal']!r} is not null, '<= X' or '>= X'")
        if row["unit"] not in UNITS:
            raise ValueError(f"{at} ({row['metric']}): unit {row['unit']!r} is not one of {', '.join(UNITS)}")


def goal_met(value: float, goal: str | None) -> bool | None:
    """Whether `value` meets `goal` ("<= X" or ">= X"); None without a goal."""
    if goal is None:
        return None
    found = GOAL.match(goal)
    assert found is not None, goal
    threshold = float(found.group(2))
    return value <= threshold if found.group(1) == "<=" else value >= threshold


def format_value(value: float, unit: str) -> str:
    if unit == "tokens/s":
        return f"{value:,.0f} tokens/s"
    if unit == "MFU":
        return f"{100 * value:.1f}% MFU"
    if unit == "bytes/token":
        return f"{value:.2f} B/token"
    return f"{value:.2f}"


def table_cells(results: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """(bench, metric, value, goal, met?) for every row of every result, in order."""
    cells = []
    for result in results:
        for row in result["rows"]:
            met = goal_met(row["value"], row["goal"])
            met_text = "" if met is None else ("yes" if met else "NO")
            cells.append((result["bench"], row["metric"], format_value(row["value"], row["unit"]), row["goal"] or "", met_text))
    return cells


def markdown_table(results: list[dict]) -> str:
    lines = ["| bench | metric | value | goal | met? |", "|---|---|---:|---|---|"]
    lines += [f"| {' | '.join(cells)} |" for cells in table_cells(results)]
    return "\n".join(lines)


def rich_table(results: list[dict]) -> Table:
    table = Table(title="kdpipe benchmarks")
    for name, justify in (("bench", "left"), ("metric", "left"), ("value", "right"), ("goal", "left"), ("met?", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for cells in table_cells(results):
        style = "red" if cells[4] == "NO" else None
        table.add_row(*cells, style=style)
    return table


def machine_description() -> str:
    """CPU model, cores, OS, Python, torch and GPU, for the summary section."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        model = found.group(1).strip() if found else model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{model}, {usable} usable cores ({os.cpu_count()} online), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}{gpu}"
    )


def replace_summary(document: str, section: str) -> str:
    """`document` with its summary section replaced by `section`, or `section` inserted before the first "## " section."""
    section = section.strip() + "\n\n"
    existing = re.compile(rf"^{re.escape(SUMMARY_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if existing.search(document):
        return existing.sub(lambda _: section, document).rstrip() + "\n"
    first = re.search(r"^## ", document, re.M)
    if first is None:
        return document.rstrip() + "\n\n" + section.rstrip() + "\n"
    return document[: first.start()] + section + document[first.start() :]


def summary_section(results: list[dict], command: str, started: str, load: tuple[float, float, float]) -> str:
    return f"""{SUMMARY_HEADING}

`{command}` on {started}: {machine_description()}; load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.
Each bench ran in its own process, one after another. Every ratio compares two measurements taken side by side,
interleaved, in the same run (how, and the full figures: the bench's section below); goals come from DESIGN.md.

{markdown_table(results)}
"""


def run_bench(name: str, quick: bool, out: Path) -> dict | None:
    """Run bench/NAME.py with its arguments and --json OUT; its result, or None if it failed."""
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--json", str(out), *BENCHES[name], *(["--quick"] if quick else [])]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    status = subprocess.run(command, cwd=BENCH_DIR.parent).returncode
    print(f"=== {name}: exit status {status} after {time.perf_counter() - started:.0f} s", flush=True)
    if status != 0:
        return None
    if not out.is_file():
        print(f"=== {name}: wrote no {out.name} (does bench/{name}.py take --json?)", flush=True)
        return None
    result = json.loads(out.read_text())
    try:
        check_result(result, f"bench/{name}.py --json")
    except ValueError as err:
        print(f"=== {name}: {err}", flush=True)
        return None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a few minutes)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME", help=f"run only these of {', '.join(BENCHES)}")
    parser.add_argument("--json", type=Path, help="also write every row (with its bench) here")
    args = parser.parse_args()
    names = args.only or [name for name in BENCHES if name != "gpu" or torch.cuda.is_available()]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()

    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-suite-") as tmp:
        for name in names:
            result = run_bench(name, args.quick, Path(tmp) / f"{name}.json")
            if result is None:
                failed.append(name)
            else:
                results.append(result)
    console = Console()
    if results and console.is_terminal:
        console.print(rich_table(results))
    elif results:  # in a log: markdown, as written to BENCHMARKS.md
        print(markdown_table(results))
    if args.json:
        rows = [{"bench": r["bench"], **row} for r in results for row in r["rows"]]
        combined = {"bench": "suite", "machine": {"description": machine_description()}, "rows": rows}
        args.json.write_text(json.dumps(combined, indent=2) + "\n")
    if failed:
        sys.exit(f"bench/suite.py: {', '.join(failed)} failed (output above); BENCHMARKS.md left as it was")
    if not args.no_write:
        command = " ".join(["bench/suite.py", *sys.argv[1:]])
        BENCHMARKS.write_text(replace_summary(BENCHMARKS.read_text(), summary_section(results, command, started, load)))
        print(f"summary written to {BENCHMARKS}")


if __name__ == "__main__":
    main()
