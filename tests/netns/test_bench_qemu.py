"""`vnic bench fidelity --driver qemu`, reduced to 10 Mbit/s and 2 s flows: a real QEMU
guest (TCG here) shaped both ways against a netns peer, the rows it cannot run listed
with their reason, and nothing of its session left on the host afterwards."""

from __future__ import annotations

import pytest

from tests.netns.conftest import guest_leftovers, leftovers
from vnic.lab.bench import qemu as bench_qemu

pytestmark = pytest.mark.root

#: Measured frame rate / configured rate. The benchmark's target is ±5 %; at 10 Mbit/s the
#: runs here measured 0.998-1.010. Above the rate the bound stays 5 %: a shaper that lets
#: more through is wrong whatever the load. Below it is 8 %, since the guest's emulated CPU
#: shares two cores with whatever else runs (the rest of the suite): a starved guest can
#: only send or read less, and that is contention, not shaping.
LOW, HIGH = 0.92, 1.05


def test_a_guest_is_shaped_both_ways_and_leaves_nothing() -> None:
    result = bench_qemu.fidelity((10,), seconds=2.0, extras=False)

    assert result["driver"] == "qemu" and result["accelerator"] in ("kvm", "tcg")
    rows = {r["case"]: r for r in result["rows"]}
    for direction in ("egress", "ingress"):
        for proto in ("tcp", "udp"):
            row = rows[f"10Mbit {direction} {proto}"]
            assert "error" not in row, row
            assert LOW <= row["ratio"] <= HIGH, row
    below = rows["10Mbit egress udp offered at 0.9x"]
    assert LOW <= below["ratio"] <= HIGH, below
    # The burst probe needs Python in the guest: skipped, and the JSON says why.
    assert [s["case"] for s in result["skipped"]] == ["10Mbit egress 30KB probe"]
    assert "Python" in result["skipped"][0]["reason"]

    session = result["session"]
    assert guest_leftovers(session) == []
    assert leftovers(session) == []
