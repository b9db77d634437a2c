"""``python -m benchmarks [--quick] [--only NAME[,NAME]] [--out PATH]``.

Runs the scenarios in order, prints one table per scenario and the targets,
and writes everything as JSON (default ``bench-results/latest.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import admission, profile, render_cost, scale, throughput
from .common import Scenario, machine_info

DEFAULT_OUT = Path("bench-results/latest.json")

SCENARIOS: dict[str, Callable[[bool], Coroutine[Any, Any, Scenario]]] = {
    "render": render_cost.run,
    "throughput": throughput.run,
    "admission": admission.run,
    "scale": scale.run,
    "profile": profile.run,
}


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the scenarios, print and write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=max(160, Console().width))
    result: dict[str, Any] = {
        "machine": machine_info(),
        "quick": args.quick,
        "scenarios": {},
    }
    failed = False
    for name in names:
        started = time.monotonic()
        console.print(f"[bold]running {name}[/bold] ...")
        try:
            scenario = asyncio.run(SCENARIOS[name](args.quick))
        except Exception as exc:  # one broken scenario must not lose the others
            logging.exception("scenario %s failed", name)
            result["scenarios"][name] = {"error": repr(exc)}
            failed = True
            continue
        data = {
            "title": scenario.title,
            "seconds": round(time.monotonic() - started, 1),
            "rows": scenario.rows,
            "targets": scenario.targets,
            "notes": scenario.notes,
            **scenario.extra,
        }
        result["scenarios"][name] = data
        print_scenario(console, scenario)
        _write(args.out, result)
    result["machine"]["load_average_at_end"] = list(_loadavg())
    _write(args.out, result)
    console.print(f"results written to {args.out}")
    return 1 if failed else 0


def print_scenario(console: Console, scenario: Scenario) -> None:
    """One table of rows, then the targets."""
    columns: list[str] = []
    for row in scenario.rows:
        columns += [
            k for k, v in row.items() if k not in columns and not isinstance(v, dict)
        ]
    table = Table(title=scenario.title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in scenario.rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    console.print(table)
    for t in scenario.targets:
        verdict = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        console.print(f"  target {t['target']}: {t['value']} ({t['limit']}) {verdict}")
    for note in scenario.notes:
        console.print(f"  note: {note}")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return str(value)


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, default=str) + "\n")


def _clean(value: Any) -> Any:
    """NaN (no samples) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


if __name__ == "__main__":
    sys.exit(main())
