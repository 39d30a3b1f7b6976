"""The controller in the manager (vnic.manager.live) on the fake driver, with a fake
clock: rules turn samples into audited runtime adjustments that reach the VM; feedback is
granted within limits and refused beyond them or for another VM; scenarios play in order.
The same paths against the kernel with real traffic: tests/e2e/test_controller.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api_fixtures import Api, make_api
from vnic.manager.live import LiveControl, sample_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def lab(api: Api) -> None:
    profile = {"name": "base", "egress": {"rate": "10Mbit"}, "ingress": {"rate": "50Mbit"}}
    assert api.call("admin", "POST", "/v1/profiles", json=profile).status_code == 201
    api.call("admin", "POST", "/v1/sessions", json={"name": "lab", "default_profile": "base"})
    for vm in ("a", "b"):
        r = api.call("admin", "POST", "/v1/sessions/lab/vms", json={"name": vm, "launch": True})
        assert r.status_code == 201, r.text


def rate(api: Api, vm: str) -> str:
    return str(api.driver.vms[("lab", vm)].profile.egress.rate)


def stats(egress_bps: dict[str, float]) -> Any:
    def fake(session: str) -> list[dict[str, Any]]:
        return [
            {
                "vm": vm,
                "egress": {"rate_bps": bps, "profile_rate_bps": 10_000_000, "drops": {}},
                "ingress": {"rate_bps": 0.0, "profile_rate_bps": 50_000_000, "drops": {}},
                "latency_seconds": 0.001,
            }
            for vm, bps in egress_bps.items()
        ]

    return fake


def test_sample_metrics_from_agent_stats() -> None:
    first = {"egress": {"rate_bps": 9e6, "profile_rate_bps": 10e6, "drops": {"rate_limit": 10}}}
    later = {"egress": {"rate_bps": 5e6, "profile_rate_bps": 10e6, "drops": {"rate_limit": 30}}}
    assert sample_metrics(first, None, 0) == {"egress.rate": 9e6, "egress.utilisation": 0.9}
    assert sample_metrics(later, first, 2.0)["drops"] == 10.0


def test_rule_fires_after_its_duration_and_reaches_the_vm(api: Api) -> None:
    lab(api)
    rule = {
        "name": "busy",
        "metric": "egress.utilisation",
        "above": "80%",
        "for": "2s",
        "cooldown": "60s",
        "action": {"scale": {"field": "egress.rate", "factor": 2, "ceiling": "30Mbit"}},
    }
    api.call("admin", "PUT", "/v1/sessions/lab/controller", json={"rules": [rule]})
    clock = Clock()
    live = LiveControl(api.manager, clock=clock)
    api.manager.agent.stats = stats({"a": 9.5e6, "b": 2e6})  # type: ignore[method-assign]
    assert live.tick() == []  # the condition starts holding
    clock.now += 1.0
    assert live.tick() == []  # for 1 s of 2
    assert rate(api, "a") == "10Mbit"
    clock.now += 1.5
    (decision,) = live.tick()
    assert (decision.vm, decision.rule, decision.kind) == ("a", "busy", "apply")
    assert rate(api, "a") == "20Mbit" and rate(api, "b") == "10Mbit"
    (entry,) = api.manager.runtime.audit("lab")
    assert entry.source == "rule:busy" and entry.new["egress.rate"] == "20Mbit"
    assert "egress.utilisation" in entry.reason
    clock.now += 5
    assert live.tick() == []  # cooldown: it does not fire again
    state = live.state("lab")
    assert any(r["rule"] == "busy" and r["vm"] == "a" for r in state["rules"]), state
    assert state["events"][-1]["source"] == "rule:busy"


def feedback_limits(api: Api, **extra: Any) -> None:
    doc = {
        "feedback": {
            "fields": ["egress.rate"],
            "max": {"egress.rate": "30Mbit"},
            "max_duration": "10m",
            "per_minute": 2,
            **extra,
        }
    }
    r = api.call("admin", "PUT", "/v1/sessions/lab/controller", json=doc)
    assert r.status_code == 200, r.text


def test_feedback_granted_within_limits_refused_beyond(api: Api) -> None:
    lab(api)
    live = LiveControl(api.manager, clock=Clock())
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "20Mbit"}})
    assert status == 403 and "does not accept feedback" in answer["message"]
    feedback_limits(api, per_minute=3)
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "20Mbit"}})
    assert status == 200, answer
    assert answer["changed"]["egress.rate"] == {"old": "10Mbit", "new": "20Mbit"}
    assert answer["expires_at"] is not None  # max_duration bounds every grant
    assert rate(api, "a") == "20Mbit"
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "80Mbit"}})
    assert status == 403 and "30Mbit" in answer["message"] and "egress.rate" in answer["message"]
    status, answer = live.feedback("lab", "a", "POST", {"vm": "b", "set": {"egress.rate": "5Mbit"}})
    assert status == 403 and "VM a" in answer["message"]
    assert rate(api, "b") == "10Mbit"
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "fast"}})
    assert status == 422
    # per_minute 3: the grant, the malformed request and the second grant count; the
    # fourth is refused (the policy is kept).
    assert live.feedback("lab", "a", "POST", {"set": {"egress.rate": "25Mbit"}})[0] == 200
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "26Mbit"}})
    assert status == 403 and answer["retry_after"] == 60.0, answer
    assert rate(api, "a") == "25Mbit"
    status, _ = live.feedback("lab", "a", "DELETE", {})
    assert status == 200 and rate(api, "a") == "10Mbit"
    sources = [e.source for e in api.manager.runtime.audit("lab")]
    assert sources == ["feedback"] * 3


def test_malformed_feedback_counts_against_per_minute(api: Api) -> None:
    lab(api)
    clock = Clock()
    live = LiveControl(api.manager, clock=clock)
    live.malformed("lab", "a", "Content-Length: got '-1'")  # no limits yet: nothing counts
    feedback_limits(api)  # per_minute 2
    live.malformed("lab", "a", "Content-Length: got '-1'")  # what the endpoint could not read
    status, answer = live.feedback("lab", "a", "POST", {"set": "fast"})  # what the policy could not
    assert status == 422, answer
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "20Mbit"}})
    assert status == 403 and "granted or malformed" in answer["message"], answer
    assert answer["retry_after"] == 60.0
    assert rate(api, "a") == "10Mbit"  # nothing was changed
    # Refused unread once the limit is used up: a flood costs nothing more, nor counts.
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "x" * 400}})
    assert status == 403 and "try again" in answer["message"]
    assert live.feedback("lab", "b", "POST", {"set": {"egress.rate": "20Mbit"}})[0] == 200
    clock.now += 60
    assert live.feedback("lab", "a", "POST", {"set": {"egress.rate": "20Mbit"}})[0] == 200
    events = [e["kind"] for e in live.state("lab")["events"] if e["vm"] == "a"]
    assert events.count("malformed") == 1 and api.manager.runtime.audit("lab")


def test_scenario_plays_in_order_and_stop_removes_its_layer(api: Api) -> None:
    lab(api)
    live = LiveControl(api.manager)
    doc = {
        "name": "steps",
        "vms": ["a"],
        "loop": True,
        "duration": "0.4s",
        "steps": [
            {"at": "0s", "set": {"egress.rate": "5Mbit"}},
            {"at": "0.2s", "set": {"egress.rate": "15Mbit"}},
        ],
    }
    started = live.start_scenario("lab", doc)
    assert started["state"] == "running" and started["vms"] == ["a"]
    seen = set()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not {"5Mbit", "15Mbit"} <= seen:
        seen.add(rate(api, "a"))
        time.sleep(0.01)
    assert {"5Mbit", "15Mbit"} <= seen <= {"10Mbit", "5Mbit", "15Mbit"}
    paused = live.scenario("lab", "steps", "pause")
    assert paused["state"] == "paused"
    stopped = live.scenario("lab", "steps", "stop")
    assert stopped["state"] == "stopped" and stopped["steps_applied"] >= 2
    assert rate(api, "a") == "10Mbit"  # its layer is gone
    assert rate(api, "b") == "10Mbit"  # never touched
    with pytest.raises(Exception, match="vms"):
        live.start_scenario("lab", {**doc, "name": "other", "vms": ["ghost"]})
