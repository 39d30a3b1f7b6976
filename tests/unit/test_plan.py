"""compile_plan from tables: no root, no kernel."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan.compile import (
    DEFAULT_MINOR,
    ETH_P_IP,
    ETH_P_IPV6,
    MATCH_ALL,
    compile_plan,
    match_keys,
    port_prefixes,
)
from vnic.plan.model import Devices, U32Match

DEV = Devices(port="vh1", ifb="vi1")


def plan_for(**doc: object):  # type: ignore[no-untyped-def]
    spec = parse_profile_document({"name": "t", **doc})
    return compile_plan(complete([Layer("session-default", "t", spec.values)]).profile, DEV)


def test_no_rate_means_no_shaping_and_no_redirect() -> None:
    plan = plan_for(tcp={"sack": False})
    assert not plan.egress.shaped and not plan.ingress.shaped
    assert plan.redirect is None
    assert [(s.key, s.value) for s in plan.sysctls] == [("net.ipv4.tcp_sack", "0")]


def test_each_direction_lands_on_its_device_with_rates_in_bytes() -> None:
    plan = plan_for(egress={"rate": "10Mbit"}, ingress={"rate": "1Gbit", "queue": "100pkt"})
    assert plan.egress.device == "vi1" and plan.ingress.device == "vh1"
    assert plan.redirect is not None and (plan.redirect.device, plan.redirect.target) == (
        "vh1",
        "vi1",
    )
    root, default = plan.egress.classes
    assert (root.minor, root.rate, root.ceil) == (1, 1_250_000, 1_250_000)
    assert (default.minor, default.parent_minor, default.rate, default.ceil) == (
        DEFAULT_MINOR,
        1,
        1_250_000,
        1_250_000,
    )
    assert root.burst == 3000 and root.quantum == 1514  # derived burst: 2 MTUs at 10 Mbit/s
    assert plan.ingress.classes[0].burst == 31_250  # 250 us at 1 Gbit/s
    (egress_leaf,) = plan.egress.leaves
    assert (egress_leaf.kind, egress_leaf.limit) == ("bfifo", 62_500)  # 50 ms at 10 Mbit/s
    assert (plan.ingress.leaves[0].kind, plan.ingress.leaves[0].limit) == ("pfifo", 100)


def test_qos_classes_get_guarantees_and_the_rest_goes_to_default() -> None:
    plan = plan_for(
        egress={"rate": "1Mbit"},
        qos={
            "egress": [
                {
                    "name": "voice",
                    "priority": 0,
                    "guaranteed": "256kbit",
                    "match": {"dscp": ["ef"]},
                },
                {"name": "bulk", "priority": 7, "guaranteed": "128kbit", "ceiling": "512kbit"},
            ]
        },
    )
    rates = {c.minor: (c.rate, c.ceil, c.prio) for c in plan.egress.classes}
    assert rates == {
        1: (125_000, 125_000, 0),
        0x10: (32_000, 125_000, 0),
        0x11: (16_000, 64_000, 7),
        DEFAULT_MINOR: (77_000, 125_000, 7),
    }
    voice = [f for f in plan.egress.filters if f.class_minor == 0x10]
    assert {(f.protocol, f.matches) for f in voice} == {
        (ETH_P_IP, (U32Match(46 << 18, 0x00FC0000, 0),)),
        (ETH_P_IPV6, (U32Match(46 << 22, 0x0FC00000, 0),)),
    }
    # A class without a match is a catch-all, tried after the classes before it.
    bulk = [f for f in plan.egress.filters if f.class_minor == 0x11]
    assert {(f.protocol, f.matches) for f in bulk} == {
        (ETH_P_IP, (MATCH_ALL,)),
        (ETH_P_IPV6, (MATCH_ALL,)),
    }
    assert min(f.prio for f in bulk) > max(f.prio for f in voice)


def test_match_combines_keys_per_filter_and_alternatives_across_filters() -> None:
    spec = parse_profile_document(
        {
            "name": "m",
            "egress": {"rate": "10Mbit"},
            "qos": {
                "egress": [
                    {
                        "name": "web",
                        "guaranteed": "1Mbit",
                        "match": {"protocol": ["tcp"], "ports": [443], "networks": ["10.1.0.0/16"]},
                    },
                ]
            },
        }
    )
    (cls,) = spec.values["qos.egress"]
    filters = list(match_keys(cls.match, "egress"))
    assert all(proto == ETH_P_IP for proto, _ in filters)
    assert {keys for _, keys in filters} == {
        (
            U32Match(6 << 16, 0x00FF0000, 8),
            U32Match(0x0A010000, 0xFFFF0000, 16),
            U32Match(443 << 16, 0xFFFF0000, 20),
        ),
        (
            U32Match(6 << 16, 0x00FF0000, 8),
            U32Match(0x0A010000, 0xFFFF0000, 16),
            U32Match(443, 0xFFFF, 20),
        ),
    }
    ingress = list(match_keys(cls.match, "ingress"))
    assert all(
        U32Match(0x0A010000, 0xFFFF0000, 12) in keys for _, keys in ingress
    )  # remote = source


def test_ipv6_network_becomes_word_keys() -> None:
    spec = parse_profile_document(
        {
            "name": "m",
            "ingress": {"rate": "10Mbit"},
            "qos": {
                "ingress": [
                    {"name": "v6", "guaranteed": "1Mbit", "match": {"networks": ["2001:db8::/32"]}},
                ]
            },
        }
    )
    (cls,) = spec.values["qos.ingress"]
    ((proto, keys),) = match_keys(cls.match, "ingress")
    assert proto == ETH_P_IPV6 and keys == (U32Match(0x20010DB8, 0xFFFFFFFF, 8),)
    assert ipaddress.ip_network("2001:db8::/32").prefixlen == 32


@given(st.integers(1, 65535), st.integers(0, 2000))
def test_port_prefixes_cover_the_range_exactly(first: int, span: int) -> None:
    last = min(65535, first + span)
    covered = set()
    for value, mask in port_prefixes(first, last):
        assert value & ~mask & 0xFFFF == 0
        size = (~mask & 0xFFFF) + 1
        block = set(range(value, value + size))
        assert not covered & block
        covered |= block
    assert covered == set(range(first, last + 1))


def test_tcp_settings_become_sysctls_and_congestion_control() -> None:
    plan = plan_for(
        tcp={
            "congestion_control": "cubic",
            "window_scaling": False,
            "timestamps": True,
            "ecn": "on",
        }
    )
    assert plan.congestion_control == "cubic"
    assert {(s.key, s.value) for s in plan.sysctls} == {
        ("net.ipv4.tcp_window_scaling", "0"),
        ("net.ipv4.tcp_timestamps", "1"),
        ("net.ipv4.tcp_ecn", "1"),
    }
