"""`vnic bench change` in its quick form, once: every section present and sane, the TCP
flow alive through its rate changes, nothing left behind. The targets themselves
(speed) are the benchmark's to report, not this test's."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.netns.conftest import leftovers
from vnic.lab.bench import change as bench_change

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    out = tmp_path_factory.mktemp("bench") / "change.json"
    yield bench_change.run(quick=True, out=out), out


def test_every_section_is_reported_with_its_target(result: tuple[dict[str, Any], Path]) -> None:
    r, out = result
    assert json.loads(out.read_text()) == {"benchmark": "change", **r}
    for name in bench_change.SECTIONS:
        section = r[name]
        assert "error" not in section, section.get("error")
        assert section["target"] == bench_change.TARGETS[name]
        assert isinstance(section["met"], bool)
    assert r["met"] == all(r[name]["met"] for name in bench_change.SECTIONS)
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(bench_change.table(r))
    text = console.export_text()
    assert "one vNIC" in text and "runner schedule slip" in text


def test_changes_reach_the_kernel(result: tuple[dict[str, Any], Path]) -> None:
    r, _ = result
    one = r["one_vnic"]
    assert one["changes"] == 20 and one["timeouts"] == 0
    assert 0 < one["api_to_kernel"]["p50_ms"] <= one["api_to_kernel"]["p99_ms"]
    fleet = r["profile_fleet"]
    assert fleet["vms"] == 20 and fleet["changes"] == 10 and fleet["timeouts"] == 0
    assert fleet["vms_changed_per_call"] == [20] and fleet["errors"] == []
    assert fleet["api_to_all_kernels"]["p50_ms"] > 0


def test_the_tcp_flow_survives_its_rate_changes(result: tuple[dict[str, Any], Path]) -> None:
    flow = result[0]["tcp_flow"]
    assert flow["survived"], flow
    assert flow["iperf3_exit"] == 0 and flow["connections"] == 1
    assert flow["counter_resets"] == 0  # changed in place, not rebuilt
    assert flow["converge_up_s"] is not None and flow["converge_down_s"] is not None
    assert all(c["kernel_seen_ms"] is not None for c in flow["changes"])
    assert flow["drops_while_changing"] is not None
    rates = flow["shaper_rate_bps"]
    # Loose: the shaper follows 10 -> 30 -> 10 Mbit/s (exactness is the benchmark's).
    assert 7e6 < rates["before_up"] < 13e6
    assert 22e6 < rates["after_up"] < 38e6
    assert 7e6 < rates["after_down"] < 13e6


def test_the_trace_is_replayed_window_by_window(result: tuple[dict[str, Any], Path]) -> None:
    trace = result[0]["trace"]
    assert trace["scenario_state"] == "finished" and trace["scenario_error"] is None
    assert trace["steps_applied"] == trace["steps_expected"] == 10
    assert trace["measured_windows"] == trace["windows"] == 50
    assert trace["slip_p99_ms"] is not None and trace["slip_p99_ms"] >= 0
    steady = trace["without_first_window_after_change"]
    assert steady["windows"] == 40
    # Loose: most steady windows follow the trace (the benchmark reports how closely).
    assert steady["within_5_percent"] >= 0.5


def test_it_leaves_no_session_behind(result: tuple[dict[str, Any], Path]) -> None:
    r, _ = result
    assert len(r["sessions"]) == 3
    assert [s for s in r["sessions"] if leftovers(s)] == []
