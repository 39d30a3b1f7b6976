"""Feedback limits: parsing, refusals naming field/value/limit, duration clamping, per-VM rate limit."""

from __future__ import annotations

from typing import Any

import pytest

from vnic.controller.feedback import Grant, Refusal, parse_feedback_policy
from vnic.errors import InvalidInput
from vnic.model.fields import OFF
from vnic.model.units import Duration, Rate

POLICY: dict[str, Any] = {
    "enabled": True,
    "fields": ["egress.rate", "ingress.rate", "egress.delay", "ingress.delay"],
    "max": {"egress.rate": "50mbit", "ingress.rate": "50mbit"},
    "min": {"egress.delay": "1ms"},
    "profiles": ["lan", "wan"],
    "max_duration": "10m",
    "per_minute": 6,
}


def policy(**over: Any) -> Any:
    return parse_feedback_policy({**POLICY, **over})


def test_parse_and_canonical_round_trip() -> None:
    p = policy()
    assert p.maximum == {"egress.rate": Rate(50_000_000), "ingress.rate": Rate(50_000_000)}
    assert p.minimum == {"egress.delay": Duration.parse("1ms")}
    assert p.max_duration == 600.0 and p.per_minute == 6
    doc = p.to_document()
    assert doc["max"] == {"egress.rate": "50Mbit", "ingress.rate": "50Mbit"}
    assert doc["max_duration"] == "10m"
    assert parse_feedback_policy(doc) == p
    assert parse_feedback_policy(doc).to_document() == doc


def test_grant_within_limits_with_duration_clamped() -> None:
    p = policy()
    got = p.check("a", {"set": {"egress.rate": "40mbit"}, "duration": "1h"}, 0.0)
    assert isinstance(got, Grant)
    assert got.values == {"egress.rate": Rate(40_000_000)}
    assert got.duration == 600.0 and got.clamped
    short = p.check("a", {"set": {"egress.delay": "5ms"}, "duration": "60s"}, 1.0)
    assert isinstance(short, Grant) and short.duration == 60.0 and not short.clamped
    default = p.check("a", {"profile": "wan"}, 2.0)
    assert isinstance(default, Grant) and default.profile == "wan" and default.duration == 600.0


def test_without_max_duration_a_grant_lasts_until_handed_back() -> None:
    doc = {k: v for k, v in POLICY.items() if k != "max_duration"}
    got = parse_feedback_policy(doc).check("a", {"profile": "lan"}, 0.0)
    assert isinstance(got, Grant) and got.duration is None


def test_refusal_above_maximum_names_field_value_and_limit() -> None:
    got = policy().check("a", {"set": {"egress.rate": "80mbit"}}, 0.0)
    assert isinstance(got, Refusal)
    assert got.reason == "egress.rate 80Mbit is above this session's feedback maximum 50Mbit"
    assert got.fields == ("egress.rate",)


def test_refusal_below_minimum() -> None:
    got = policy().check("a", {"set": {"egress.delay": "500us"}}, 0.0)
    assert isinstance(got, Refusal)
    assert got.reason == "egress.delay 500us is below this session's feedback minimum 1ms"


def test_off_counts_as_unlimited_rate_and_zero_delay() -> None:
    rate = policy().check("a", {"set": {"egress.rate": "off"}}, 0.0)
    assert isinstance(rate, Refusal) and "above this session's feedback maximum" in rate.reason
    delay = policy().check("a", {"set": {"egress.delay": "off"}}, 0.0)
    assert isinstance(delay, Refusal) and "below this session's feedback minimum" in delay.reason
    ingress = policy().check("a", {"set": {"ingress.delay": "off"}}, 0.0)
    assert isinstance(ingress, Grant) and ingress.values == {"ingress.delay": OFF}


def test_fields_and_profiles_not_listed_are_refused() -> None:
    p = policy()
    loss = p.check("a", {"set": {"egress.loss": "1%"}}, 0.0)
    assert isinstance(loss, Refusal)
    assert loss.reason.startswith("egress.loss may not be asked for in this session")
    assert "egress.rate" in loss.reason
    prof = p.check("a", {"profile": "datacenter"}, 0.0)
    assert isinstance(prof, Refusal) and "profile datacenter" in prof.reason
    assert "lan, wan" in prof.reason


def test_every_violation_is_reported() -> None:
    got = policy().check(
        "a", {"set": {"egress.rate": "1gbit", "egress.delay": "1us", "egress.loss": "1%"}}, 0.0
    )
    assert isinstance(got, Refusal)
    assert set(got.fields) == {"egress.rate", "egress.delay", "egress.loss"}


def test_disabled_refuses_everything() -> None:
    got = policy(enabled=False).check("a", {"set": {"egress.rate": "1mbit"}}, 0.0)
    assert isinstance(got, Refusal) and "disabled" in got.reason


