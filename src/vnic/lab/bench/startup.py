"""How long the ``vnic`` command takes to start, against the interpreter's own start.

``vnic bench startup`` runs each command :data:`RUNS` times, interleaved (one of each,
then again), so that a busy moment of the machine falls on all of them alike, after one
untimed run of each (it compiles bytecode, fills the page cache and creates the
database). Reported per command: every wall time in seconds, their median and the
ratio of the median to that of ``python -c pass`` (the same interpreter). No root needed.

The commands: ``python -c pass``; ``python -c "import typer, rich"`` (the floor of any
Typer CLI with rich output); ``python -c "import typer.rich_utils"`` (the floor of one
with Typer's rich help, which ``vnic`` does not use for that reason); ``python -c
"import sqlalchemy.orm"`` (the floor of any command that reads the database through
SQLAlchemy's ORM, as ``vnic profile list`` does); ``vnic --help``; ``vnic profile list``
on a fresh SQLite database in a temporary ``VNIC_HOME``; ``tcset --help`` (tcconfig,
another traffic shaping CLI) when it is installed. ``vnic`` runs as its console script does
(``from vnic.cli.app import main; main()``) with this interpreter, so the ``vnic`` found
first on ``PATH`` does not matter.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Timed runs of each command (after one untimed run).
RUNS = 15
#: A command taking longer than this (seconds) is stopped and reported as failed.
TIMEOUT = 120.0
BASELINE = "python -c pass"
#: What the ``vnic`` console script runs (``[project.scripts]`` in pyproject.toml).
VNIC = "import sys; from vnic.cli.app import main; sys.exit(main())"


@dataclass(frozen=True)
class Command:
    name: str
    argv: tuple[str, ...]


def commands() -> tuple[list[Command], list[dict[str, str]]]:
    """The commands to time, and those skipped here with the reason."""
    py = sys.executable
    found = [
        Command(BASELINE, (py, "-c", "pass")),
        Command('python -c "import typer, rich"', (py, "-c", "import typer, rich")),
        Command('python -c "import typer.rich_utils"', (py, "-c", "import typer.rich_utils")),
        Command('python -c "import sqlalchemy.orm"', (py, "-c", "import sqlalchemy.orm")),
        Command("vnic --help", (py, "-c", VNIC, "--help")),
        Command("vnic profile list", (py, "-c", VNIC, "profile", "list")),
    ]
    skipped = []
    tcset = shutil.which("tcset")
    if tcset is not None:
        found.append(Command("tcset --help", (tcset, "--help")))
    else:
        skipped.append({"case": "tcset --help", "reason": "tcset (tcconfig) is not installed"})
    return found, skipped


def _env(home: Path) -> dict[str, str]:
    """This environment, with vnic's own files in ``home`` and no manager to call."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VNIC_DATABASE_URL", "VNIC_SERVER", "VNIC_TOKEN")
    }
    env["VNIC_HOME"] = str(home)
    return env


def _once(command: Command, env: dict[str, str]) -> tuple[float, str | None]:
    """Wall seconds of one run, and why it failed (None if it exited 0)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return time.perf_counter() - start, str(exc)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return seconds, f"exit {proc.returncode}: " + " / ".join(tail)
    return seconds, None


def run(runs: int = RUNS) -> dict[str, Any]:
    """Time every command ``runs`` times, interleaved; the result as plain data.

    ``commands`` lists, per command, ``name``, ``argv``, ``seconds`` (each timed run),
    ``median_s`` and ``ratio`` (its median over ``python -c pass``'s); a command that
    failed has ``error`` instead of times (``median_s`` and ``ratio`` None).
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    found, skipped = commands()
    with tempfile.TemporaryDirectory(prefix="vnic-startup-") as tmp:
        env = _env(Path(tmp) / "home")
        errors: dict[str, str] = {}
        for c in found:
            _, error = _once(c, env)
            if error is not None:
                errors[c.name] = error
        times: dict[str, list[float]] = {c.name: [] for c in found}
        for _ in range(runs):
            for c in found:
                if c.name in errors:
                    continue
                seconds, error = _once(c, env)
                if error is not None:
                    errors[c.name] = error
                else:
                    times[c.name].append(seconds)
    medians = {
        name: statistics.median(ts) if ts and name not in errors else None
        for name, ts in times.items()
    }
    base = medians[BASELINE]
    rows: list[dict[str, Any]] = []
    for c in found:
        median = medians[c.name]
        row: dict[str, Any] = {
            "name": c.name,
            "argv": list(c.argv),
            "seconds": [round(t, 5) for t in times[c.name]] if c.name not in errors else [],
            "median_s": round(median, 5) if median is not None else None,
            "ratio": round(median / base, 2) if median is not None and base else None,
        }
        if c.name in errors:
            row["error"] = errors[c.name]
        rows.append(row)
    return {
        "benchmark": "startup",
        "runs": runs,
        "python": sys.executable,
        "baseline": BASELINE,
        "commands": rows,
        "skipped": skipped,
    }
