"""`vnic bench nics` in its quick form, once: every row present with its target judged,
each vNIC's measured rate that of its own profile (not its neighbour's), the tables
render, and nothing of the benchmark's sessions is left. How close to the targets a
run comes is the benchmark's to report, not this test's."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tests.netns.conftest import leftovers
from vnic.cli import render_bench
from vnic.lab.bench import nics as bench_nics

pytestmark = pytest.mark.root


def test_quick_run_reports_every_vnic_against_its_own_profile() -> None:
    r = bench_nics.run(quick=True)
    rows = r["fidelity"]["rows"]
    kinds = [row["kind"] for row in rows]
    assert kinds.count("rate") == 4 and kinds.count("delay") == 2, kinds
    assert kinds.count("rate-with-delay") == 2, kinds
    for row in rows:
        if row["kind"] == "rate":
            # 20 and 50 Mbit/s: each vNIC near its own rate, far from the other's.
            assert 0.85 <= row["ratio"] <= 1.1, row
            assert isinstance(row["pass"], bool)
        if row["kind"] == "delay":
            assert abs(row["measured_ms"] - row["configured_ms"]) < 0.5 * row["configured_ms"]
    launch = r["launch"]
    assert launch["one_vnic_launch_s"] > 0 and launch["batch_two_vnic_s"] > 0
    assert isinstance(launch["four_over_one_pass"], bool)
    console = Console(width=200, file=io.StringIO(), record=True)
    for table in render_bench.nics_tables(r):
        console.print(table)
    text = console.export_text()
    assert "eth1 (data) egress tcp, both vNICs loaded" in text and "4 vNICs" in text
    sessions = [r["fidelity"]["session"], *launch["sessions"]]
    assert len(sessions) == 4 and [n for s in sessions for n in leftovers(s)] == []
