"""diff_plans from tables: which operations a profile change makes, and only those. No root."""

from __future__ import annotations

from typing import Any

import pytest

from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan import diff
from vnic.plan.compile import DEFAULT_MINOR, compile_plan
from vnic.plan.model import Devices, Identity, Plan

DEV = Devices(port="vh1", ifb="vi1", relay="vx1", relay_port="vy1")
ID = Identity(mac="02:00:00:00:00:01", ipv4="10.0.0.2", ipv6="fd00::2", tag="vnic:s/a")
BASE: dict[str, Any] = {"egress": {"rate": "10Mbit"}, "ingress": {"rate": "20Mbit"}}
VOICE = {"name": "voice", "priority": 0, "guaranteed": "1Mbit", "match": {"dscp": ["ef"]}}
BULK = {"name": "bulk", "priority": 7, "guaranteed": "1Mbit", "match": {"protocol": ["udp"]}}


def plan(**doc: Any) -> Plan:
    spec = parse_profile_document({"name": "t", **doc})
    profile = complete([Layer("session-default", "t", spec.values)]).profile
    return compile_plan(profile, DEV, ID, engine="delayd", seed=7)


def kinds(ops: list[diff.Op]) -> list[str]:
    return [type(op).__name__ for op in ops]


# (name, old profile, new profile, expected operation kinds in order)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("nothing", BASE, BASE, []),
    (
        "egress rate",
        BASE,
        {**BASE, "egress": {"rate": "20Mbit"}},
        ["ChangeClass", "ChangeClass", "ChangeLeaf"],  # the queue follows the rate (BDP)
    ),
    (
        "both rates",
        BASE,
        {"egress": {"rate": "1Mbit"}, "ingress": {"rate": "2Mbit"}},
        ["ChangeClass", "ChangeClass", "ChangeLeaf"] * 2,
    ),
    ("burst", BASE, {**BASE, "egress": {"rate": "10Mbit", "burst": "30KB"}}, ["ChangeClass"] * 2),
    (
        "queue bytes",
        BASE,
        {**BASE, "egress": {"rate": "10Mbit", "queue": "100KB"}},
        ["ChangeLeaf"],
    ),
    (
        "queue kind",
        BASE,
        {**BASE, "egress": {"rate": "10Mbit", "queue": "100pkt"}},
        ["ReplaceLeaf"],
    ),
    (
        "qos class added",
        BASE,
        {**BASE, "qos": {"egress": [VOICE]}},
        ["AddClass", "ChangeClass", "AddLeaf", "AddFilters", "AddFilters"],
    ),
    (
        "qos class removed",
        {**BASE, "qos": {"egress": [VOICE]}},
        BASE,
        ["DeleteFilters", "DeleteFilters", "DeleteClass", "ChangeClass"],
    ),
    (
        "qos match changed: only its filters",
        {**BASE, "qos": {"egress": [VOICE, BULK]}},
        {**BASE, "qos": {"egress": [VOICE, {**BULK, "match": {"protocol": ["tcp"]}}]}},
        ["DeleteFilters", "DeleteFilters", "AddFilters", "AddFilters"],
    ),
    (
        "qos guarantee changed",
        {**BASE, "qos": {"egress": [VOICE]}},
        {**BASE, "qos": {"egress": [{**VOICE, "guaranteed": "2Mbit"}]}},
        ["ChangeClass", "ChangeClass"],
    ),
    ("sysctl set", BASE, {**BASE, "tcp": {"sack": False}}, ["SetSysctl"]),
    ("sysctl back to default", {**BASE, "tcp": {"sack": False}}, BASE, ["SetSysctl"]),
    (
        "congestion control",
        BASE,
        {**BASE, "tcp": {"congestion_control": "reno"}},
        ["SetCongestionControl"],
    ),
    ("dscp mark", BASE, {**BASE, "egress": {"rate": "10Mbit", "dscp_mark": "ef"}}, ["ChangeGuard"]),
    (
        "delay changed in the engine",
        {**BASE, "egress": {"rate": "10Mbit", "delay": "10ms"}},
        {**BASE, "egress": {"rate": "10Mbit", "delay": "40ms"}},
        ["ChangeLeaf", "ChangeEngine"],  # the queue holds the longer delay's worth
    ),
    (
        "rate under the engine: classes and the engine's limit",
        {**BASE, "egress": {"rate": "10Mbit", "delay": "10ms"}},
        {**BASE, "egress": {"rate": "30Mbit", "delay": "10ms"}},
        ["ChangeClass", "ChangeClass", "ChangeLeaf", "ChangeEngine"],
    ),
    (
        "loss added: offloads off",
        {**BASE, "egress": {"rate": "10Mbit", "delay": "10ms"}},
        {**BASE, "egress": {"rate": "10Mbit", "delay": "10ms", "loss": "1%"}},
        ["ChangeEngine", "SetOffloads"],
    ),
    (
        "delay appears: structural",
        BASE,
        {**BASE, "egress": {"rate": "10Mbit", "delay": "10ms"}},
        ["RebuildHostSide"],
    ),
    ("delay goes: structural", {**BASE, "ingress": {"delay": "5ms"}}, BASE, ["RebuildHostSide"]),
    (
        "a direction becomes shaped: structural, TCP still set",
        {"egress": {"rate": "10Mbit"}},
        {**BASE, "tcp": {"sack": False}},
        ["RebuildHostSide", "SetSysctl"],
    ),
]


