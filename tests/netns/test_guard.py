"""Host-side port guard: spoofed frames (IPv4, ARP, IPv6, neighbour discovery, router
advertisements, VLAN tags) dropped and counted; DSCP marked as the receiver sees it."""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.netns import frames
from tests.netns.conftest import Lab
from tests.netns.test_qemu_driver import GuestLab, glab  # noqa: F401 - the guest lab fixture
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import nft, vmexec
from vnic.drivers.qemu import QemuDriver
from vnic.lab.measure import ping
from vnic.manager.results import Explanation, VmRequest
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.model import eui64_link_local


def test_own_addresses_pass_both_families(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    lab.launch(s, "a")
    b = lab.launch(s, "b")
    assert b.vm.ipv4 and b.vm.ipv6
    assert ping(s, "a", b.vm.ipv4, count=2)
    assert ping(s, "a", b.vm.ipv6, count=2)
    assert set(lab.driver.drop_counters(s, "a").values()) == {0}


def test_changed_mac_is_dropped_and_counted(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    lab.launch(s, "a")
    b = lab.launch(s, "b")
    assert b.vm.ipv4
    assert b.vm.mac
    # A static neighbour entry: every echo request leaves at once, no ARP needed.
    lab.exec(s, "a", "ip", "neigh", "replace", b.vm.ipv4, "lladdr", b.vm.mac, "dev", "eth0")
    lab.exec(s, "a", "ip", "link", "set", "eth0", "address", "02:66:66:66:66:66")
    assert ping(s, "a", b.vm.ipv4, count=6, timeout=0.5) == []
    assert lab.driver.drop_counters(s, "a")["spoof-mac"] >= 3


def test_spoofed_source_ip_is_dropped_and_counted(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    lab.launch(s, "a")
    b = lab.launch(s, "b")
    c = lab.launch(s, "c")
    assert b.vm.ipv4 and c.vm.ipv4
    assert b.vm.mac
    # VM a pretends to be VM c (a static neighbour entry avoids ARP).
    lab.exec(s, "a", "ip", "neigh", "replace", b.vm.ipv4, "lladdr", b.vm.mac, "dev", "eth0")
    lab.exec(s, "a", "ip", "addr", "add", f"{c.vm.ipv4}/32", "dev", "eth0")
    proc = nsops.run(
        names.vm_netns(s, "a"),
        ["ping", "-n", "-c", "6", "-i", "0.2", "-W", "0.5", "-I", c.vm.ipv4, b.vm.ipv4],
        capture_output=True,
        timeout=15,
    )
    assert " 0 received" in proc.stdout
    counters = lab.driver.drop_counters(s, "a")
    assert counters["spoof-ipv4"] >= 3, counters


def test_dscp_mark_is_what_the_receiver_sees(lab: Lab) -> None:
    lab.profile(name="marked", egress={"rate": "100Mbit", "dscp_mark": "af41"})
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    lab.launch(s, "src", profile="marked")
    dst = lab.launch(s, "dst")
    assert dst.vm.ipv4
    # The receiver counts ICMP echo requests by DSCP in its own namespace.
    rules = (
        "add table inet seen\n"
        "add chain inet seen in { type filter hook input priority 0; }\n"
        'add rule inet seen in icmp type echo-request ip dscp af41 counter comment "af41"\n'
        'add rule inet seen in icmp type echo-request ip dscp != af41 counter comment "other"\n'
    )
    nsops.run(names.vm_netns(s, "dst"), ["nft", "-f", "-"], input=rules, check=True, timeout=10)
    assert len(ping(s, "src", dst.vm.ipv4, count=4)) == 4
    listing = json.loads(lab.exec(s, "dst", "nft", "-j", "list", "chain", "inet", "seen", "in"))
    seen = {
        r["rule"]["comment"]: next(
            e["counter"]["packets"] for e in r["rule"]["expr"] if "counter" in e
        )
        for r in listing["nftables"]
        if "rule" in r
    }
    assert seen == {"af41": 4, "other": 0}


# ----------------------------------------------------------------------------- IPv6 and VLANs
#
# Each attack is sent by VM a as hand-made frames from a raw socket, with a's own MAC
# (so the MAC check alone would not stop it). Each test then lifts a's guard and sends
# the same frames again, to show they do what they claim when nothing stops them, and
# puts the guard back as a live change does, with no drift left.


def _vm(explanation: Explanation) -> tuple[str, str, str, str]:
    """(MAC, IPv4, IPv6, link-local) of a launched VM."""
    vm = explanation.vm
    assert vm.mac and vm.ipv4 and vm.ipv6
    return vm.mac, vm.ipv4, vm.ipv6, eui64_link_local(vm.mac)


def _request(lab: Lab, session: str, vm: str) -> LaunchRequest:
    return next(r for _, r in lab.service.desired() if (r.session, r.vm) == (session, vm))


@contextmanager
def _guard_lifted(lab: Lab, session: str, vm: str) -> Iterator[None]:
    """The VM's guard chain emptied (frames from it pass unchecked), then refilled from its
    plan as a live change does; afterwards the kernel is what the desired state says."""
    request = _request(lab, session, vm)
    guard = lab.driver.plan_for(request).guard
    assert guard is not None
    session_ns = names.session_netns(session)
    nsops.run(
        session_ns,
        ["nft", "flush", "chain", "bridge", nft.TABLE, guard.chain],
        check=True,
        timeout=10,
    )
    assert lab.driver.drift(request) != []
    try:
        yield
    finally:
        nft.rewrite_guard(session_ns, guard)
    assert lab.driver.drift(request) == []


def _marker() -> bytes:
    return f"vnic-guard-{uuid.uuid4().hex[:8]}".encode()


def _end_frame(mac: str, link_local: str, marker: bytes) -> bytes:
    """A UDP datagram to all nodes from the VM's own link-local: passes the guard, and
    arrives after every frame sent before it."""
    packet = frames.ipv6(link_local, frames.ALL_NODES, frames.UDP, frames.udp6(marker + b"-end"))
    return frames.ether(frames.ALL_NODES_MAC, mac, frames.ETH_IP6, packet)


def _send_and_wait(
    lab: Lab, session: str, sender: str, attack: list[bytes], end: bytes, marker: bytes, *at: str
) -> dict[str, list[bytes]]:
    """Send ``attack`` then ``end`` from ``sender``; the frames carrying ``marker`` that each
    VM of ``at`` received, once the end frame reached it."""
    listeners = {vm: frames.Listener(session, vm, marker) for vm in at}
    frames.send(session, sender, [*attack, end])
    seen = {}
    for vm, listener in listeners.items():
        ended, got = listener.result()
        assert ended, f"the end frame never reached {vm}"
        seen[vm] = got
    return seen


def _neighbour(lab: Lab, session: str, vm: str, address: str) -> str | None:
    """The link-layer address in the VM's neighbour entry for ``address``."""
    for entry in json.loads(lab.exec(session, vm, "ip", "-j", "neigh", "show", "dev", "eth0")):
        if entry.get("dst") == address:
            return entry.get("lladdr")
    return None


def _counters(lab: Lab, session: str, vm: str) -> dict[str, int]:
    return {k: v for k, v in lab.driver.drop_counters(session, vm).items() if v}


def _snmp6(session: str, vm: str, key: str) -> int:
    """A counter of the VM's (or guest's) /proc/net/snmp6."""
    proc = vmexec.run(session, vm, ["cat", "/proc/net/snmp6"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise AssertionError(f"{key} not in /proc/net/snmp6 of {session}/{vm}")


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _link_local_usable(session: str, vm: str) -> bool:
    """Whether the netns VM's link-local address finished duplicate address detection (until
    then the kernel drops what is sent to it)."""
    proc = vmexec.run(session, vm, ["ip", "-j", "-6", "addr", "show", "dev", "eth0"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return any(
        i.get("scope") == "link" and not i.get("tentative")
        for a in json.loads(proc.stdout)
        for i in a.get("addr_info", [])
    )


def test_neighbour_advert_for_another_vm_does_not_poison(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    a_mac, _, a_ip6, a_ll = _vm(lab.launch(s, "a"))
    b_mac, _, b_ip6, _ = _vm(lab.launch(s, "b"))
    c_mac, _, c_ip6, _ = _vm(lab.launch(s, "c"))
    assert ping(s, "c", b_ip6, count=2)
    assert _neighbour(lab, s, "c", b_ip6) == b_mac

    def na(src: str, dst: str, dst_mac: str, body: bytes, tags: tuple[int, ...] = ()) -> bytes:
        packet = frames.ipv6(src, dst, frames.ICMP6, body)
        return frames.ether(dst_mac, a_mac, frames.ETH_IP6, packet, tags)

    claim_b = frames.neighbour_advert(b_ip6, a_mac)
    poison = na(a_ll, frames.ALL_NODES, frames.ALL_NODES_MAC, claim_b)
    attack = [
        poison,
        # the same to c alone, from a's global address
        na(a_ip6, c_ip6, c_mac, claim_b),
        # a's own address at b's MAC: c's frames for a would go to b
        na(a_ll, frames.ALL_NODES, frames.ALL_NODES_MAC, frames.neighbour_advert(a_ip6, b_mac)),
        # a's own address, but a nonce option first and a second target address after it
        na(
            a_ll,
            frames.ALL_NODES,
            frames.ALL_NODES_MAC,
            frames.neighbour_advert(
                b_ip6, a_mac, options=bytes([14, 1]) + bytes(6) + frames.lladdr_option(2, a_mac)
            ),
        ),
        # the poisoning NA in an 802.1Q tag
        na(a_ll, frames.ALL_NODES, frames.ALL_NODES_MAC, claim_b, (frames.ETH_8021Q,)),
    ]
    marker = _marker()
    end = _end_frame(a_mac, a_ll, marker)
    _send_and_wait(lab, s, "a", attack, end, marker, "c")
    assert _neighbour(lab, s, "c", b_ip6) == b_mac
    assert ping(s, "c", b_ip6, count=2)
    assert _counters(lab, s, "a") == {"spoof-nd": 4, "spoof-vlan": 1}

    # Unguarded, the first of them takes c's traffic for b to a.
    with _guard_lifted(lab, s, "a"):
        _send_and_wait(lab, s, "a", [poison], end, marker, "c")
        assert _neighbour(lab, s, "c", b_ip6) == a_mac


def test_rogue_router_advert_and_redirect_are_dropped(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    a_mac, _, _, a_ll = _vm(lab.launch(s, "a"))
    _, _, b_ip6, _ = _vm(lab.launch(s, "b"))
    c_mac, _, _, c_ll = _vm(lab.launch(s, "c"))
    # b and c take router advertisements as the kernel's defaults have it.
    for vm in ("b", "c"):
        vm_ns = names.vm_netns(s, vm)
        for key, want in (("accept_ra", "1"), ("forwarding", "0"), ("autoconf", "1")):
            assert nsops.read_sysctl(vm_ns, f"net.ipv6.conf.eth0.{key}") == want, (vm, key)
    prefix = "fd99:6e00:7::/64"

    def from_a(
        dst: str, dst_mac: str, body: bytes, tags: tuple[int, ...] = (), hbh: bool = False
    ) -> bytes:
        packet = frames.ipv6(a_ll, dst, frames.ICMP6, body, hop_by_hop=hbh)
        return frames.ether(dst_mac, a_mac, frames.ETH_IP6, packet, tags)

    advert = from_a(frames.ALL_NODES, frames.ALL_NODES_MAC, frames.router_advert(prefix, a_mac))
    attack = [
        advert,
        from_a(
            frames.ALL_NODES,
            frames.ALL_NODES_MAC,
            frames.router_advert(prefix, a_mac),
            (frames.ETH_8021Q,),
        ),
        # behind a Hop-by-Hop options header
        from_a(
            frames.ALL_NODES, frames.ALL_NODES_MAC, frames.router_advert(prefix, a_mac), hbh=True
        ),
        from_a(c_ll, c_mac, frames.redirect(a_ll, b_ip6)),
    ]
    marker = _marker()
    end = _end_frame(a_mac, a_ll, marker)

    def taken(vm: str) -> bool:
        """Whether the VM has an address in the rogue prefix or a default route via a."""
        addrs = json.loads(lab.exec(s, vm, "ip", "-j", "-6", "addr", "show", "dev", "eth0"))
        local = [i["local"] for a in addrs for i in a.get("addr_info", [])]
        in_prefix = any(ipaddress.IPv6Address(x) in ipaddress.IPv6Network(prefix) for x in local)
        routes = json.loads(lab.exec(s, vm, "ip", "-j", "-6", "route", "show", "default"))
        return in_prefix or any(r.get("gateway") == a_ll for r in routes)

    _send_and_wait(lab, s, "a", attack, end, marker, "b", "c")
    assert not taken("b") and not taken("c")
    assert _counters(lab, s, "a") == {"spoof-router": 3, "spoof-vlan": 1}

    # Unguarded, the advertisement gives both an address and a default route via a.
    with _guard_lifted(lab, s, "a"):
        _send_and_wait(lab, s, "a", [advert], end, marker, "b", "c")
        _wait_until(lambda: taken("b") and taken("c"))


def test_another_vms_link_local_is_not_a_source(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    a_mac, _, _, a_ll = _vm(lab.launch(s, "a"))
    _, _, _, b_ll = _vm(lab.launch(s, "b"))
    c_mac, _, _, c_ll = _vm(lab.launch(s, "c"))
    marker = _marker()

    def to_c(src: str, payload: bytes, next_header: int = frames.ICMP6) -> bytes:
        packet = frames.ipv6(src, c_ll, next_header, payload)
        return frames.ether(c_mac, a_mac, frames.ETH_IP6, packet)

    attack = [
        to_c(b_ll, frames.echo6(marker)),  # as b
        to_c("fe80::1:2:3:4", frames.echo6(marker)),  # a link-local nobody has
        to_c("::", frames.echo6(marker)),  # unspecified: only for DAD and listener reports
        to_c("::", frames.udp6(marker), frames.UDP),
    ]
    end = to_c(a_ll, frames.echo6(marker + b"-end"))
    _wait_until(lambda: _link_local_usable(s, "c"))
    echos = _snmp6(s, "c", "Icmp6InEchos")
    seen = _send_and_wait(lab, s, "a", attack, end, marker, "c")
    assert seen["c"] == [end]
    assert _snmp6(s, "c", "Icmp6InEchos") == echos + 1  # a's own echo only
    assert _counters(lab, s, "a") == {"spoof-ipv6": 4}

    with _guard_lifted(lab, s, "a"):
        seen = _send_and_wait(lab, s, "a", attack, end, marker, "c")
        assert seen["c"] == [*attack, end]


def test_vlan_tagged_frames_are_dropped_and_counted(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    a_mac, a_ip4, _, _ = _vm(lab.launch(s, "a"))
    b_mac, b_ip4, _, _ = _vm(lab.launch(s, "b"))
    c_mac, c_ip4, _, _ = _vm(lab.launch(s, "c"))
    assert ping(s, "b", c_ip4, count=1)
    assert _neighbour(lab, s, "b", c_ip4) == c_mac
    marker = _marker()

    def to_b(src: str, tags: tuple[int, ...], mark: bytes = marker) -> bytes:
        return frames.ether(b_mac, a_mac, frames.ETH_IP, frames.ipv4_echo(src, b_ip4, mark), tags)

    arp = frames.arp_reply(a_mac, c_ip4, b_mac, b_ip4)  # "c's address is at a's MAC"
    attack = [
        to_b(c_ip4, (frames.ETH_8021Q,)),  # as c, in an 802.1Q tag
        to_b(c_ip4, (frames.ETH_8021AD,)),  # as c, in an 802.1ad tag
        to_b(a_ip4, (frames.ETH_8021AD, frames.ETH_8021Q)),  # its own address, in QinQ
        frames.ether(b_mac, a_mac, frames.ETH_ARP, arp, (frames.ETH_8021Q,)),
    ]
    end = to_b(a_ip4, (), marker + b"-end")
    seen = _send_and_wait(lab, s, "a", attack, end, marker, "b")
    assert seen["b"] == [end]
    assert _neighbour(lab, s, "b", c_ip4) == c_mac
    assert _counters(lab, s, "a") == {"spoof-vlan": 4}

    # Unguarded, the tagged echo requests reach b (its kernel takes the tags off).
    with _guard_lifted(lab, s, "a"):
        seen = _send_and_wait(lab, s, "a", attack, end, marker, "b")
        assert len(seen["b"]) == 4 and seen["b"][-1] == end


def test_guard_behind_the_delay_engine_drops_the_same(lab: Lab) -> None:
    """With a delay, the guard sits on the relay's bridge end, after the engine: a rogue
    RA, an NA for b and a tagged spoofed IPv4 frame from a still go no further."""
    lab.profile(name="slow", egress={"rate": "100Mbit", "delay": "1ms"})
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    a_mac, _, _, a_ll = _vm(lab.launch(s, "a", profile="slow"))
    assert lab.driver.plan_for(_request(lab, s, "a")).engine is not None
    b_mac, b_ip4, b_ip6, _ = _vm(lab.launch(s, "b"))
    _, c_ip4, _, _ = _vm(lab.launch(s, "c"))
    assert ping(s, "c", b_ip6, count=2)
    marker = _marker()

    def from_a(body: bytes) -> bytes:
        packet = frames.ipv6(a_ll, frames.ALL_NODES, frames.ICMP6, body)
        return frames.ether(frames.ALL_NODES_MAC, a_mac, frames.ETH_IP6, packet)

    spoofed = frames.ipv4_echo(c_ip4, b_ip4, marker)
    attack = [
        from_a(frames.router_advert("fd99:6e00:8::/64", a_mac)),
        from_a(frames.neighbour_advert(b_ip6, a_mac)),
        frames.ether(b_mac, a_mac, frames.ETH_IP, spoofed, (frames.ETH_8021Q,)),
    ]
    end = _end_frame(a_mac, a_ll, marker)
    seen = _send_and_wait(lab, s, "a", attack, end, marker, "b", "c")
    assert seen["b"] == [end]
    assert _neighbour(lab, s, "c", b_ip6) == b_mac
    routes = json.loads(lab.exec(s, "b", "ip", "-j", "-6", "route", "show", "default"))
    assert routes == []
    counters = _counters(lab, s, "a")
    # The engine's raw socket takes a tag off as the port's kernel hands it over: the
    # tagged frame reaches the guard untagged, and its IPv4 source check drops it.
    assert counters == {"spoof-router": 1, "spoof-nd": 1, "spoof-ipv4": 1}, counters


def test_legitimate_ipv6_and_neighbour_discovery_pass(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "100Mbit"})
    s = lab.session(default="p")
    vms = {name: _vm(lab.launch(s, name)) for name in ("a", "b", "c")}
    # Every VM's start-up IPv6: DAD of its link-local (from ::), listener reports, and a
    # router solicitation once the link-local is usable.
    for name in vms:
        _wait_until(lambda n=name: _snmp6(s, n, "Icmp6OutRouterSolicits") >= 1)
        assert _snmp6(s, name, "Icmp6OutNeighborSolicits") >= 1
    b_mac, _, b_ip6, b_ll = vms["b"]
    assert ping(s, "a", b_ip6, count=2)
    assert ping(s, "a", f"{b_ll}%eth0", count=2)
    # Resolution afresh: c's solicitation and b's advertisement both pass.
    lab.exec(s, "c", "ip", "-6", "neigh", "flush", "dev", "eth0")
    assert ping(s, "c", f"{b_ll}%eth0", count=2)
    assert ping(s, "c", b_ip6, count=2)
    assert _neighbour(lab, s, "c", b_ll) == b_mac
    assert _neighbour(lab, s, "c", b_ip6) == b_mac
    for name in vms:
        assert _counters(lab, s, name) == {}, name
        assert lab.driver.drift(_request(lab, s, name)) == []


def test_guest_ipv6_passes_the_guard_on_its_tap(glab: GuestLab) -> None:  # noqa: F811
    """A QEMU guest's own IPv6 (its EUI-64 link-local included) and start-up neighbour
    discovery pass the guard on its tap: the same rules as a namespace VM's."""
    vms = {}
    for vm, kind in (("g", "qemu"), ("n", "netns")):
        glab.service.add_vm(VmRequest(glab.session, vm))
        vms[vm] = _vm(glab.service.launch_vm(glab.session, vm, glab.agent, kind))
    s = glab.session
    _, _, g_ip6, g_ll = vms["g"]

    def guest_has_link_local() -> bool:
        # The guest's kernel adds it once eth0 has its carrier, which may come a moment
        # after the guest says it is ready (a deferred link-state update, see qemu.md).
        shown = vmexec.run(s, "g", ["ip", "-6", "addr", "show", "dev", "eth0"], timeout=30)
        return f"inet6 {g_ll}/64" in shown.stdout

    _wait_until(guest_has_link_local, timeout=30)
    _wait_until(lambda: _link_local_usable(s, "n"))
    assert ping(s, "n", g_ip6, count=2)
    assert ping(s, "n", f"{g_ll}%eth0", count=2)
    assert ping(s, "g", vms["n"][2], count=2)
    _wait_until(lambda: _snmp6(s, "g", "Icmp6OutRouterSolicits") >= 1, timeout=30)
    driver = QemuDriver()
    assert set(driver.drop_counters(s, "g").values()) == {0}
    assert glab.agent.drift() == {}
