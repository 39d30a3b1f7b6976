"""The nftables port guard script, rendered from a plan without root."""

from __future__ import annotations

from vnic.dataplane.nft import render
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan.compile import compile_plan
from vnic.plan.model import Devices, Identity

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
    assert 'iifname "vhabc" jump vm_vhabc comment "vnic:lab/web"' in script
    assert "dscp set" not in script


def test_dscp_mark_rewrites_both_families() -> None:
    script = render(guard_for(egress={"dscp_mark": "ef"}))
    assert "ip dscp set 46" in script and "ip6 dscp set 46" in script
    # Marking comes after the spoof checks: a spoofed frame is never re-marked and passed.
    assert script.index("spoof-ipv6") < script.index("dscp set")