@pytest.mark.parametrize(("name", "old", "new", "expected"), CASES, ids=[c[0] for c in CASES])
def test_operations(
    name: str, old: dict[str, Any], new: dict[str, Any], expected: list[str]
) -> None:
    ops = diff.diff_plans(plan(**old), plan(**new))
    assert kinds(ops) == expected
    assert all(diff.describe(op) for op in ops)


@pytest.mark.parametrize(("name", "old", "new", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reverse_undoes_and_nothing_changes_twice(
    name: str, old: dict[str, Any], new: dict[str, Any], expected: list[str]
) -> None:
    a, b = plan(**old), plan(**new)
    assert diff.diff_plans(b, b) == []
    assert bool(diff.diff_plans(b, a)) == bool(expected)


def test_rate_change_names_old_and_new_values() -> None:
    ops = diff.diff_plans(plan(**BASE), plan(**{**BASE, "egress": {"rate": "20Mbit"}}))
    first, second, leaf = ops
    assert isinstance(leaf, diff.ChangeLeaf) and leaf.new.limit == 2 * leaf.old.limit
    assert isinstance(first, diff.ChangeClass) and first.new.minor == 1
    assert isinstance(second, diff.ChangeClass) and second.new.minor == DEFAULT_MINOR
    assert diff.describe(first) == (
        "egress: class 1:1 rate 10Mbit -> 20Mbit, ceil 10Mbit -> 20Mbit on vi1"
    )


def test_engine_change_keeps_devices_and_says_what_changed() -> None:
    old = plan(**{**BASE, "egress": {"rate": "10Mbit", "delay": "10ms"}})
    new = plan(**{**BASE, "egress": {"rate": "10Mbit", "delay": "40ms"}})
    op = diff.diff_plans(old, new)[-1]
    assert isinstance(op, diff.ChangeEngine)
    assert (op.new.port, op.new.relay) == (op.old.port, op.old.relay)
    assert "egress delay 10ms -> 40ms" in diff.describe(op)


def test_structural_change_says_why_and_that_the_vm_stays() -> None:
    (op,) = diff.diff_plans(plan(**BASE), plan(**{**BASE, "ingress": {"delay": "5ms"}}))
    assert isinstance(op, diff.RebuildHostSide)
    text = diff.describe(op)
    assert "the delay engine starts" in text and "the VM and its connections stay" in text


def test_sysctl_removed_goes_back_to_the_namespace_default() -> None:
    (op,) = diff.diff_plans(plan(**{**BASE, "tcp": {"ecn": "on"}}), plan(**BASE))
    assert op == diff.SetSysctl("net.ipv4.tcp_ecn", "1", "2")


def test_uniform_jitter_after_another_distribution_needs_a_fresh_netem() -> None:
    def netem(**egress: Any) -> Plan:
        spec = parse_profile_document({"name": "t", "egress": {"rate": "10Mbit", **egress}})
        profile = complete([Layer("session-default", "t", spec.values)]).profile
        return compile_plan(profile, Devices("vh1", "vi1"), engine="netem")

    (op,) = diff.diff_plans(
        netem(delay="10ms", jitter="2ms", distribution="normal"), netem(delay="10ms", jitter="2ms")
    )
    assert isinstance(op, diff.ChangeNetem) and op.regraft
    (op,) = diff.diff_plans(netem(delay="10ms"), netem(delay="30ms"))
    assert isinstance(op, diff.ChangeNetem) and not op.regraft
    assert "delay 10ms -> 30ms" in diff.describe(op)
