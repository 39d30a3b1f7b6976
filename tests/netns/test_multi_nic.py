"""VMs with several vNICs on the netns driver, on the real kernel: each vNIC on its
network's bridge with its own MAC, addresses and shaping (measured with iperf3 both
ways), networks isolated from each other (ping, ARP and NDP), live change and drift
per vNIC, and cleanup of every vNIC after success, a failed launch and SIGKILL.

The requests are built here (the manager does not make several vNICs yet) and go to
the driver directly; every session made is torn down and checked for leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.netns.conftest import Multi, left_of
from tests.netns.helpers import NETWORK_IDS, WIDE, nic, vm, with_sets
from vnic.dataplane import delayd, nft, vminit
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.inventory import session_links
from vnic.dataplane.tc import read_class_counters
from vnic.errors import Conflict, DataplaneError
from vnic.lab.measure import TCP_GOODPUT, iperf3, ping
from vnic.model.launch import LaunchRequest, link_unit
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.plan.compile import DEFAULT_MINOR

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def delay_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delay and loss go to the vnic delay engine here whatever the kernel has: the
    tests check an engine per vNIC (its unit's files, process and relay)."""
    monkeypatch.setenv("VNIC_ENGINE", "delayd")


def goodput_ratio(measured: float, rate: float) -> float:
    return measured / (rate * TCP_GOODPUT)


def vm_links(session: str, vm_name: str) -> dict[str, dict[str, object]]:
    """The VM's interfaces (``ip -j addr``), by name, loopback left out."""
    out = nsops.run(
        names.vm_netns(session, vm_name), ["ip", "-j", "addr"], capture_output=True, timeout=10
    ).stdout
    return {str(link["ifname"]): link for link in json.loads(out) if link["ifname"] != "lo"}


def addresses_of(link: dict[str, object]) -> set[str]:
    infos = link.get("addr_info", [])
    assert isinstance(infos, list)
    return {f"{a['local']}/{a['prefixlen']}" for a in infos if a.get("scope") == "global"}


# ----------------------------------------------------------------------------- building


def test_two_vnics_on_two_networks_each_shaped_both_ways(multi: Multi) -> None:
    s = multi.session()
    a = vm(
        s,
        "a",
        nic("eth0", "default", 2, ["egress.rate=20Mbit", "ingress.rate=20Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=40Mbit", "ingress.rate=40Mbit"]),
    )
    b = vm(s, "b", nic("eth0", "default", 3, WIDE))
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    multi.launch(b, c, a)

    # Each vNIC inside the VM: its name, MAC and addresses (and nothing of the other's).
    links = vm_links(s, "a")
    assert set(links) == {"eth0", "eth1"}
    for n in a.nics:
        assert links[n.name]["address"] == str(n.mac)
        assert addresses_of(links[n.name]) == {str(n.ipv4), str(n.ipv6)}
    # Each port (host end) on its own network's bridge.
    found = session_links(names.session_netns(s))
    for n in a.nics:
        port = names.VmLinks.of(link_unit("a", n.name)).port
        assert found[port].master == names.bridge_of(n.network)
        assert found[port].alias == names.owner_tag(s, link_unit("a", n.name))
    assert names.bridge_of("data") != names.BRIDGE
    assert found[names.bridge_of("data")].alias == names.owner_tag(s)

    c_ip, b_ip = str(c.ipv4.ip), str(b.ipv4.ip)
    up0 = iperf3(s, "a", "b", b_ip, seconds=3)
    down0 = iperf3(s, "a", "b", b_ip, seconds=3, reverse=True)
    up1 = iperf3(s, "a", "c", c_ip, seconds=3)
    down1 = iperf3(s, "a", "c", c_ip, seconds=3, reverse=True)
    print(
        f"\neth0 20 Mbit/s: up {up0.bits_per_second / 1e6:.2f}, "
        f"down {down0.bits_per_second / 1e6:.2f}; eth1 40 Mbit/s: up "
        f"{up1.bits_per_second / 1e6:.2f}, down {down1.bits_per_second / 1e6:.2f} Mbit/s"
    )
    assert 0.95 <= goodput_ratio(up0.bits_per_second, 20e6) <= 1.03, up0
    assert 0.95 <= goodput_ratio(down0.bits_per_second, 20e6) <= 1.03, down0
    assert 0.95 <= goodput_ratio(up1.bits_per_second, 40e6) <= 1.03, up1
    assert 0.95 <= goodput_ratio(down1.bits_per_second, 40e6) <= 1.03, down1
    # Each vNIC's own classes counted its traffic: egress on its IFB, ingress on its port.
    counters = read_class_counters(names.session_netns(s))
    for unit, up, down in (("a", up0, down0), ("a.eth1", up1, down1)):
        links_of = names.VmLinks.of(unit)
        assert counters[(links_of.ifb, DEFAULT_MINOR)].bytes >= up.bytes
        assert counters[(links_of.port, DEFAULT_MINOR)].bytes >= down.bytes
    assert multi.driver.drift(a) == []

    # Destroy finds eth1 by itself: nothing tagged with either vNIC is left.
    multi.driver.destroy(s, "a")
    tags = {names.owner_tag(s, "a"), names.owner_tag(s, "a.eth1")}
    assert not tags & {x.alias for x in session_links(names.session_netns(s)).values()}
    assert not tags & set(nft.jump_tags(names.session_netns(s)))
    assert names.vm_netns(s, "a") not in nsops.listing()
    assert multi.driver.inventory()[s] == {"b", "c"}


