"""A session's network across two emulated hosts, one L2 segment over VXLAN, on the real
kernel: ping over IPv4 and IPv6 (ARP and NDP through the overlay), a shaped TCP flow,
isolation from another session's VNI and from a host that is not a peer, the MTU
refusal, the removal of an overlay and the session's teardown leaving nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns.helpers import until
from tests.netns.hostbeds import new_bed
from vnic.lab.hostbed import HostBed
from vnic.plan import names
from vnic.plan import overlay as plan

pytestmark = pytest.mark.root

HELPER = [sys.executable, "-m", "tests.netns.overlay_host"]
ROOT = Path(__file__).resolve().parents[2]
#: Network ids (VNIs) of the sessions here; sessions "sa" and "sb" share sa's subnets.
VNI_A, VNI_B, VNI_C, VNI_D = 401, 402, 403, 404
RATE_MBIT = 40
FITTING = ["mtu=1450B", f"egress.rate={RATE_MBIT}Mbit"]


@dataclass(frozen=True)
class Vm:
    host: str
    session: str
    name: str
    mac: str
    ipv4: str
    ipv6: str

    @property
    def netns(self) -> str:
        return names.vm_netns(self.session, self.name)


def helper(
    bed: HostBed, host: str, *args: str, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    done = bed.run(host, [*HELPER, *args], env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
    if ok:
        assert done.returncode == 0, f"{host} {args[0]}: {done.stderr}"
    return done


def launch(
    bed: HostBed, host: str, session: str, vm: str, vni: int, index: int, sets: list[str]
) -> Vm:
    out = helper(bed, host, "launch", session, vm, str(vni), str(VNI_A), str(index), *sets)
    mac, ipv4, ipv6 = out.stdout.split()
    return Vm(host, session, vm, mac, ipv4, ipv6)


def wire(vni: int, *remote: tuple[str, Vm]) -> str:
    """The manager's list form: ``default`` with VNI ``vni``, the remote VMs at their hosts."""
    peers = sorted({addr for addr, _ in remote})
    return json.dumps(
        [
            {
                "network": "default",
                "vni": vni,
                "peers": peers,
                "macs": {vm.mac: a for a, vm in remote},
            }
        ]
    )


def ensure(
    bed: HostBed, host: str, session: str, doc: str, ok: bool = True, v6: bool = False
) -> Any:
    underlay = bed.host(host).address6 if v6 else bed.host(host).address4
    done = helper(bed, host, "overlays", session, underlay, doc, ok=ok)
    return json.loads(done.stdout) if ok else json.loads(done.stderr)


