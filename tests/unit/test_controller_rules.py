"""Threshold rule documents: parsing, errors naming field/value/expectation, canonical round trip."""

from __future__ import annotations

from typing import Any

import pytest

from vnic.controller.rules import (
    Scale,
    SetFields,
    SwitchProfile,
    parse_metric_value,
    parse_rule,
    parse_rules,
)
from vnic.errors import InvalidInput
from vnic.model.fields import OFF
from vnic.model.units import Duration, Probability, Rate

BOOST: dict[str, Any] = {
    "name": "boost-when-busy",
    "vms": "web-*",
    "metric": "egress.utilisation",
    "above": 0.9,
    "for": "5s",
    "hysteresis": 0.1,
    "cooldown": "30s",
    "action": {
        "scale": {"field": "egress.rate", "factor": 2, "floor": "1mbit", "ceiling": "100mbit"}
    },
    "expires": "10m",
    "revert": True,
}


def _errors(exc: pytest.ExceptionInfo[InvalidInput]) -> dict[str, tuple[str, str]]:
    return {e.path: (e.value, e.expected) for e in exc.value.errors}


def test_full_rule_parses_into_typed_values() -> None:
    rule = parse_rule(BOOST)
    assert rule.name == "boost-when-busy"
    assert rule.vms == "web-*"
    assert (rule.metric, rule.direction, rule.threshold) == ("egress.utilisation", "above", 0.9)
    assert rule.for_s == 5.0
    assert rule.cooldown_s == 30.0
    assert rule.expires_s == 600.0
    assert rule.hysteresis == 0.1
    assert rule.revert is True
    assert rule.action == Scale("egress.rate", 2.0, Rate(1_000_000), Rate(100_000_000))


def test_defaults_for_optional_keys() -> None:
    rule = parse_rule({"name": "r", "metric": "drops", "above": 10, "action": {"profile": "lossy"}})
    assert rule.for_s == 0.0
    assert rule.cooldown_s == 0.0
    assert rule.hysteresis == 0.0
    assert rule.expires_s is None
    assert rule.revert is False
    assert rule.vms is None and rule.profile is None
    assert rule.action == SwitchProfile("lossy")


@pytest.mark.parametrize(
    ("metric", "raw", "expected"),
    [
        ("egress.rate", "10mbit", 10_000_000.0),
        ("ingress.rate", "1.5Gbit", 1.5e9),
        ("egress.rate", 0, 0.0),
        ("egress.utilisation", "90%", 0.9),
        ("ingress.utilisation", 1.2, 1.2),
        ("latency", "5ms", 0.005),
        ("latency", "250us", 0.00025),
        ("drops", "100", 100.0),
    ],
)
def test_threshold_in_the_metrics_unit(metric: str, raw: Any, expected: float) -> None:
    rule = parse_rule({"name": "r", "metric": metric, "below": raw, "action": {"profile": "p"}})
    assert rule.direction == "below"
    assert rule.threshold == pytest.approx(expected)


def test_set_action_reads_dotted_and_nested_fields_with_the_profile_parsers() -> None:
    rule = parse_rule(
        {
            "name": "r",
            "metric": "latency",
            "above": "50ms",
            "action": {
                "set": {"egress.rate": "50mbit", "egress": {"delay": "5ms"}, "ingress.loss": "off"}
            },
        }
    )
    assert isinstance(rule.action, SetFields)
    assert rule.action.values == {
        "egress.rate": Rate(50_000_000),
        "egress.delay": Duration(5_000_000),
        "ingress.loss": OFF,
    }


@pytest.mark.parametrize(
    "doc",
    [
        BOOST,
        {"name": "a", "metric": "latency", "above": "12.5ms", "action": {"profile": "slow"}},
        {
            "name": "b",
            "profile": "lan",
            "metric": "ingress.rate",
            "below": "1.5Mbit",
            "hysteresis": "500kbit",
            "action": {"set": {"ingress.delay": "20ms", "ingress.loss": "1%"}},
            "for": "90s",
        },
        {
            "name": "c",
            "metric": "drops",
            "above": 2.5,
            "action": {"scale": {"field": "egress.corrupt", "factor": 0.5}},
            "repeat": True,
            "cooldown": "1h",
        },
        {**BOOST, "nic": "eth[12]", "network": "data"},
        {**BOOST, "nic": "eth1"},
    ],
)
def test_round_trip_is_canonical(doc: dict[str, Any]) -> None:
    rule = parse_rule(doc)
    canonical = rule.to_document()
    again = parse_rule(canonical)
    assert again == rule
    assert again.to_document() == canonical