def test_rate_limit_per_vm_uses_the_injected_clock() -> None:
    p = policy(per_minute=3)
    ask = {"set": {"egress.rate": "10mbit"}}
    assert all(isinstance(p.check("a", ask, t), Grant) for t in (0.0, 10.0, 20.0))
    refused = p.check("a", ask, 30.0)
    assert isinstance(refused, Refusal)
    assert refused.retry_after == pytest.approx(30.0)
    assert "3 requests per VM per minute" in refused.reason
    assert isinstance(p.check("b", ask, 30.0), Grant)  # another VM has its own allowance
    assert isinstance(p.check("a", ask, 60.0), Grant)  # the request of t=0 has aged out
    assert isinstance(p.check("a", ask, 61.0), Refusal)


def test_refused_requests_do_not_use_the_allowance() -> None:
    p = policy(per_minute=1)
    assert isinstance(p.check("a", {"set": {"egress.rate": "90mbit"}}, 0.0), Refusal)
    assert isinstance(p.check("a", {"set": {"egress.rate": "9mbit"}}, 1.0), Grant)


def test_malformed_requests_use_the_allowance_and_none_is_read_beyond_it() -> None:
    p = policy(per_minute=2)
    with pytest.raises(InvalidInput):
        p.check("a", {"set": {"egress.rate": "fast"}}, 0.0)
    assert p.malformed("a", 1.0) is None  # one the endpoint could not read
    refused = p.check("a", {"set": {"egress.rate": "9mbit"}}, 2.0)
    assert isinstance(refused, Refusal) and refused.retry_after == pytest.approx(58.0)
    # Used up: even a malformed request is refused unread (no InvalidInput), uncounted.
    assert isinstance(p.check("a", {"set": "junk"}, 3.0), Refusal)
    assert isinstance(p.malformed("a", 4.0), Refusal)
    assert isinstance(p.check("a", {"set": {"egress.rate": "9mbit"}}, 60.5), Grant)


@pytest.mark.parametrize(
    ("request_doc", "path"),
    [
        ({"set": {"egress.rate": "fast"}}, "set.egress.rate"),
        ({"set": {"egress.speed": "1mbit"}}, "set.egress.speed"),
        ({"set": {"egress.rate": "1mbit"}, "profile": "lan"}, "profile"),
        ({}, ""),
        ({"profile": "lan", "duration": "forever"}, "duration"),
        ({"profile": "lan", "colour": "red"}, "colour"),
        ({"profile": "has space"}, "profile"),
    ],
)
def test_malformed_requests_are_invalid_input(request_doc: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        policy().check("a", request_doc, 0.0)
    assert path in exc.value.paths


def test_why_is_accepted_as_text() -> None:
    got = policy().check("a", {"profile": "lan", "why": "video call"}, 0.0)
    assert isinstance(got, Grant)


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        ({"fields": ["egress.rate", "mac_range"]}, "feedback.fields[1]", "profile field"),
        ({"fields": ["egress.rate", "egress.rate"]}, "feedback.fields[1]", "each once"),
        ({"max": {"egress.rate": "fast"}}, "feedback.max.egress.rate", "rate"),
        ({"max": {"egress.loss": "1%"}}, "feedback.max.egress.loss", "a field in fields"),
        ({"min": {"egress.rate": "60mbit"}}, "feedback.min.egress.rate", "at most the maximum"),
        ({"max_duration": "0s"}, "feedback.max_duration", "above 0"),
        ({"per_minute": 0}, "feedback.per_minute", "at least 1"),
        ({"per_minute": True}, "feedback.per_minute", "whole number"),
        ({"profiles": ["ok", "not ok"]}, "feedback.profiles[1]", "letters"),
        ({"enabled": "yes"}, "feedback.enabled", "true or false"),
        ({"limit": 3}, "feedback.limit", "one of enabled"),
    ],
)
def test_policy_errors_name_path_and_expectation(
    change: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as exc:
        policy(**change)
    errors = {e.path: e.expected for e in exc.value.errors}
    assert path in errors, errors
    assert fragment in errors[path]


def test_defaults() -> None:
    p = parse_feedback_policy({})
    assert p.enabled and p.fields == () and p.per_minute == 6 and p.max_duration is None
    got = p.check("a", {"set": {"egress.rate": "1mbit"}}, 0.0)
    assert isinstance(got, Refusal) and "allowed: none" in got.reason


def test_a_request_names_one_of_the_vms_vnics() -> None:
    p = policy(per_minute=4)
    ask = {"set": {"egress.rate": "20mbit"}}
    nics = ("eth0", "eth1")
    grant = p.check("web", {**ask, "nic": "eth1"}, 0.0, nics)
    assert isinstance(grant, Grant) and grant.nic == "eth1"
    assert p.check("web", ask, 0.0, nics) == Grant({"egress.rate": Rate(20_000_000)}, None, 600.0)
    for nic, expected in (
        ("eth2", "a vNIC of VM web: eth0, eth1"),
        ("eth9", "a vNIC name eth0..eth7"),
    ):
        with pytest.raises(InvalidInput) as exc:
            p.check("web", {**ask, "nic": nic}, 0.0, nics)
        assert [(e.path, e.expected) for e in exc.value.errors] == [("nic", expected)]
    # The allowance is the VM's, whichever vNIC it asks for: the two grants and the two
    # malformed requests used it up.
    refused = p.check("web", {**ask, "nic": "eth0"}, 1.0, nics)
    assert isinstance(refused, Refusal) and refused.retry_after is not None
