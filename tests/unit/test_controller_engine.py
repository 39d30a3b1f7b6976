"""The rule engine on a fake clock: thresholds, continuous holding, cooldown, hysteresis,
scale clamping, revert, repeat, scope and vanished VMs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from vnic.controller.engine import APPLY, REVERT, Controller, Decision
from vnic.controller.rules import Rule, parse_rule
from vnic.model.units import Duration, Rate

KEY = ("s1", "web-1", "eth0")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rule(**over: Any) -> Rule:
    doc: dict[str, Any] = {
        "name": "busy",
        "metric": "egress.utilisation",
        "above": 0.9,
        "for": "5s",
        "action": {"set": {"egress.rate": "50mbit"}},
    }
    doc.update(over)
    return parse_rule(doc)


def run(
    controller: Controller,
    clock: Clock,
    values: Sequence[float | None],
    *,
    metric: str = "egress.utilisation",
    current: dict[str, Any] | None = None,
    step: float = 1.0,
) -> list[tuple[float, Decision]]:
    """Feed one value per ``step`` seconds; return (time, decision) pairs."""
    out = []
    cur = {KEY: current if current is not None else {"egress.rate": Rate(10_000_000)}}
    for v in values:
        sample = {} if v is None else {metric: v}
        for d in controller.observe({KEY: sample}, cur):
            out.append((clock.now, d))
        clock.now += step
    return out


def test_fires_after_holding_for_the_duration_with_a_reason() -> None:
    clock = Clock()
    c = Controller([rule()], clock)
    got = run(c, clock, [0.95] * 7)
    assert len(got) == 1
    at, d = got[0]
    assert at == 105.0  # first seen at 100, held 5 s
    assert (d.session, d.vm, d.rule, d.kind) == ("s1", "web-1", "busy", APPLY)
    assert d.patch == {"egress.rate": Rate(50_000_000)}
    assert d.profile is None and d.expires_after is None
    assert d.reason.startswith("egress.utilisation 0.95 above 0.9 for 5.0 s")
    assert d.source == "rule:busy"


def test_below_threshold() -> None:
    clock = Clock()
    r = parse_rule(
        {
            "name": "starved",
            "metric": "ingress.rate",
            "below": "1mbit",
            "for": "2s",
            "action": {"profile": "fallback"},
        }
    )
    c = Controller([r], clock)
    got = run(c, clock, [2e6, 5e5, 5e5, 5e5], metric="ingress.rate")
    assert [(t, d.profile) for t, d in got] == [(103.0, "fallback")]
    assert "ingress.rate 500kbit below 1Mbit for 2.0 s" in got[0][1].reason


def test_strictly_beyond_the_threshold() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "0s"})], clock)
    assert run(c, clock, [0.9, 0.9, 0.9]) == []
    assert len(run(c, clock, [0.9000001])) == 1


def test_a_dip_resets_the_duration() -> None:
    clock = Clock()
    c = Controller([rule()], clock)
    # 4 s above, one sample at the threshold, then it must hold 5 s afresh.
    got = run(c, clock, [0.95, 0.95, 0.95, 0.95, 0.95, 0.85, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95])
    assert [t for t, _ in got] == [111.0]


def test_missing_metric_resets_the_duration() -> None:
    clock = Clock()
    c = Controller([rule()], clock)
    got = run(c, clock, [0.95, 0.95, 0.95, None, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95])
    assert [t for t, _ in got] == [109.0]


def test_fires_once_per_excursion_without_revert() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "1s"})], clock)
    got = run(c, clock, [0.95] * 20)
    assert len(got) == 1


def test_hysteresis_keeps_it_from_flapping_around_the_threshold() -> None:
    clock = Clock()
    c = Controller([rule(hysteresis=0.1, **{"for": "1s"})], clock)
    # fires once, then wanders 0.85 .. 0.95 (inside the band): no second firing
    wobble = [0.95, 0.95] + [0.85, 0.95, 0.95, 0.86, 0.93, 0.94] * 4
    assert len(run(c, clock, wobble)) == 1
    # back below 0.8 re-arms; the next excursion fires again
    got = run(c, clock, [0.7, 0.95, 0.95])
    assert len(got) == 1


def test_without_hysteresis_the_same_wobble_fires_again() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "1s"})], clock)
    wobble = [0.95, 0.95] + [0.85, 0.95, 0.95] * 3
    assert len(run(c, clock, wobble)) == 4


def test_cooldown_holds_back_a_second_firing() -> None:
    clock = Clock()
    c = Controller([rule(cooldown="30s", **{"for": "1s"})], clock)
    first = run(c, clock, [0.95, 0.95])  # fires at 101
    assert [t for t, _ in first] == [101.0]
    # re-armed at once (no hysteresis), above again: held back until 131
    got = run(c, clock, [0.5] + [0.95] * 35)
    assert [t for t, _ in got] == [131.0]


def test_scale_computes_from_the_current_value_and_clamps_to_the_ceiling() -> None:
    clock = Clock()
    r = rule(
        action={
            "scale": {"field": "egress.rate", "factor": 4, "floor": "1mbit", "ceiling": "30mbit"}
        },
        **{"for": "0s"},
    )
    c = Controller([r], clock)
    got = run(c, clock, [0.95], current={"egress.rate": Rate(10_000_000)})
    assert got[0][1].patch == {"egress.rate": Rate(30_000_000)}
    assert "egress.rate 10Mbit -> 30Mbit" in got[0][1].reason


def test_scale_clamps_to_the_floor() -> None:
    clock = Clock()
    r = parse_rule(
        {
            "name": "drop-delay",
            "metric": "latency",
            "above": "100ms",
            "action": {"scale": {"field": "egress.delay", "factor": 0.1, "floor": "20ms"}},
        }
    )
    c = Controller([r], clock)
    got = run(c, clock, [0.2], metric="latency", current={"egress.delay": Duration.parse("50ms")})
    assert got[0][1].patch == {"egress.delay": Duration.parse("20ms")}


def test_scale_at_the_bound_or_on_an_unset_field_decides_nothing() -> None:
    clock = Clock()
    r = rule(
        action={"scale": {"field": "egress.rate", "factor": 2, "ceiling": "10mbit"}},
        **{"for": "0s"},
    )
    c = Controller([r], clock)
    assert run(c, clock, [0.95], current={"egress.rate": Rate(10_000_000)}) == []
    # nothing fired, so the rule is still armed and acts as soon as it can
    assert c.state()[0]["armed"] is True
    assert run(c, clock, [0.95], current={"egress.rate": Rate(4_000_000)})[0][1].patch == {
        "egress.rate": Rate(8_000_000)
    }
    clock2 = Clock()
    c2 = Controller([r], clock2)
    assert run(c2, clock2, [0.95], current={}) == []


def test_repeat_steps_a_scale_further_while_the_condition_holds() -> None:
    clock = Clock()
    r = rule(
        action={"scale": {"field": "egress.rate", "factor": 2, "ceiling": "80mbit"}},
        repeat=True,
        **{"for": "2s"},
    )
    c = Controller([r], clock)
    current = {"egress.rate": Rate(10_000_000)}
    steps = []
    for _ in range(20):
        for d in c.observe({KEY: {"egress.utilisation": 0.99}}, {KEY: current}):
            steps.append((clock.now, d.patch["egress.rate"]))
            current = {"egress.rate": d.patch["egress.rate"]}  # the caller applied it
        clock.now += 1
    # each step must hold another `for` (2 s); at the ceiling it stops
    assert steps == [
        (102.0, Rate(20_000_000)),
        (104.0, Rate(40_000_000)),
        (106.0, Rate(80_000_000)),
    ]


def test_repeat_is_paced_by_the_cooldown() -> None:
    clock = Clock()
    r = rule(
        action={"scale": {"field": "egress.rate", "factor": 2}},
        cooldown="5s",
        repeat=True,
        **{"for": "1s"},
    )
    c = Controller([r], clock)
    got = run(c, clock, [0.99] * 12)
    assert [t for t, _ in got] == [101.0, 106.0, 111.0]


def test_revert_after_the_condition_is_over_for_the_duration() -> None:
    clock = Clock()
    r = rule(hysteresis=0.1, revert=True, expires="10m", **{"for": "3s"})
    c = Controller([r], clock)
    got = run(c, clock, [0.95] * 4)
    assert [(t, d.kind, d.expires_after) for t, d in got] == [(103.0, APPLY, 600.0)]
    # inside the band (0.85): not over; below 0.8 for 3 s: revert
    got = run(c, clock, [0.85, 0.85, 0.7, 0.7, 0.75, 0.85, 0.7, 0.7, 0.7, 0.7])
    assert [(t, d.kind) for t, d in got] == [(113.0, REVERT)]
    assert got[0][1].patch == {}
    assert "at or below 0.8 for 3.0 s" in got[0][1].reason
    # re-armed by the revert: fires again on the next excursion
    assert [d.kind for _, d in run(c, clock, [0.95] * 4)] == [APPLY]


def test_no_revert_without_a_firing() -> None:
    clock = Clock()
    c = Controller([rule(revert=True, **{"for": "1s"})], clock)
    assert run(c, clock, [0.1] * 10) == []


def test_vanished_vms_are_forgotten() -> None:
    clock = Clock()
    c = Controller([rule()], clock)
    run(c, clock, [0.95] * 4)  # held 3 s
    assert [s["vm"] for s in c.state()] == ["web-1"]
    c.observe({}, {})  # the VM is gone
    assert c.state() == []
    clock.now += 1
    # it comes back: the wait starts from scratch
    got = run(c, clock, [0.95] * 5)
    assert got == []
    assert len(run(c, clock, [0.95])) == 1


def test_rules_are_kept_per_vm() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "1s"})], clock)
    other = ("s1", "web-2", "eth0")
    cur = {KEY: {"egress.rate": Rate(10**7)}, other: {"egress.rate": Rate(10**7)}}
    c.observe({KEY: {"egress.utilisation": 0.95}, other: {"egress.utilisation": 0.1}}, cur)
    clock.now += 1
    got = c.observe({KEY: {"egress.utilisation": 0.95}, other: {"egress.utilisation": 0.99}}, cur)
    assert [d.vm for d in got] == ["web-1"]
    clock.now += 1
    got = c.observe({KEY: {"egress.utilisation": 0.95}, other: {"egress.utilisation": 0.99}}, cur)
    assert [d.vm for d in got] == ["web-2"]


def test_scope_by_glob_and_profile() -> None:
    clock = Clock()
    r = rule(vms="web-*", profile="lan", **{"for": "0s"})
    c = Controller([r], clock)
    db = ("s1", "db-1", "eth0")
    wan = ("s1", "web-2", "eth0")
    samples = {k: {"egress.utilisation": 0.95} for k in (KEY, db, wan)}
    cur = {k: {"egress.rate": Rate(10**7)} for k in samples}
    got = c.observe(samples, cur, {KEY: {"base", "lan"}, db: {"lan"}, wan: {"wan"}})
    assert [d.vm for d in got] == ["web-1"]
    # without the profile facts a profile-scoped rule applies to nobody
    assert Controller([r], clock).observe(samples, cur) == []


def test_utilisation_is_computed_from_rate_and_profile_rate_when_missing() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "0s"})], clock)
    cur = {KEY: {"egress.rate": Rate(10_000_000)}}
    assert c.observe({KEY: {"egress.rate": 8e6}}, cur) == []
    got = c.observe({KEY: {"egress.rate": 9.6e6}}, cur)
    assert len(got) == 1 and "0.96 above 0.9" in got[0].reason


def test_state_is_json_and_reports_holding_armed_and_last_fired() -> None:
    clock = Clock()
    c = Controller([rule(cooldown="30s")], clock)
    run(c, clock, [0.95] * 3)  # seen at 100, 101, 102; now 103
    (s,) = c.state()
    assert s["holding_for_s"] == 3.0 and s["armed"] is True and s["last_fired_ago_s"] is None
    run(c, clock, [0.95] * 3)  # fires at 105; now 106
    (s,) = c.state()
    assert s["armed"] is False
    assert s["last_fired_ago_s"] == 1.0
    assert s["cooldown_left_s"] == 29.0
    json.dumps(s)


def test_decisions_serialise() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "0s"})], clock)
    (d,) = c.observe({KEY: {"egress.utilisation": 0.95}}, {KEY: {}})
    assert d.to_dict()["patch"] == {"egress.rate": "50Mbit"}
    json.dumps(d.to_dict())


def test_duplicate_rule_names_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        Controller([rule(), rule()], Clock())


def test_leaving_the_scope_reverts_a_fired_rule_with_revert() -> None:
    clock = Clock()
    r = rule(profile="lan", revert=True, **{"for": "0s"})
    c = Controller([r], clock)
    sample = {KEY: {"egress.utilisation": 0.95}}
    cur = {KEY: {"egress.rate": Rate(10**7)}}
    assert [d.kind for d in c.observe(sample, cur, {KEY: {"lan"}})] == [APPLY]
    clock.now += 1
    got = c.observe(sample, cur, {KEY: {"wan"}})
    assert [(d.kind, d.vm) for d in got] == [(REVERT, "web-1")]
    assert "no longer in the rule's scope" in got[0].reason
    assert c.observe(sample, cur, {KEY: {"wan"}}) == []


ETH1 = ("s1", "web-1", "eth1")


def test_a_rule_without_nic_watches_eth0_only() -> None:
    clock = Clock()
    c = Controller([rule(**{"for": "0s"})], clock)
    cur = {k: {"egress.rate": Rate(10**7)} for k in (KEY, ETH1)}
    # eth1 saturated, eth0 idle: nothing fires (the rule is eth0's, as before).
    assert (
        c.observe({KEY: {"egress.utilisation": 0.1}, ETH1: {"egress.utilisation": 0.99}}, cur) == []
    )
    assert [s["vnic"] for s in c.state()] == ["web-1/eth0"]


def test_a_rule_on_eth1_decides_for_eth1_with_its_own_sample_and_value() -> None:
    clock = Clock()
    action = {"scale": {"field": "egress.rate", "factor": 2}}
    c = Controller([rule(nic="eth1", action=action, **{"for": "1s"})], clock)
    cur = {KEY: {"egress.rate": Rate(10**7)}, ETH1: {"egress.rate": Rate(3 * 10**6)}}
    both = {KEY: {"egress.utilisation": 0.99}, ETH1: {"egress.utilisation": 0.95}}
    assert c.observe(both, cur) == []
    clock.now += 1
    (d,) = c.observe(both, cur)
    assert (d.vm, d.nic, d.kind, d.source) == ("web-1", "eth1", APPLY, "rule:busy")
    assert d.patch == {"egress.rate": Rate(6 * 10**6)}  # eth1's 3Mbit doubled, not eth0's
    assert d.to_dict()["nic"] == "eth1"
    (s,) = c.state()
    assert (s["vm"], s["nic"], s["vnic"], s["armed"]) == ("web-1", "eth1", "web-1/eth1", False)


def test_a_glob_keeps_one_state_per_vnic() -> None:
    clock = Clock()
    c = Controller([rule(nic="eth*", **{"for": "1s"})], clock)
    cur = {k: {"egress.rate": Rate(10**7)} for k in (KEY, ETH1)}
    c.observe({KEY: {"egress.utilisation": 0.95}, ETH1: {"egress.utilisation": 0.1}}, cur)
    clock.now += 1
    got = c.observe({KEY: {"egress.utilisation": 0.95}, ETH1: {"egress.utilisation": 0.99}}, cur)
    assert [d.nic for d in got] == ["eth0"]  # eth1's wait only began now
    clock.now += 1
    got = c.observe({KEY: {"egress.utilisation": 0.95}, ETH1: {"egress.utilisation": 0.99}}, cur)
    assert [d.nic for d in got] == ["eth1"]
    assert sorted(s["vnic"] for s in c.state()) == ["web-1/eth0", "web-1/eth1"]


def test_a_rule_on_a_network_needs_the_vnics_network() -> None:
    clock = Clock()
    c = Controller([rule(network="data", revert=True, **{"for": "0s"})], clock)
    samples = {KEY: {"egress.utilisation": 0.95}, ETH1: {"egress.utilisation": 0.95}}
    cur = {k: {"egress.rate": Rate(10**7)} for k in samples}
    assert c.observe(samples, cur) == []  # networks unknown: the rule applies to none
    got = c.observe(samples, cur, networks={KEY: "default", ETH1: "data"})
    assert [(d.nic, d.kind) for d in got] == [("eth1", APPLY)]
    clock.now += 1
    # eth1 no longer on the network the rule names: reverted, naming the vNIC
    got = c.observe(samples, cur, networks={KEY: "default", ETH1: "other"})
    assert [(d.nic, d.kind) for d in got] == [("eth1", REVERT)]
    assert got[0].reason.startswith("web-1/eth1 is no longer in the rule's scope")


def test_a_vanished_vnic_is_forgotten_and_its_vm_kept() -> None:
    clock = Clock()
    c = Controller([rule(nic="eth*")], clock)
    cur = {k: {"egress.rate": Rate(10**7)} for k in (KEY, ETH1)}
    c.observe({KEY: {"egress.utilisation": 0.95}, ETH1: {"egress.utilisation": 0.95}}, cur)
    c.observe({KEY: {"egress.utilisation": 0.95}}, cur)
    assert [s["vnic"] for s in c.state()] == ["web-1/eth0"]
