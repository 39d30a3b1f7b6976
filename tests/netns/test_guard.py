"""Host-side port guard: spoofed frames dropped and counted; DSCP marked as the receiver sees it."""

from __future__ import annotations

import json

from tests.netns.conftest import Lab
from vnic.dataplane import names
from vnic.dataplane import namespaces as nsops
from vnic.measure import ping


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
