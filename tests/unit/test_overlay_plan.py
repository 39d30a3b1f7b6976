"""The overlay's pure parts: the manager's list form parsed and bounded (each bad field
named), the names the data plane gives its objects, the filter's nft script, the MTU
refusal with its numbers."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from vnic.dataplane.inventory import vm_of_tag
from vnic.errors import InvalidInput
from vnic.plan import overlay as plan
from vnic.plan.overlay import Overlay, overlays_from_wire


def doc(**changes: Any) -> dict[str, Any]:
    return {
        "network": "default",
        "vni": 7,
        "peers": ["10.250.0.12"],
        "macs": {"52:54:00:00:00:02": "10.250.0.12"},
        **changes,
    }


def test_the_list_form_parses() -> None:
    (o,) = overlays_from_wire("lab", [doc(peers=["10.250.0.12", "10.250.0.12", "10.250.0.13"])])
    assert o.peers == (ipaddress.ip_address("10.250.0.12"), ipaddress.ip_address("10.250.0.13"))
    assert o.device == plan.device_of("default") and len(o.device) <= 15
    assert overlays_from_wire("lab", []) == []
    assert overlays_from_wire("lab", [doc(macs={})])[0].macs == ()
    assert o.to_wire() == doc(peers=["10.250.0.12", "10.250.0.13"])
    assert overlays_from_wire("lab", [o.to_wire()]) == [o]


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"x": 1}, "overlays"),
        ([doc(vni=0)], "overlays[0].vni"),
        ([doc(vni=2**24)], "overlays[0].vni"),
        ([doc(vni=True)], "overlays[0].vni"),
        ([doc(network="Bad Name")], "overlays[0].network"),
        ([doc(peers=["10.250.0.12", "x"])], "overlays[0].peers[1]"),
        ([doc(peers=["224.0.0.1"])], "overlays[0].peers[0]"),
        ([doc(peers="10.250.0.12")], "overlays[0].peers"),
        ([doc(macs={"zz": "10.250.0.12"})], "overlays[0].macs"),
        ([doc(macs={"01:00:5e:00:00:01": "10.250.0.12"})], "overlays[0].macs"),
        ([doc(macs={"52:54:00:00:00:02": "10.250.0.99"})], "overlays[0].macs.52:54:00:00:00:02"),
        ([doc(extra=1)], "overlays[0].extra"),
        (["x"], "overlays[0]"),
        ([doc(), doc(vni=8)], "overlays.network"),
        ([doc(), doc(network="data")], "overlays.vni"),
        ([doc(network=f"n{i}", vni=i + 1) for i in range(plan.MAX_NETWORKS + 1)], "overlays"),
        ([doc(peers=[f"10.1.{i // 250}.{i % 250 + 1}" for i in range(plan.MAX_PEERS + 1)])],
         "overlays[0].peers"),
    ],
)  # fmt: skip
def test_a_bad_document_names_its_field(value: Any, path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        overlays_from_wire("lab", value)
    assert caught.value.paths == [path]


def test_a_bad_session_name_is_refused() -> None:
    with pytest.raises(InvalidInput, match="session"):
        overlays_from_wire("Not.A.Session", [])


def test_names_are_the_sessions_own() -> None:
    alias = plan.alias_of("lab", "default")
    assert alias == "vnic:lab/net:default"
    assert vm_of_tag(alias, "lab") is None  # never taken for a VM's object
    assert plan.network_of_alias(alias, "lab") == "default"
    assert plan.network_of_alias(alias, "la") is None
    assert plan.network_of_alias("vnic:lab/a", "lab") is None
    assert plan.is_set_of("ov.lab.7.4", "lab")
    assert not plan.is_set_of("ov.lab-x.7.4", "lab") and not plan.is_set_of("ov.lab.7", "lab")
    assert plan.device_of("default") != plan.device_of("data")


def test_the_filter_script() -> None:
    o = Overlay(
        "lab",
        "default",
        7,
        (ipaddress.ip_address("10.250.0.12"), ipaddress.ip_address("10.250.0.13")),
    )
    script = plan.filter_script("lab", [o])
    assert "add chain inet vnic-overlay ov.lab { type filter hook input priority" in script
    assert "flush chain inet vnic-overlay ov.lab" in script
    assert "add element inet vnic-overlay ov.lab.7.4 { 10.250.0.12, 10.250.0.13 }" in script
    assert "udp dport 4789 @th,96,24 7 ip saddr != @ov.lab.7.4 counter drop" in script
    assert "ip6 saddr != @ov.lab.7.6 counter drop" in script  # no IPv6 peer: all dropped
    assert "add element inet vnic-overlay ov.lab.7.6" not in script
    assert plan.stale_sets("lab", ["ov.lab.7.4", "ov.lab.9.4", "ov.other.9.4"], [o]) == [
        "ov.lab.9.4"
    ]


def test_the_mtu_refusal_says_the_numbers() -> None:
    error = plan.mtu_error(1500, 1500, 4, "overlays[0].mtu")
    assert error.paths == ["overlays[0].mtu"]
    assert (
        "1500 needs an underlay of 1550; the underlay carries 1500: lower the profile's mtu "
        "to 1450 or raise the underlay's" in str(error)
    )
    assert "needs an underlay of 1570" in str(plan.mtu_error(1500, 1500, 6))
    with pytest.raises(InvalidInput, match=r"overlays\[0\]\.peers\[0\]"):
        plan.check_family(
            [Overlay("lab", "default", 7, (ipaddress.ip_address("fd00:250::12"),))],
            ipaddress.ip_address("10.250.0.11"),
        )