def test_one_vnic_vm_keeps_the_names_it_had(multi: Multi) -> None:
    """A VM of one vNIC (as the previous release launched every VM) has exactly the
    objects it had: port, IFB, tag, guard chain, engine files named by the VM alone."""
    s = multi.session()
    eff = complete([Layer("vm-patch", "", parse_assignments(["egress.delay=1ms"]))])
    ipv4, ipv6 = names.vm_addresses(NETWORK_IDS["default"], 5)
    one = LaunchRequest.single(
        session=s,
        vm="old",
        network_id=NETWORK_IDS["default"],
        mac=MacAddress.parse("02:00:01:2d:05:01"),
        ipv4=ipv4,
        ipv6=ipv6,
        profile=build_profile(eff.values),
        values=dict(eff.values),
    )
    assert one.unit == "old"
    multi.launch(one)
    ident = hashlib.sha1(b"old").hexdigest()[:10]  # the names the previous release gave
    found = session_links(names.session_netns(s))
    engine = delayd.running(s, "old")
    port = f"vy{ident}" if engine else f"vh{ident}"
    assert found[port].alias == f"vnic:{s}/old"
    assert found[port].master == "vbr0"
    assert f"vh{ident}" in found
    assert "eth0" in vm_links(s, "old")
    jumps = nft.read_guard(names.session_netns(s), f"vm_{port}", f"vnic:{s}/old")
    assert jumps.jumps == (port,) and jumps.rules
    if engine:
        assert (delayd.run_dir(s) / "old.pid").exists()
    assert multi.driver.drift(one) == []
    assert multi.driver.reconfigure(one, one) == []
    multi.driver.destroy(s, "old")
    assert left_of(s) == [f"vnic.{s}"]


# ----------------------------------------------------------------------------- isolation


