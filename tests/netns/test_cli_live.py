"""Live changes from the embedded CLI on real namespaces: `vnic vm set` and `vnic profile
apply` say what changed where and the kernel follows; a refused value changes nothing;
`vnic vm adjust`, `vnic audit` and a scenario played in the foreground."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.netns.conftest import leftovers
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_classes
from vnic.plan import names

MBIT = 1_000_000


class Vnic:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "VNIC_HOME": str(home), "COLUMNS": "200"}
        self.env.pop("VNIC_DATABASE_URL", None)
        self.env.pop("VNIC_SERVER", None)

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "vnic.cli.app", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


def rate_bps(session: str, vm: str, direction: str = "egress") -> int:
    links = names.VmLinks.of(vm)
    device = links.ifb if direction == "egress" else links.port
    with nsops.opened(names.session_netns(session)) as ns:
        return int(read_classes(ns, device)[1].rate) * 8


def test_live_changes_from_the_cli(tmp_path: Path) -> None:
    vnic = Vnic(tmp_path / "home")
    s = f"c{uuid.uuid4().hex[:8]}"
    base = tmp_path / "base.yaml"
    base.write_text("name: base\negress: {rate: 10Mbit}\ningress: {rate: 50Mbit}\n")
    vnic("profile", "apply", "-f", str(base))
    vnic("session", "create", s, "--default-profile", "base")
    try:
        vnic("vm", "launch", s, "a")
        out = vnic("vm", "set", s, "a", "egress.rate=30Mbit").stdout
        assert f"vm {s}/a: egress.rate 10Mbit -> 30Mbit  (vm-patch (override))" in out, out
        assert "kernel: egress: class 1:1 rate 10Mbit -> 30Mbit" in out, out
        assert rate_bps(s, "a") == 30 * MBIT
        assert rate_bps(s, "a", "ingress") == 50 * MBIT

        bad = vnic("vm", "set", s, "a", "egress.rate=fast", ok=False)
        assert bad.returncode == 2 and "egress.rate" in bad.stderr, bad.stderr
        assert rate_bps(s, "a") == 30 * MBIT

        base.write_text("name: base\negress: {rate: 10Mbit}\ningress: {rate: 60Mbit}\n")
        out = vnic("profile", "apply", "-f", str(base)).stdout
        assert "profile base: updated (revision 2)" in out
        assert f"vm {s}/a: ingress.rate 50Mbit -> 60Mbit  (session-default (base r2))" in out, out
        assert rate_bps(s, "a", "ingress") == 60 * MBIT
        assert rate_bps(s, "a") == 30 * MBIT  # the override still wins

        out = vnic("vm", "set", s, "a", "--unset", "egress.rate").stdout
        assert "egress.rate 30Mbit -> 10Mbit" in out and rate_bps(s, "a") == 10 * MBIT

        out = vnic("vm", "adjust", s, "a", "egress.rate=7Mbit", "--reason", "by hand").stdout
        assert f"vm {s}/a: egress.rate 10Mbit -> 7Mbit" in out and rate_bps(s, "a") == 7 * MBIT
        explained = vnic.json("vm", "explain", s, "a")
        source = explained["effective"]["fields"]["egress.rate"]["source"]
        assert source == {"layer": "runtime", "detail": "user: by hand"}
        audit = vnic.json("audit", "--session", s)
        assert [e["reason"] for e in audit][:1] == ["by hand"]
        assert (
            audit[0]["old"]["egress.rate"] == "10Mbit" and audit[0]["new"]["egress.rate"] == "7Mbit"
        )
        vnic("vm", "adjust", s, "a", "--clear")
        assert rate_bps(s, "a") == 10 * MBIT

        scenario = tmp_path / "steps.yaml"
        scenario.write_text(
            "name: steps\nvms: [a]\nsteps:\n"
            "  - {at: 0s, set: {egress.rate: 5Mbit}}\n"
            "  - {at: 0.5s, set: {egress.rate: 6Mbit}}\n"
        )
        out = vnic("scenario", "start", s, "-f", str(scenario)).stdout
        assert "scenario steps" in out and "finished" in out and "2 steps applied" in out, out
        assert rate_bps(s, "a") == 6 * MBIT  # a finished scenario's layer stays until removed
        vnic("vm", "adjust", s, "a", "--clear", "--source", "scenario:steps")
        assert rate_bps(s, "a") == 10 * MBIT
    finally:
        vnic("session", "down", s)
    assert leftovers(s) == []
