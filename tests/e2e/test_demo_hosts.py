"""The demo's multi-host part (`vnic demo --hosts N`): a session spread over emulated hosts,
TCP measured between VMs on different hosts, a live change reaching every host, and
nothing of it left afterwards."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from vnic.errors import InvalidInput
from vnic.lab.demo_hosts import run_demo_hosts


def test_the_multi_host_demo_shapes_across_hosts_and_leaves_nothing() -> None:
    console = Console(width=200, file=io.StringIO(), record=True)
    run_demo_hosts(3, console)
    out = console.export_text()
    assert re.search(r"vm1 on h\d, vm2 on h\d, vm3 on h\d", out), out
    placed = dict(re.findall(r"(vm\d) on (h\d)", out))
    assert sorted(placed.values()) == ["h1", "h2", "h3"]  # spread: one per host
    rows = re.findall(
        r"│ (\w+) \((h\d)\) +│ (\w+) \((h\d)\) +│ \w+ +│ (\d+) Mbit/s +│ [0-9.]+ Mbit/s +│ ([0-9.]+) +│",
        out,
    )
    # 3 pairs and the slow VM's, both ways; then the first pair again after the change.
    assert len(rows) == 10, out
    for src, src_host, dst, dst_host, _, ratio in rows:
        assert src_host != dst_host  # every flow crosses hosts
        assert 0.85 < float(ratio) < 1.05, (src, dst, ratio)  # shaped: not a speed bound
    assert [int(r[4]) for r in rows[-2:]] == [80, 80]  # the live change reached both ends
    assert "0 objects left" in out


def test_a_bad_number_of_hosts_is_refused_before_anything_runs() -> None:
    with pytest.raises(InvalidInput) as err:
        run_demo_hosts(1, Console(file=io.StringIO()))
    assert err.value.paths == ["--hosts"] and "from 2 to 8" in str(err.value)
