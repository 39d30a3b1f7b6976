"""The nftables port guard script, rendered from a plan without root."""

from __future__ import annotations

from vnic.dataplane.nft import DROP_REASONS, expected_rules, guard_in, render
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan.compile import compile_plan
from vnic.plan.model import Devices, Identity, eui64_link_local

IDENT = Identity(
    mac="02:00:00:00:00:07", ipv4="10.0.1.7", ipv6="fd76:6e00:1::7", tag="vnic:lab/web"
)


def guard_for(**doc: object):  # type: ignore[no-untyped-def]
    spec = parse_profile_document({"name": "g", **doc})
    plan = compile_plan(
        complete([Layer("session-default", "g", spec.values)]).profile,
        Devices("vhabc", "viabc"),
        IDENT,
    )
    assert plan.guard is not None
    return plan.guard


def test_guard_drops_foreign_sources_and_jumps_by_owner_tag() -> None:
    script = render(guard_for())
    assert "ether saddr != 02:00:00:00:00:07 counter drop" in script
    assert "ip saddr != 10.0.1.7 counter drop" in script
    assert "fd76:6e00:1::7" in script
    assert "fe80::ff:fe00:7" in script
    assert 'iifname "vhabc" jump vm_vhabc comment "vnic:lab/web"' in script
    assert "dscp set" not in script


def test_dscp_mark_rewrites_both_families() -> None:
    script = render(guard_for(egress={"dscp_mark": "ef"}))
    assert "ip dscp set 46" in script and "ip6 dscp set 46" in script
    # Marking comes after the spoof checks: a spoofed frame is never re-marked and passed.
    assert script.index("spoof-ipv6") < script.index("dscp set")


def test_link_local_is_the_modified_eui64_of_the_mac() -> None:
    assert eui64_link_local("02:00:00:00:00:07") == "fe80::ff:fe00:7"
    # the universal/local bit flips both ways (QEMU's default MAC range)
    assert eui64_link_local("52:54:00:12:34:56") == "fe80::5054:ff:fe12:3456"
    assert IDENT.link_local == "fe80::ff:fe00:7"


def test_ipv6_sources_are_the_vms_own_not_any_link_local() -> None:
    script = render(guard_for())
    assert "fe80::/10" not in script
    assert "ip6 saddr != { ::, fe80::ff:fe00:7, fd76:6e00:1::7 } counter drop" in script
    # :: only for duplicate address detection and listener reports
    assert "ip6 saddr :: meta l4proto != ipv6-icmp counter drop" in script
    assert (
        "ip6 saddr :: icmpv6 type != { mld-listener-report, mld2-listener-report,"
        " nd-neighbor-solicit } counter drop"
    ) in script


def test_router_messages_vlan_tags_and_foreign_neighbour_claims_are_dropped() -> None:
    script = render(guard_for())
    assert "icmpv6 type { nd-router-advert, nd-redirect } counter drop" in script
    assert "ether type { 8021q, 8021ad, 0x9100 } counter drop" in script
    own = "{ 0xfe80000000000000000000fffe000007, 0xfd766e00000100000000000000000007 }"
    assert f"icmpv6 type nd-neighbor-advert @th,64,128 != {own} counter drop" in script
    assert f"ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 != {own}" in script
    # the link-layer option: type (2 target, 1 source), length 1, the VM's MAC
    assert "nd-neighbor-advert ip6 length 32 @th,192,64 != 0x0201020000000007" in script
    assert "nd-neighbor-solicit ip6 length 32 @th,192,64 != 0x0101020000000007" in script
    assert "nd-router-solicit ip6 length 16 @th,64,64 != 0x0101020000000007" in script
    # router solicitations themselves pass: no rule drops them by type alone
    assert "icmpv6 type nd-router-solicit counter drop" not in script
    # the VLAN check comes before every check a tag would hide
    assert script.index("spoof-vlan") < script.index("spoof-arp")


def test_every_drop_is_counted_by_a_known_reason_and_read_back_in_order() -> None:
    guard = guard_for(egress={"dscp_mark": "af41"})
    drops = [line for line in render(guard).splitlines() if " drop " in line]
    reasons = [line.rsplit('comment "', 1)[1].rstrip('"') for line in drops]
    assert all(" counter drop " in line for line in drops)
    assert set(reasons) == set(DROP_REASONS)
    want = expected_rules(guard)
    assert [reason for reason, _ in want] == [*reasons, "dscp-mark", "dscp-mark"]


def test_raw_payload_values_read_back_as_addresses_and_hex() -> None:
    """Two rules as nft 1.0.6 lists them in JSON (128-bit values in hex, 64-bit as numbers)."""
    target = {"payload": {"base": "th", "offset": 64, "len": 128}}
    option = {"payload": {"base": "th", "offset": 192, "len": 64}}
    na = {"payload": {"protocol": "icmpv6", "field": "type"}}
    own = ["0xfd766e00000100000000000000000007", "0xfe80000000000000000000fffe000007"]
    table = {
        "vm_vhabc": [
            {
                "comment": "spoof-nd",
                "expr": [
                    {"match": {"op": "==", "left": na, "right": "nd-neighbor-advert"}},
                    {"match": {"op": "!=", "left": target, "right": {"set": own}}},
                ],
            },
            {
                "comment": "spoof-nd",
                "expr": [
                    {"match": {"op": "==", "left": na, "right": "nd-neighbor-advert"}},
                    {"match": {"op": "!=", "left": option, "right": 144398862075822087}},
                ],
            },
        ]
    }
    rules = guard_in(table, "vm_vhabc", "vnic:lab/web").rules
    assert rules == (
        ("spoof-nd", "nd-neighbor-advert != fd76:6e00:1::7,fe80::ff:fe00:7"),
        ("spoof-nd", "nd-neighbor-advert != 0x0201020000000007"),
    )
    assert rules[0] in expected_rules(guard_for())