def test_canonical_document_spells_units() -> None:
    doc = parse_rule(BOOST).to_document()
    assert doc["for"] == "5s"
    assert doc["expires"] == "10m"
    assert doc["action"] == {
        "scale": {"field": "egress.rate", "factor": 2, "floor": "1Mbit", "ceiling": "100Mbit"}
    }
    latency = parse_rule(
        {"name": "l", "metric": "latency", "above": "0.5s", "action": {"profile": "p"}}
    ).to_document()
    assert latency["above"] == "500ms"


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        ({"metric": "egress.speed"}, "rules[3].metric", "egress.utilisation"),
        ({"above": "lots"}, "rules[3].above", "fraction"),
        ({"above": -0.5}, "rules[3].above", "not negative"),
        ({"for": "5 parsecs"}, "rules[3].for", "time span"),
        ({"for": 5}, "rules[3].for", "unit is required"),
        ({"cooldown": True}, "rules[3].cooldown", "time span"),
        ({"expires": "0s"}, "rules[3].expires", "above 0"),
        ({"revert": "maybe"}, "rules[3].revert", "true or false"),
        ({"vms": "web/1"}, "rules[3].vms", "glob"),
        ({"name": "has space"}, "rules[3].name", "letters, digits"),
        ({"hysteresis": 2}, "rules[3].hysteresis", "at most the threshold"),
        ({"colour": "red"}, "rules[3].colour", "one of name"),
        (
            {"action": {"scale": {"field": "egress.rate", "factor": 0}}},
            "rules[3].action.scale.factor",
            "positive number",
        ),
        (
            {"action": {"scale": {"field": "egress.rate", "factor": "two"}}},
            "rules[3].action.scale.factor",
            "positive number",
        ),
        (
            {"action": {"scale": {"field": "tcp.sack", "factor": 2}}},
            "rules[3].action.scale.field",
            "egress.rate",
        ),
        (
            {"action": {"scale": {"field": "egress.rate", "factor": 2, "floor": "fast"}}},
            "rules[3].action.scale.floor",
            "rate",
        ),
        (
            {
                "action": {
                    "scale": {
                        "field": "egress.rate",
                        "factor": 2,
                        "floor": "10mbit",
                        "ceiling": "1mbit",
                    }
                }
            },
            "rules[3].action.scale.ceiling",
            "at least the floor 10Mbit",
        ),
        (
            {"action": {"set": {"egress.rate": "fast"}}},
            "rules[3].action.set.egress.rate",
            "rate",
        ),
        ({"action": {"set": {}}}, "rules[3].action.set", "at least one"),
        (
            {"action": {"set": {"egress.rate": "1mbit"}, "profile": "x"}},
            "rules[3].action",
            "exactly one",
        ),
        ({"action": {"profile": "no good"}}, "rules[3].action.profile", "letters"),
        ({"action": {"profile": "p"}, "repeat": True}, "rules[3].repeat", "scale action"),
        ({"nic": "eth9"}, "rules[3].nic", "eth0..eth7"),
        ({"nic": "wlan*"}, "rules[3].nic", "glob of them"),
        ({"nic": 1}, "rules[3].nic", "vNIC name"),
        ({"nic": "eth 1"}, "rules[3].nic", "vNIC name"),
        ({"network": "Data Net"}, "rules[3].network", "network name"),
        ({"network": ["data"]}, "rules[3].network", "network name"),
    ],
)
def test_errors_name_path_value_and_expectation(
    change: dict[str, Any], path: str, fragment: str
) -> None:
    doc = {**BOOST, **change}
    with pytest.raises(InvalidInput) as exc:
        parse_rule(doc, "rules[3]")
    errors = _errors(exc)
    assert path in errors, errors
    assert fragment in errors[path][1]


