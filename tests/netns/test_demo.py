"""The README's demo, run as a real process: launches, measures, tears down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.netns.conftest import leftovers

ROOT = Path(__file__).resolve().parents[2]


def test_demo_launches_measures_and_leaves_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "VNIC_HOME": str(tmp_path), "COLUMNS": "200"}
    env.pop("VNIC_DATABASE_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "vnic.cli.app",
        "demo",
        "--profiles",
        str(ROOT / "examples" / "demo"),
    ]
    for run in range(2):  # a second run rebuilds the session from scratch
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "rule (#1 role=server,network=default -> server r1)" in out
        assert "vm-profile (mobile r1)" in out
        ratios = [float(m) for m in re.findall(r"│ (\d\.\d{3}) +│\n", out)]
        # 3 netns VMs (web with two vNICs) and the QEMU guest, both ways
        assert len(ratios) == 10, out
        assert re.search(r"launched demo/lab: QEMU guest \((tcg|kvm)\), network ready", out), out
        assert "│ lab/eth0 (qemu)" in out
        # web's second vNIC is on storage, shaped by that network's own default profile.
        assert re.search(
            r"launched demo/web: eth0 on default: .*; eth1 on storage: MAC 02:00:00:d3:", out
        ), out
        assert re.search(r"│ web/eth1 +│ storage +│ session-default \(network storage", out), out
        # ... with that profile's 2 ms each way, and only its own (the meter adds none).
        delays = re.findall(r"│ web/eth1 +│ (?:egress|ingress) +│ 2ms +│ ([0-9.]+) ms", out)
        assert len(delays) == 2 and all(1.5 < float(d) < 3.5 for d in delays), out
        # The demo's rates (2-200 Mbit/s) are ones the shaper meets within a few percent.
        assert all(0.9 <= r <= 1.05 for r in ratios), ratios
        # The live change: the flow goes on through it, its rate follows 20 -> 40 Mbit/s.
        flow = re.search(r"flow, Mbit/s each second: ([0-9. ]+) \(one connection", out)
        assert flow is not None, out
        seconds = [float(x) for x in flow.group(1).split()]
        assert len(seconds) == 6, seconds
        # Per second as the sender counts it: a second may carry what the socket buffer
        # took early, so the rate is judged over the three seconds before the change and
        # the two last ones (the change lands at 3 s).
        before, after = sum(seconds[:3]) / 3, sum(seconds[-2:]) / 2
        assert 15 < before < 22 and 34 < after < 41 and after > 1.6 * before, seconds
        assert "egress.rate: 20Mbit -> 40Mbit" in out
        assert "0 namespaces and 0 QEMU processes left" in out
        assert not leftovers("demo")
        if run == 0:
            assert "profile office: created" in out
    assert "profile office: unchanged" in out
