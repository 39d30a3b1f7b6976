"""The CLI's error exit for what the system refuses: ``error:`` naming the file, exit 2,
no traceback (a full disk has its own test in tests/netns/test_full_disk.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", *args],
        env={**os.environ, "VNIC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_file_is_an_error_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "agent.key"
    run = cli(tmp_path, "serve", "--agent", "http://127.0.0.1:9", "--agent-key-file", str(missing))
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: no such file or directory: "), run.stderr
    assert str(missing) in run.stderr and "Traceback" not in run.stderr


def test_bad_admission_limits_name_the_option(tmp_path: Path) -> None:
    run = cli(tmp_path, "serve", "--max-writes", "0")
    assert run.returncode == 2, run.stderr
    assert "--max-writes: got 0; expected a whole number, at least 1" in run.stderr
