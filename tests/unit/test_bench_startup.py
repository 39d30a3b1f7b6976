"""``vnic bench startup`` with two runs: the JSON's shape and its numbers (no speed
assertion: how fast a start is depends on the machine and its load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIMED = [
    "python -c pass",
    'python -c "import typer, rich"',
    'python -c "import typer.rich_utils"',
    'python -c "import sqlalchemy.orm"',
    "vnic --help",
    "vnic profile list",
]


def test_bench_startup_writes_medians_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    env = {**os.environ, "VNIC_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("VNIC_DATABASE_URL", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vnic.cli.app",
            "bench",
            "startup",
            "--runs",
            "2",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "x python -c pass" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["benchmark"] == "startup"
    assert result["runs"] == 2
    assert result["baseline"] == "python -c pass"
    rows = {r["name"]: r for r in result["commands"]}
    assert list(rows)[: len(TIMED)] == TIMED
    tcset = [s["case"] for s in result["skipped"]] + [n for n in rows if n not in TIMED]
    assert tcset == ["tcset --help"]  # timed when installed, else skipped with a reason
    for name, row in rows.items():
        assert "error" not in row, (name, row["error"])
        assert len(row["seconds"]) == 2
        assert all(isinstance(t, float) and t > 0 for t in row["seconds"])
        assert isinstance(row["median_s"], float) and row["median_s"] > 0
        assert isinstance(row["ratio"], (int, float)) and row["ratio"] > 0
        assert row["argv"] and all(isinstance(a, str) for a in row["argv"])
    assert rows["python -c pass"]["ratio"] == 1.0
    # The database the timed profile list used was fresh and is gone, not VNIC_HOME's.
    assert not (tmp_path / "home").exists()