def test_networks_and_sessions_are_isolated(multi: Multi) -> None:
    s = multi.session()
    a = vm(s, "a", nic("eth0", "default", 2, WIDE), nic("eth1", "data", 2, WIDE))
    b = vm(s, "b", nic("eth0", "default", 3, WIDE))
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    multi.launch(a, b, c)
    other = multi.session()  # same networks, c's address: still apart
    x = vm(
        other,
        "x",
        replace(nic("eth0", "data", 4, WIDE), mac=MacAddress.parse("02:00:01:2e:04:99")),
    )
    multi.launch(x)

    # a reaches both, both families.
    for peer in (b, c):
        assert ping(s, "a", str(peer.ipv4.ip), count=2), peer.vm
        assert ping(s, "a", str(peer.ipv6.ip), count=2), peer.vm
    # b and c cannot reach each other, even told the other is on their own link: the
    # ARP and NDP queries stay on the querier's bridge.
    for src, dst in ((b, c), (c, b)):
        for family, net in (("-4", dst.ipv4.network), ("-6", dst.ipv6.network)):
            multi.exec(s, src.vm, "ip", family, "route", "add", str(net), "dev", "eth0")
        assert ping(s, src.vm, str(dst.ipv4.ip), count=3, timeout=0.5) == []
        assert ping(s, src.vm, str(dst.ipv6.ip), count=3, timeout=0.5) == []
    # Each tried (its entries for the other are INCOMPLETE or FAILED), and neither
    # learned the other's MAC: no query and no answer crossed between the bridges.
    for one, peer in ((b, c), (c, b)):
        neigh = json.loads(multi.exec(s, one.vm, "ip", "-j", "neigh", "show"))
        learned = {str(n["dst"]) for n in neigh if "lladdr" in n}
        assert not learned & {str(peer.ipv4.ip), str(peer.ipv6.ip)}, (one.vm, neigh)
        tried = {str(n["dst"]) for n in neigh if "lladdr" not in n}
        assert str(peer.ipv4.ip) in tried, (one.vm, neigh)
    # Sessions: x (another session, on a network of the same name, with c's address)
    # reaches nothing of a's, and what a reaches at that address is c, not x.
    a1 = a.nics[1]
    assert ping(other, "x", str(a1.ipv4.ip), count=2, timeout=0.5) == []
    assert ping(other, "x", str(a1.ipv6.ip), count=2, timeout=0.5) == []
    assert ping(s, "a", str(x.ipv4.ip), count=2, timeout=0.5)  # that is c, here
    answered = {
        str(n["dst"]): n.get("lladdr")
        for n in json.loads(multi.exec(s, "a", "ip", "-j", "neigh", "show", "dev", "eth1"))
    }
    assert answered.get(str(c.ipv4.ip)) == str(c.mac) != str(x.mac)


# ----------------------------------------------------------------------------- live change and drift