def in_vm(
    bed: HostBed, vm: Vm, *argv: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return bed.run(vm.host, ["ip", "netns", "exec", vm.netns, *argv], timeout=timeout)


def ping(bed: HostBed, src: Vm, address: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return in_vm(bed, src, "ping", "-c", str(count), "-i", "0.2", "-W", "1", address)


def table(bed: HostBed, host: str) -> dict[str, Any]:
    done = bed.run(host, ["nft", "-j", "list", "table", "inet", plan.TABLE])
    if done.returncode != 0:
        return {}
    items = json.loads(done.stdout)["nftables"]
    return {
        "chains": {i["chain"]["name"] for i in items if "chain" in i},
        "sets": {i["set"]["name"]: set(i["set"].get("elem", [])) for i in items if "set" in i},
        "drops": sum(
            e["counter"]["packets"]
            for i in items
            if "rule" in i
            for e in i["rule"]["expr"]
            if "counter" in e
        ),
    }


def links(bed: HostBed, host: str, session: str) -> dict[str, dict[str, Any]]:
    ns = names.session_netns(session)
    done = bed.run(host, ["ip", "-n", ns, "-d", "-j", "link", "show"])
    if done.returncode != 0:
        return {}
    return {link["ifname"]: link for link in json.loads(done.stdout)}


def fdb(bed: HostBed, host: str, session: str, dev: str) -> set[tuple[str, str]]:
    ns = names.session_netns(session)
    done = bed.run(host, ["ip", "netns", "exec", ns, "bridge", "-j", "fdb", "show", "dev", dev])
    assert done.returncode == 0, done.stderr
    return {(e["mac"], e["dst"]) for e in json.loads(done.stdout) if "dst" in e}


@dataclass
class Pair:
    bed: HostBed
    a: Vm  # on h1
    b: Vm  # on h2


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with new_bed(3, tmp_path_factory.mktemp("hosts")) as bed:
        h1, h2 = bed.hosts[0].address4, bed.hosts[1].address4
        a = launch(bed, "h1", "sa", "a", VNI_A, 2, FITTING)
        b = launch(bed, "h2", "sa", "b", VNI_A, 3, ["mtu=1450B"])
        made = ensure(bed, "h1", "sa", wire(VNI_A, (h2, b)))
        assert any(line.startswith("made vt") for line in made), made
        ensure(bed, "h2", "sa", wire(VNI_A, (h1, a)))
        yield Pair(bed, a, b)


def test_one_segment_across_hosts(pair: Pair) -> None:
    bed, a, b = pair.bed, pair.a, pair.b
    dev = plan.device_of("default")
    found = links(bed, "h1", "sa")[dev]
    info = found["linkinfo"]["info_data"]
    assert info["id"] == VNI_A and info["port"] == plan.VXLAN_PORT and not info["learning"]
    assert info["local"] == bed.hosts[0].address4
    assert found["ifalias"] == "vnic:sa/net:default" and found["master"] == names.BRIDGE
    assert found["mtu"] == 1450
    assert fdb(bed, "h1", "sa", dev) == {
        ("00:00:00:00:00:00", bed.hosts[1].address4),
        (b.mac, bed.hosts[1].address4),
    }
    # The device is not in the host's own namespace (only its socket is).
    assert dev not in bed.run("h1", ["ip", "-br", "link"]).stdout
    # No static neighbours: ARP and NDP cross the overlay.
    for address in (b.ipv4, b.ipv6):
        done = ping(bed, a, address)
        assert done.returncode == 0, f"{address}: {done.stdout}{done.stderr}"
    # Again: level-based, nothing changes.
    again = ensure(bed, "h1", "sa", wire(VNI_A, (bed.hosts[1].address4, b)))
    assert again == [], again
    # A full reconcile takes the device for the session's own: it stays, and works.
    report = json.loads(helper(bed, "h1", "reconcile").stdout)
    assert report == {"removed": [], "failed": {}}
    assert dev in links(bed, "h1", "sa")
    across = rtt_ms(ping(bed, a, b.ipv4, 10).stdout)
    near = launch(bed, "h1", "sa", "a2", VNI_A, 8, ["mtu=1450B"])
    within = rtt_ms(ping(bed, a, near.ipv4, 10).stdout)
    print(f"ping a -> b across hosts (VXLAN): {across}; a -> a2 within h1: {within}")


def rtt_ms(output: str) -> str:
    found = re.search(r"= ([\d.]+)/([\d.]+)/", output)
    assert found, output
    return f"min {found.group(1)} ms, avg {found.group(2)} ms"


def test_a_shaped_flow_across_hosts(pair: Pair) -> None:
    bed, a, b = pair.bed, pair.a, pair.b
    server = bed.spawn(
        "h2",
        ["ip", "netns", "exec", b.netns, "iperf3", "-s", "-1", "-p", "5301"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        listening = ["ip", "netns", "exec", b.netns, "ss", "-Hltn", "sport = :5301"]
        assert until(lambda: bool(bed.run("h2", listening).stdout.strip()), 10)
        client = ["iperf3", "-c", b.ipv4, "-p", "5301", "-t", "3", "-O", "0.5", "-J"]
        done = in_vm(bed, a, *client, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.wait(timeout=10)
    bits = json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]
    print(f"iperf3 a -> b across hosts: {bits / 1e6:.2f} Mbit/s (profile {RATE_MBIT} Mbit/s)")
    # A loose band: the profile shapes it (the ±2 % target is the benchmark's).
    assert 0.7 * RATE_MBIT * 1e6 <= bits <= 1.05 * RATE_MBIT * 1e6


def test_another_session_is_another_segment(pair: Pair) -> None:
    """Session sb on the same two hosts (its own VNI, sa's subnets): its VMs reach each
    other, not sa's, and its ARP broadcasts never reach sa's VMs, while sa's own do."""
    bed, a, b = pair.bed, pair.a, pair.b
    h1, h2 = bed.hosts[0].address4, bed.hosts[1].address4
    c = launch(bed, "h1", "sb", "c", VNI_B, 4, ["mtu=1450B"])
    d = launch(bed, "h2", "sb", "d", VNI_B, 5, ["mtu=1450B"])
    try:
        # sa's VNI on the same host: the kernel refuses the device; nothing of it is left.
        clash = ensure(bed, "h1", "sb", wire(VNI_A, (h2, d)), ok=False)
        assert "overlay devices" in clash["message"], clash
        assert plan.device_of("default") not in links(bed, "h1", "sb")
        assert "ov.sb" not in table(bed, "h1")["chains"]
        assert {"ov.sa.401.4", "ov.sa.401.6"} <= set(table(bed, "h1")["sets"])
        ensure(bed, "h1", "sb", wire(VNI_B, (h2, d)))
        ensure(bed, "h2", "sb", wire(VNI_B, (h1, c)))
        assert ping(bed, c, d.ipv4).returncode == 0
        assert ping(bed, c, d.ipv6).returncode == 0
        watch = bed.spawn(
            "h2",
            [*HELPER, "arps", b.netns, "eth0", "4"],
            env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        assert watch.stdout.readline().strip() == "ready"
        nobody = "10.1.145.99"  # in sa's subnet, no VM: every ping is an ARP broadcast
        assert nobody.rsplit(".", 1)[0] == b.ipv4.rsplit(".", 1)[0]
        assert ping(bed, c, b.ipv4, 2).returncode != 0
        ping(bed, c, nobody, 2)
        ping(bed, a, nobody, 2)
        seen = json.loads(watch.communicate(timeout=20)[0])
        assert seen.get(a.ipv4, 0) >= 1, seen  # the capture sees sa's broadcasts
        assert c.ipv4 not in seen, seen
    finally:
        helper(bed, "h1", "teardown", "sb")
        helper(bed, "h2", "teardown", "sb")
    assert "ov.sb" not in table(bed, "h1").get("chains", set())


def test_a_host_that_is_not_a_peer_is_dropped(pair: Pair) -> None:
    """h3 sends VXLAN with sa's VNI to h1: h1's filter drops it before the device."""
    bed, a = pair.bed, pair.a
    h1, h3 = bed.hosts[0].address4, bed.hosts[2].address4
    before = table(bed, "h1")["drops"]
    dev = "vxrogue"
    made = bed.run(
        "h3",
        [
            "sh",
            "-c",
            f"ip link add {dev} type vxlan id {VNI_A} dstport {plan.VXLAN_PORT} "
            f"local {h3} remote {h1} nolearning && ip addr add 10.1.145.77/24 dev {dev} "
            f"&& ip link set {dev} up",
        ],
    )
    assert made.returncode == 0, made.stderr
    try:
        sent = bed.run("h3", ["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", dev, a.ipv4])
        assert sent.returncode != 0
    finally:
        bed.run("h3", ["ip", "link", "del", dev])
    assert table(bed, "h1")["drops"] >= before + 1


def test_an_ipv6_underlay(pair: Pair) -> None:
    """The same over the hosts' IPv6 addresses: 70 bytes of overhead, so 1430 fits and
    1450 does not."""
    bed = pair.bed
    h1, h2 = bed.hosts[0].address6, bed.hosts[1].address6
    e = launch(bed, "h1", "sd", "e", VNI_D, 4, ["mtu=1450B"])
    f = launch(bed, "h2", "sd", "f", VNI_D, 5, ["mtu=1430B"])
    try:
        error = ensure(bed, "h1", "sd", wire(VNI_D, (h2, f)), ok=False, v6=True)
        assert "1450 needs an underlay of 1520; the underlay carries 1500" in error["message"]
        helper(bed, "h1", "teardown", "sd")
        e = launch(bed, "h1", "sd", "e", VNI_D, 4, ["mtu=1430B"])
        ensure(bed, "h1", "sd", wire(VNI_D, (h2, f)), v6=True)
        ensure(bed, "h2", "sd", wire(VNI_D, (h1, e)), v6=True)
        assert ensure(bed, "h2", "sd", wire(VNI_D, (h1, e)), v6=True) == []  # as it is
        info = links(bed, "h1", "sd")[plan.device_of("default")]["linkinfo"]["info_data"]
        assert info.get("local6", info.get("local")) == h1 and info["id"] == VNI_D
        for address in (f.ipv4, f.ipv6):
            done = ping(bed, e, address)
            assert done.returncode == 0, f"{address}: {done.stdout}{done.stderr}"
    finally:
        helper(bed, "h1", "teardown", "sd")
        helper(bed, "h2", "teardown", "sd")


def test_an_mtu_that_does_not_fit_is_refused_and_leaves_nothing(pair: Pair) -> None:
    bed = pair.bed
    h2 = bed.hosts[1].address4
    launch(bed, "h1", "sc", "e", VNI_C, 6, [])  # the default MTU, 1500
    try:
        doc = json.dumps([{"network": "default", "vni": VNI_C, "peers": [h2], "macs": {}}])
        error = ensure(bed, "h1", "sc", doc, ok=False)
        assert error["error"] == "invalid"
        assert error["fields"][0]["field"] == "overlays[0].mtu"
        assert "1500 needs an underlay of 1550; the underlay carries 1500" in error["message"]
        assert "lower the profile's mtu to 1450" in error["message"]
        assert plan.device_of("default") not in links(bed, "h1", "sc")
        assert "ov.sc" not in table(bed, "h1").get("chains", set())
    finally:
        helper(bed, "h1", "teardown", "sc")
    # A route to the peer with an MTU of its own, lower: sa's overlay no longer fits, and
    # the refusal changes nothing of what runs.
    nic = bed.hosts[0].spec.ifname
    route = ["ip", "route", "add", f"{h2}/32", "dev", nic, "mtu", "1480"]
    assert bed.run("h1", route).returncode == 0
    try:
        doc = wire(VNI_A, (h2, pair.b))
        error = ensure(bed, "h1", "sa", doc, ok=False)
        assert "1450 needs an underlay of 1500; the underlay carries 1480" in error["message"]
    finally:
        bed.run("h1", ["ip", "route", "del", f"{h2}/32", "dev", nic])
    assert fdb(bed, "h1", "sa", plan.device_of("default")) == {
        ("00:00:00:00:00:00", h2),
        (pair.b.mac, h2),
    }
    assert ping(bed, pair.a, pair.b.ipv4, 2).returncode == 0


def test_removing_the_overlay_then_the_session(pair: Pair) -> None:
    bed, a, b = pair.bed, pair.a, pair.b
    dev = plan.device_of("default")
    gone = ensure(bed, "h1", "sa", "[]")
    assert any(line.startswith("removed vt") for line in gone), gone
    assert dev not in links(bed, "h1", "sa")
    assert table(bed, "h1").get("chains", set()) == set()  # the table too: nothing else used it
    assert ping(bed, a, b.ipv4, 2).returncode != 0
    # The other host's session torn down: its device, FDB and filter go with it.
    assert "ov.sa" in table(bed, "h2")["chains"]
    helper(bed, "h2", "teardown", "sa")
    assert table(bed, "h2") == {}
    assert names.session_netns("sa") not in bed.inventory("h2").namespaces


def test_the_hosts_cleanup_finds_a_filter_without_its_namespace(pair: Pair) -> None:
    """A teardown killed between the namespace and the filter leaves a chain: the host's
    cleanup (what the bed's destroy runs) finds its session there and removes it."""
    bed = pair.bed
    script = plan.filter_script("zz", [])
    assert bed.run("h2", ["nft", "-f", "-"], input=script).returncode == 0
    assert table(bed, "h2")["chains"] == {"ov.zz"}
    done = bed.run("h2", [sys.executable, "-m", "vnic.lab.hostclean"])
    assert done.returncode == 0, done.stderr
    assert table(bed, "h2") == {}
