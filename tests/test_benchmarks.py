"""Smoke test of the benchmark command: it runs and writes the JSON it promises.

Only the shape is checked, never timing: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]


def test_quick_admission_writes_json(tmp_path: Path) -> None:
    """``python -m benchmarks --quick --only admission`` prints and writes JSON."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--only", "admission"]
    done = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Admission" in done.stdout
    data = json.loads(out.read_text())
    assert {"machine", "quick", "scenarios"} <= set(data)
    assert data["quick"] is True
    assert {"nproc", "cpu_model", "chromium", "date"} <= set(data["machine"])
    scenario = data["scenarios"]["admission"]
    assert [row["case"] for row in scenario["rows"]] == ["below limit", "at limit (32)"]
    for row in scenario["rows"]:
        assert {"requests", "ok_200", "full_429", "errors", "p50_ms", "p99_ms"} <= set(
            row
        )
        assert row["errors"] == 0
    below, limit = scenario["rows"]
    assert below["ok_200"] == below["requests"]
    assert limit["ok_200"] == 32
    assert limit["ok_200"] + limit["full_429"] == limit["requests"]
    assert {"target", "limit", "value", "met"} <= set(scenario["targets"][0])