def test_live_change_of_eth1_under_a_flow_touches_only_eth1(multi: Multi) -> None:
    s = multi.session()
    before = vm(
        s,
        "a",
        nic("eth0", "default", 2, ["egress.rate=30Mbit", "ingress.rate=30Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=40Mbit", "ingress.rate=40Mbit"]),
    )
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    multi.launch(before, c)
    after = with_sets(before, "eth1", ["egress.rate=20Mbit", "ingress.rate=20Mbit"])
    session_ns = names.session_netns(s)
    eth0 = names.VmLinks.of("a")
    eth1 = names.VmLinks.of("a.eth1")

    def eth0_state() -> str:
        """eth0's qdiscs, classes and filters as tc prints them (no counters)."""
        return "".join(
            nsops.run(
                session_ns, ["tc", what, "show", "dev", dev], capture_output=True, timeout=10
            ).stdout
            for dev in (eth0.port, eth0.ifb)
            for what in ("qdisc", "class", "filter")
        )

    eth0_before = eth0_state()
    server = nsops.popen(
        names.vm_netns(s, "c"),
        ["iperf3", "-s", "-1", "-p", "5231"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from vnic.dataplane.vmexec import wait_listening

        wait_listening(s, "c", 5231)
        client = nsops.popen(
            names.vm_netns(s, "a"),
            ["iperf3", "-c", str(c.ipv4.ip), "-p", "5231", "-t", "3", "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # The flow runs through eth1's egress class before the change.
        deadline = time.monotonic() + 10
        while read_class_counters(session_ns)[(eth1.ifb, DEFAULT_MINOR)].bytes < 1_000_000:
            assert time.monotonic() < deadline and client.poll() is None, "no flow on eth1"
            time.sleep(0.02)
        lines = multi.driver.reconfigure(before, after)
        out, err = client.communicate(timeout=20)
    finally:
        server.wait(timeout=10)
    print(f"\neth1 40 -> 20 Mbit/s: {lines}")
    assert lines and all(line.startswith("eth1: ") for line in lines), lines
    assert any("40Mbit -> 20Mbit" in line for line in lines), lines
    assert client.returncode == 0, err
    assert len(json.loads(out)["start"]["connected"]) == 1  # no reset
    assert eth0_state() == eth0_before
    assert multi.driver.drift(after) == []
    up = iperf3(s, "a", "c", str(c.ipv4.ip), seconds=3)
    print(f"eth1 after the change: {up.bits_per_second / 1e6:.2f} Mbit/s")
    assert 0.95 <= goodput_ratio(up.bits_per_second, 20e6) <= 1.03, up

    # The vNICs themselves change only on a stopped VM.
    moved = replace(after, nics=(after.nics[0], replace(after.nics[1], network="other")))
    with pytest.raises(Conflict, match=r"eth1\.network.*stopped VM"):
        multi.driver.reconfigure(after, moved)
    fewer = replace(after, nics=after.nics[:1])
    with pytest.raises(Conflict, match=r"nics: eth0 .*eth0, eth1.*stopped VM"):
        multi.driver.reconfigure(after, fewer)
    assert multi.driver.drift(after) == []


def test_drift_on_eth1_names_it(multi: Multi) -> None:
    s = multi.session()
    a = vm(
        s,
        "a",
        nic("eth0", "default", 2, ["egress.rate=30Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=40Mbit", "tcp.sack=false"]),
    )
    multi.launch(a)
    assert multi.driver.drift(a) == []
    eth1 = names.VmLinks.of("a.eth1")
    session_ns = names.session_netns(s)
    nsops.run(session_ns, ["ip", "link", "del", eth1.ifb], check=True, timeout=10)
    problems = multi.driver.drift(a)
    assert problems and all(p.startswith("eth1: ") for p in problems), problems
    assert any(f"IFB {eth1.ifb}: expected present, found missing" in p for p in problems)
    # eth1 itself gone from the VM is drift too (and with it its port).
    nsops.run(names.vm_netns(s, "a"), ["ip", "link", "del", "eth1"], check=True, timeout=10)
    problems = multi.driver.drift(a)
    assert f"eth1 in {names.vm_netns(s, 'a')}: expected present, found missing" in problems
    assert f"eth1: port {eth1.port}: expected present, found missing" in problems
    assert not [p for p in problems if p.startswith("eth0") or "vbr0" in p], problems


# ----------------------------------------------------------------------------- cleanup


def test_failed_launch_on_eth1_leaves_nothing_of_any_vnic(
    multi: Multi, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = multi.session()
    c = vm(s, "c", nic("eth0", "default", 4, WIDE))
    multi.launch(c)
    session_ns = names.session_netns(s)
    links_before = set(session_links(session_ns))
    jumps_before = sorted(nft.jump_tags(session_ns))
    real_verify = __import__("vnic.drivers.hostside", fromlist=["verify"]).verify
    eth1_port = names.VmLinks.of("a.eth1").port

    engine_at_failure: list[bool] = []

    def broken(ns: object, plan: object) -> None:
        if plan.devices.port == eth1_port:  # type: ignore[attr-defined]
            engine_at_failure.append(delayd.running(s, "a"))
            raise DataplaneError("injected: eth1's class add refused")
        real_verify(ns, plan)

    monkeypatch.setattr("vnic.drivers.hostside.verify", broken)
    a = vm(
        s,
        "a",
        nic("eth0", "default", 2, ["egress.rate=20Mbit", "egress.delay=2ms"]),
        nic("eth1", "data", 2, ["egress.rate=20Mbit"]),
    )
    with pytest.raises(DataplaneError, match="injected"):
        multi.driver.launch(a)
    assert names.vm_netns(s, "a") not in nsops.listing()
    # The bridge of data was made for a's eth1: it stays, empty, until the teardown.
    assert set(session_links(session_ns)) - {names.bridge_of("data")} == links_before
    assert sorted(nft.jump_tags(session_ns)) == jumps_before
    assert engine_at_failure == [True]  # eth0 was built, its engine running
    assert not delayd.run_files().get(s) and vminit.run_dirs().get(s) == {"c"}
    assert not [o for o in delayd.engine_processes().values() if o[0] == s]
    assert multi.driver.inventory()[s] == {"c"}


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.netns.test_multi_nic import killed_launch_request
from vnic.drivers.netns import NetnsDriver
NetnsDriver().launch(killed_launch_request(sys.argv[2]))
"""


def killed_launch_request(session: str) -> LaunchRequest:
    """What the killed launch asks for: three vNICs, the last with the delay engine."""
    return vm(
        session,
        "k",
        nic("eth0", "default", 2, ["egress.rate=20Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=20Mbit"]),
        nic("eth2", "data", 3, ["egress.rate=20Mbit", "egress.delay=5ms"]),
    )


@pytest.mark.parametrize("stage", ["eth1", "eth2-engine"])
def test_sigkill_of_a_launching_process_leaves_nothing_after_teardown(
    multi: Multi, stage: str
) -> None:
    s = multi.session()
    multi.launch(vm(s, "c", nic("eth0", "data", 4, WIDE)))
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", CHILD, root, s], env=dict(os.environ))
    session_ns = names.session_netns(s)
    eth1 = names.VmLinks.of("k.eth1").port

    def reached() -> bool:
        if stage == "eth1":
            return nsops.exists(session_ns) and eth1 in _names_in(session_ns)
        return any(owner == (s, "k.eth2") for owner in delayd.engine_processes().values())

    deadline = time.monotonic() + 30
    while not reached():
        assert time.monotonic() < deadline and proc.poll() is None, f"never reached {stage}"
        time.sleep(0.005)
    assert proc.poll() is None, "the launch ended before it could be killed part-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert "k" in multi.driver.inventory()[s]
    multi.driver.destroy(s, "k")
    assert multi.driver.inventory()[s] == {"c"}
    tags = {names.owner_tag(s, link_unit("k", f"eth{i}")) for i in range(3)}
    assert not tags & {x.alias for x in session_links(session_ns).values()}
    assert not tags & set(nft.jump_tags(session_ns))
    assert not [o for o in delayd.engine_processes().values() if o[0] == s]


def _names_in(session_ns: str) -> set[str]:
    try:
        return set(session_links(session_ns))
    except DataplaneError:
        return set()  # not mounted yet


def test_host_side_counters_are_per_vnic(multi: Multi) -> None:
    """``drop_counters`` and ``engine_stats`` take a unit: eth1's are eth1's alone."""
    s = multi.session()
    a = vm(
        s,
        "a",
        nic("eth0", "default", 2, WIDE),
        nic("eth1", "data", 2, ["egress.rate=1Gbit", "egress.delay=1ms"]),
    )
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    multi.launch(a, c)
    assert multi.driver.engine_stats(s, "a") is None  # eth0 has no delay
    assert ping(s, "a", str(c.ipv4.ip), count=2)
    stats = multi.driver.engine_stats(s, "a.eth1")
    assert stats is not None and stats.directions["egress"]["rx_frames"] >= 2, stats
    # eth1 sends with a MAC not its own (a static neighbour entry: no ARP needed).
    multi.exec(
        s, "a", "ip", "neigh", "replace", str(c.ipv4.ip), "lladdr", str(c.mac), "dev", "eth1"
    )
    multi.exec(s, "a", "ip", "link", "set", "eth1", "address", "02:66:66:66:66:66")
    assert ping(s, "a", str(c.ipv4.ip), count=4, timeout=0.5) == []
    assert multi.driver.drop_counters(s, "a.eth1")["spoof-mac"] >= 2
    assert set(multi.driver.drop_counters(s, "a").values()) == {0}
    # The doctor's report has a row per vNIC: eth0 always, eth1 with its engine.
    rows = {(r["vm"], r["nic"]): r for r in multi.driver.engines_in_use() if r["session"] == s}
    assert rows[("a", "eth0")]["engine"] == "none"
    assert rows[("a", "eth1")]["engine"] == "delayd"  # with stats, it is the engine's
    assert rows[("a", "eth1")]["pid"] == stats.pid
    assert ("c", "eth0") in rows and ("c", "eth1") not in rows


def test_agent_reconcile_repairs_drift_on_eth1(multi: Multi, tmp_path: Path) -> None:
    """Reconcile works per VM: drift on any vNIC rebuilds the VM, with every vNIC."""
    from vnic.agent.core import Agent

    s = multi.session()
    agent = Agent(tmp_path / "agent", {"netns": multi.driver})
    a = vm(
        s,
        "a",
        nic("eth0", "default", 2, ["egress.rate=30Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=40Mbit", "egress.delay=1ms"]),
    )
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    agent.launch(a)
    agent.launch(c)
    assert agent.drift() == {}
    relay = names.VmLinks.of("a.eth1").relay
    nsops.run(names.session_netns(s), ["ip", "link", "del", relay], check=True, timeout=10)
    (problems,) = agent.drift().values()
    assert any(p.startswith(f"eth1: relay {relay}") for p in problems), problems
    report = agent.reconcile()
    assert list(report.reapplied) == [f"{s}/a"] and not report.failed, report
    assert report.drift == {}
    assert ping(s, "a", str(c.ipv4.ip), count=2)
    assert multi.driver.engine_stats(s, "a.eth1") is not None
    agent.teardown_session(s)
    assert left_of(s) == []
