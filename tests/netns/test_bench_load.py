"""`vnic bench load` in a small form, once, through the CLI: the JSON has every part,
every answer is a 2xx or a 429 (no resets, no 5xx), the health probe ran, and no
namespace of its sessions is left. Its speeds are the benchmark's to report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.conftest import leftovers

pytestmark = pytest.mark.root


def test_bench_load_reports_every_kind_and_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    argv = ["bench", "load", "--readers", "6", "--writers", "2", "--seconds", "2"]
    run = subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", *argv, "--json", str(out)],
        env={**os.environ, "VNIC_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert r["benchmark"] == "load" and r["readers"] == 6 and r["writers"] == 2
    for kind in ("read", "write"):
        statuses = set(r[kind]["by_status"])
        assert statuses <= {"200", "429"}, r[kind]["by_status"]
        assert r[kind]["by_status"].get("200", 0) > 0
        assert r[kind]["ok"]["n"] == r[kind]["by_status"]["200"]
    assert r["errors_other_than_429"] == {}
    assert r["health_probe"]["n"] > 0 and r["health_probe"]["failed"] == 0
    assert r["rss_kib"]["before"] > 0 and r["rss_kib"]["after"] > 0
    assert "errors other than 429: 0" in run.stdout
    assert len(r["sessions"]) == 2
    for session in r["sessions"]:
        assert leftovers(session) == [], session
