"""Per-vNIC metrics of VMs with several vNICs, without root: the collector reads each
vNIC's own host-side objects (named from its unit: the VM's name for eth0, VM.NIC for
the others), every per-vNIC series carries a ``nic`` label, a vNIC whose objects are
missing reads zeros, drift is split by the vNIC each difference names, the stats JSON
keeps eth0's keys at the top with every vNIC under ``nics``, and ``vnic top`` has a row
per vNIC. The kernel's dumps are replaced by tables of distinct numbers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.unit.test_metrics_render import of, parse
from vnic.agent import counters
from vnic.agent.metrics import FAMILIES, Collector, DirectionSample, VnicSample, render
from vnic.agent.monitor import Monitor, drift_by_nic, stats_by_vm
from vnic.agent.port import DesiredVm
from vnic.cli.render import top_table
from vnic.dataplane import delayd, tc
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import ClassCounters
from vnic.model.launch import LaunchRequest, NicRequest
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.plan.compile import DEFAULT_MINOR, compile_plan, guard_chain
from vnic.plan.model import Devices, Plan

ROOT = Path(__file__).resolve().parents[2]


def nic(name: str, network: str, host: int, **doc: object) -> NicRequest:
    spec = parse_profile_document({"name": f"p-{name}", **doc})
    eff = complete([Layer("session-default", f"p-{name}", spec.values)])
    net_id = 7 if network == "default" else 8
    v4, v6 = names.vm_addresses(net_id, host)
    return NicRequest(
        name,
        network,
        net_id,
        MacAddress.parse(f"02:00:00:00:0{net_id}:{host:02x}"),
        v4,
        v6,
        eff.profile,
        dict(eff.values),
        {f"p-{name}": int(name[-1]) + 1},
    )


class TwoNicDriver:
    """Plans each vNIC's one-vNIC slice on the links of its unit (as the netns driver
    does); eth1 runs the delay engine, whose counters it gives by unit."""

    def __init__(self) -> None:
        self.engine_units: list[tuple[str, str]] = []

    def plan_for(self, request: LaunchRequest) -> Plan:
        assert len(request.nics) == 1  # the collector plans one vNIC at a time
        links = names.VmLinks.of(request.unit)
        if request.nic == "eth1":
            devices = Devices(links.port, links.ifb, links.relay, links.relay_port)
            return compile_plan(request.profile, devices, engine="delayd")
        return compile_plan(request.profile, Devices(links.port, links.ifb))

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None:
        self.engine_units.append((session, vm))
        if vm != "a.eth1":
            return None
        return delayd.EngineStats(
            pid=1,
            directions={
                "egress": {"dropped_loss": 41, "dropped_overflow": 3},
                "ingress": {"dropped_loss": 0},
            },
            cpu_seconds=0.0,
        )


A = LaunchRequest(
    "lab",
    "a",
    (
        nic("eth0", "default", 2, egress={"rate": "20Mbit"}, ingress={"rate": "30Mbit"}),
        nic(
            "eth1",
            "data",
            2,
            egress={"rate": "40Mbit", "delay": "5ms", "loss": "1%"},
            ingress={"rate": "50Mbit"},
        ),
        # eth2's objects were never built (a data plane that builds eth0 only): zeros.
        nic("eth2", "data", 3, egress={"rate": "60Mbit"}, ingress={"rate": "70Mbit"}),
    ),
)
B = LaunchRequest("lab", "b", (nic("eth0", "default", 3, egress={"rate": "10Mbit"}),))


def links(unit: str) -> names.VmLinks:
    return names.VmLinks.of(unit)


def kernel(scale: int) -> dict[tuple[str, int], ClassCounters]:
    """Distinct counters on every vNIC's leaves: egress on the IFB (relay with the engine),
    ingress on the port; ``scale`` moves them all, as traffic would."""
    out = {}
    for i, (dev, base) in enumerate(
        [
            (links("a").ifb, 1000),
            (links("a").port, 2000),
            (links("a.eth1").relay, 3000),
            (links("a.eth1").port, 4000),
            (links("b").ifb, 5000),
            (links("b").port, 6000),
        ]
    ):
        out[(dev, DEFAULT_MINOR)] = ClassCounters(
            bytes=base * scale, packets=base // 100 * scale, drops=i + 1, overlimits=0
        )
    return out


@pytest.fixture
def collected(monkeypatch: pytest.MonkeyPatch) -> tuple[list[VnicSample], TwoNicDriver]:
    """Two collections 2 s apart of VM a (three vNICs) and VM b (one)."""
    readings = iter([kernel(1), kernel(3)])
    monkeypatch.setattr(nsops, "listing", lambda: ["vnic.lab", "vnic.lab.a"])
    monkeypatch.setattr(tc, "read_class_counters", lambda ns: next(readings))
    chains = {guard_chain(links("a").port): 5, guard_chain(links("a.eth1").relay_port): 9}
    monkeypatch.setattr(counters, "read_guard_drops", lambda ns: chains)
    monkeypatch.setattr(counters, "read_link_counters", lambda ns: {})
    driver = TwoNicDriver()
    clock = iter([10.0, 12.0])
    collector = Collector(driver, clock=lambda: next(clock))
    collector.collect([A, B])
    drift = {("lab", "a", "eth1"): 2}
    latency = {("lab", "a", "eth0"): 0.001, ("lab", "a", "eth1"): 0.011}
    return collector.collect([A, B], drift=drift, latency=latency), driver


def test_every_vnic_reads_its_own_objects(collected: tuple[list[VnicSample], Any]) -> None:
    samples, driver = collected
    assert [(s.vm, s.nic, s.network) for s in samples] == [
        ("a", "eth0", "default"),
        ("a", "eth1", "data"),
        ("a", "eth2", "data"),
        ("b", "eth0", "default"),
    ]
    a0, a1, a2, b0 = samples
    assert (a0.egress.bytes, a0.ingress.bytes, b0.egress.bytes) == (3000, 6000, 15000)
    assert (a1.egress.bytes, a1.ingress.bytes) == (9000, 12000)
    assert a1.egress.rate_bps == (9000 - 3000) * 8 / 2.0
    assert a0.egress.drops["anti_spoofing"] == 5 and a1.egress.drops["anti_spoofing"] == 9
    assert a1.egress.drops["emulated_loss"] == 41 and a1.egress.drops["queue_overflow"] == 3
    assert a0.egress.drops["emulated_loss"] == 0  # the engine is eth1's, not the VM's
    assert [s.egress.profile_rate_bps for s in samples] == [20e6, 40e6, 60e6, 10e6]
    assert [s.ingress.profile_rate_bps for s in samples[:3]] == [30e6, 50e6, 70e6]
    # eth2 was never built: zeros, and a measured rate of zero from the second reading.
    assert a2.egress == DirectionSample(
        rate_bps=0.0, profile_rate_bps=60_000_000
    ) and a2.ingress == DirectionSample(rate_bps=0.0, profile_rate_bps=70_000_000)
    assert (a0.revisions, a1.revisions) == ({"p-eth0": 1}, {"p-eth1": 2})
    assert (a0.latency_seconds, a1.latency_seconds, a2.latency_seconds) == (0.001, 0.011, None)
    assert (a0.drift, a1.drift, a2.drift) == (0, 2, 0)
    # The engine of a vNIC that has one is asked for by its unit.
    assert ("lab", "a.eth1") in driver.engine_units
    assert {u for _, u in driver.engine_units} == {"a.eth1"}


def test_every_per_vnic_series_has_a_series_per_vnic(
    collected: tuple[list[VnicSample], Any],
) -> None:
    samples, _ = collected
    _, _, series = parse(render(samples))
    assert ("vnic_vnics", {}, 4.0) in series
    for family in FAMILIES:
        if "nic" not in family.labels or family.name == "vnic_latency_seconds":
            continue
        nics = {s[1]["nic"] for s in of(series, family.name) if s[1]["vm"] == "a"}
        assert nics == {"eth0", "eth1", "eth2"}, family.name
    latency = {s[1]["nic"]: s[2] for s in of(series, "vnic_latency_seconds")}
    assert latency == {"eth0": 0.001, "eth1": 0.011}  # absent where not measured
    got = {
        (s[1]["vm"], s[1]["nic"], s[1]["direction"]): s[2] for s in of(series, "vnic_bytes_total")
    }
    assert got[("a", "eth0", "egress")] == 3000 and got[("a", "eth1", "egress")] == 9000
    assert got[("a", "eth2", "egress")] == 0 and got[("b", "eth0", "egress")] == 15000
    drops = {
        (s[1]["nic"], s[1]["cause"]): s[2]
        for s in of(series, "vnic_drops_total")
        if s[1]["vm"] == "a" and s[1]["direction"] == "egress"
    }
    assert drops[("eth0", "anti_spoofing")] == 5 and drops[("eth1", "anti_spoofing")] == 9
    revisions = {(s[1]["nic"], s[1]["profile"]): s[2] for s in of(series, "vnic_profile_revision")}
    assert revisions[("eth0", "p-eth0")] == 1 and revisions[("eth1", "p-eth1")] == 2


def test_a_forgotten_vnic_loses_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nsops, "listing", lambda: ["vnic.lab"])
    monkeypatch.setattr(tc, "read_class_counters", lambda ns: kernel(1))
    monkeypatch.setattr(counters, "read_guard_drops", lambda ns: {})
    collector = Collector(TwoNicDriver(), clock=iter([1.0, 2.0, 3.0]).__next__)
    collector.collect([A])
    # VM a relaunched with eth0 only: eth1's and eth2's plans and totals go.
    collector.collect([LaunchRequest("lab", "a", A.nics[:1])])
    assert set(collector._plans) == {("lab", "a")}
    (again,) = [s for s in collector.collect([A]) if s.nic == "eth1"]
    assert again.egress.rate_bps is None  # a fresh start: nothing to compare with


def test_drift_goes_to_the_vnic_each_difference_names() -> None:
    found = [
        "eth1: qdisc htb on vh1234: expected rate 40Mbit, found 10Mbit",
        "eth1 link vh1234: expected present, found missing",
        "sysctl net.ipv4.tcp_congestion_control: expected bbr, found cubic",
        "eth0: mac: expected 02:00:00:00:07:02, found 02:66:66:66:66:66",
        "eth7: not a vNIC of this VM",
    ]
    assert drift_by_nic(A, found) == {"eth0": 3, "eth1": 2, "eth2": 0}
    assert drift_by_nic(B, []) == {"eth0": 0}


def test_stats_keep_eth0_at_the_top_and_list_every_vnic(
    collected: tuple[list[VnicSample], Any],
) -> None:
    samples, _ = collected
    docs = stats_by_vm(samples)
    assert [d["vm"] for d in docs] == ["a", "b"]
    a, b = docs
    old_keys = {"session", "vm", "revisions", "egress", "ingress", "latency_seconds", "drift"}
    assert old_keys < set(a) and a["nic"] == "eth0"
    assert a["egress"] == dataclasses.asdict(samples[0])["egress"]
    assert [n["nic"] for n in a["nics"]] == ["eth0", "eth1", "eth2"]
    assert [n["network"] for n in a["nics"]] == ["default", "data", "data"]
    assert a["nics"][1]["egress"]["bytes"] == 9000
    assert [n["nic"] for n in b["nics"]] == ["eth0"]


def test_top_has_a_row_per_vnic(collected: tuple[list[VnicSample], Any]) -> None:
    samples, _ = collected
    stats = stats_by_vm(samples)
    # An agent of the previous release: one document per VM, no nics, no nic.
    old = dataclasses.asdict(VnicSample("lab", "c", {}, DirectionSample(), DirectionSample()))
    for key in ("nic", "network"):
        del old[key]
    console = Console(width=220, record=True)
    console.print(top_table("lab", [*stats, old]))
    rows = [line for line in console.export_text().splitlines() if re.search(r"\b[abc]/eth", line)]
    assert [r.split()[1] for r in rows] == ["a/eth0", "a/eth1", "a/eth2", "b/eth0", "c/eth0"]
    assert [r.split()[3] for r in rows] == ["default", "data", "data", "default", "default"]
    eth1 = rows[1]
    assert "24kbit" in eth1 and "40Mbit" in eth1 and "50Mbit" in eth1  # (9000-3000)*8/2 s
    assert "emulated loss 41" in eth1 and "anti spoofing 9" in eth1 and "11.00 ms" in eth1


def test_docs_name_every_label_and_each_metric_s_labels() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    labels_table = text.split("## Labels", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", labels_table, re.M))
    assert {label for f in FAMILIES for label in f.labels} <= documented
    rows = dict(re.findall(r"^\| `(vnic_[a-z_]+)` \|[^|]*\|[^|]*\|([^|]*)\|", text, re.M))
    for f in FAMILIES:
        assert f.name in rows, f.name
        got = [x.strip() for x in rows[f.name].split(",") if x.strip() not in ("", "—")]
        assert got == list(f.labels), f.name
    # The per-VM exceptions say they have no nic label.
    assert "no `nic` label" in text


class Desired:
    """What the monitor asks of its agent: the desired VMs, and their drift."""

    def __init__(self) -> None:
        self.drivers: dict[str, object] = {"netns": object()}
        self.repairer = None

    def mine(self) -> list[DesiredVm]:
        return [DesiredVm("netns", A), DesiredVm("netns", B)]

    def drift(self, only: object = None) -> dict[str, list[str]]:
        return {"lab/a": ["eth1: link vh1: expected present, found missing", "sysctl x"]}


def test_the_monitor_probes_and_counts_drift_per_vnic() -> None:
    monitor = Monitor(Desired())  # type: ignore[arg-type]
    assert [(t.vm, t.nic, t.network, str(t.ipv4)) for t in monitor._targets()] == [
        ("a", "eth0", "default", str(A.nics[0].ipv4)),
        ("a", "eth1", "data", str(A.nics[1].ipv4)),
        ("a", "eth2", "data", str(A.nics[2].ipv4)),
        ("b", "eth0", "default", str(B.ipv4)),
    ]
    monitor.refresh_drift()
    assert monitor.drift == {
        ("lab", "a", "eth0"): 1,
        ("lab", "a", "eth1"): 1,
        ("lab", "a", "eth2"): 0,
        ("lab", "b", "eth0"): 0,
    }


def test_a_vnic_planned_on_another_s_links_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that builds eth0 only plans every slice on the VM's links: eth1 must not
    report eth0's counters as its own."""

    class EthZeroOnly(TwoNicDriver):
        def plan_for(self, request: LaunchRequest) -> Plan:
            own = names.VmLinks.of(request.vm)
            engine = "netem" if request.nic == "eth1" else None  # eth1 has a delay
            return compile_plan(request.profile, Devices(own.port, own.ifb), engine=engine)

    monkeypatch.setattr(nsops, "listing", lambda: ["vnic.lab"])
    monkeypatch.setattr(tc, "read_class_counters", lambda ns: kernel(1))
    monkeypatch.setattr(counters, "read_guard_drops", lambda ns: {})
    got = Collector(EthZeroOnly()).collect([A])
    assert [(s.nic, s.egress.bytes, s.ingress.bytes) for s in got] == [
        ("eth0", 1000, 2000),
        ("eth1", 0, 0),
        ("eth2", 0, 0),
    ]