def test_error_carries_the_value_given() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_rule({**BOOST, "action": {"scale": {"field": "egress.rate", "factor": -3}}})
    assert _errors(exc)["rules[0].action.scale.factor"][0] == "-3"


def test_both_or_neither_direction_is_refused() -> None:
    both = {**BOOST, "below": 0.1}
    with pytest.raises(InvalidInput) as exc:
        parse_rule(both)
    assert "exactly one of above, below" in str(exc.value)
    neither = {k: v for k, v in BOOST.items() if k != "above"}
    with pytest.raises(InvalidInput) as exc:
        parse_rule(neither)
    assert "neither above nor below" in str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_rule({"name": "x", "metric": "bogus", "for": "soon", "action": {}})
    paths = set(_errors(exc))
    assert {"rules[0].metric", "rules[0].for", "rules[0].action"} <= paths


def test_parse_rules_collects_errors_from_every_rule_and_refuses_duplicates() -> None:
    bad = {**BOOST, "name": "other", "above": "x"}
    with pytest.raises(InvalidInput) as exc:
        parse_rules([BOOST, bad, BOOST])
    errors = _errors(exc)
    assert "rules[1].above" in errors
    assert errors["rules[2].name"][1] == "a name not used by rules[0]"


def test_parse_rules_needs_a_list() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_rules({"name": "x"})
    assert exc.value.paths == ["rules"]
    assert parse_rules(None) == ()
    assert len(parse_rules([BOOST, {**BOOST, "name": "two"}])) == 2


def test_scale_floor_and_ceiling_are_typed_for_the_field() -> None:
    rule = parse_rule(
        {
            **BOOST,
            "action": {"scale": {"field": "egress.duplicate", "factor": 3, "ceiling": "5%"}},
        }
    )
    assert isinstance(rule.action, Scale)
    assert rule.action.ceiling == Probability.parse("5%")


def test_metric_value_percent_may_exceed_one() -> None:
    assert parse_metric_value("utilisation", "120%", "x") == pytest.approx(1.2)
    with pytest.raises(InvalidInput):
        parse_metric_value("rate", "10", "x")  # a rate needs its unit


def test_scope_by_glob_and_profile() -> None:
    rule = parse_rule({**BOOST, "profile": "lan"})
    assert rule.applies_to("web-1", {"lan", "base"})
    assert not rule.applies_to("db-1", {"lan"})
    assert not rule.applies_to("web-1", {"wan"})
    assert not rule.applies_to("web-1", None)
    unscoped = parse_rule({k: v for k, v in BOOST.items() if k != "vms"})
    assert unscoped.applies_to("anything", None)


def test_scope_by_vnic_and_network() -> None:
    bare = {k: v for k, v in BOOST.items() if k != "vms"}
    # Naming neither nic nor network: eth0 only, as before VMs had several vNICs.
    old = parse_rule(bare)
    assert old.applies_to("web-1", None, "eth0", "default")
    assert not old.applies_to("web-1", None, "eth1", "default")
    eth1 = parse_rule({**bare, "nic": "eth1"})
    assert eth1.applies_to("web-1", None, "eth1", "data")
    assert eth1.applies_to("web-1", None, "eth1", None)  # the network does not matter
    assert not eth1.applies_to("web-1", None, "eth0", "data")
    every = parse_rule({**bare, "nic": "eth*"})
    assert all(every.applies_to("w", None, f"eth{i}", "any") for i in range(8))
    data = parse_rule({**bare, "network": "data"})
    assert data.applies_to("w", None, "eth0", "data")  # any vNIC on that network
    assert data.applies_to("w", None, "eth3", "data")
    assert not data.applies_to("w", None, "eth1", "default")
    assert not data.applies_to("w", None, "eth1", None)  # network unknown: not applied
    both = parse_rule({**bare, "nic": "eth[23]", "network": "data"})
    assert both.applies_to("w", None, "eth2", "data")
    assert not both.applies_to("w", None, "eth1", "data")
    assert not both.applies_to("w", None, "eth2", "default")
