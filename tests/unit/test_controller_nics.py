"""The controller per vNIC (vnic.manager.live) on the fake driver, with a fake clock: a
rule naming ``nic`` or ``network`` watches each matching vNIC with that vNIC's sample and
adjusts that vNIC only (eth0 keeps its effective profile, the audit names the vNIC); a
rule naming neither watches eth0 only; feedback and scenarios name the vNIC they change.
The same against the kernel with real traffic: tests/e2e/test_controller.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api_fixtures import Api, make_api
from tests.unit.test_controller_runner import Clock
from vnic.errors import InvalidInput
from vnic.manager.live import LiveControl, nic_samples

#: Each vNIC's profile rate (bit/s): the session's default, ``base``, on both networks.
EGRESS = 10_000_000


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def lab(api: Api) -> None:
    """Session ``lab``: VM ``a`` with eth0 (default) and eth1 (network ``data``), VM ``b``
    with eth0 only; every vNIC at 10 Mbit/s egress."""
    profile = {"name": "base", "egress": {"rate": "10Mbit"}, "ingress": {"rate": "50Mbit"}}
    assert api.call("admin", "POST", "/v1/profiles", json=profile).status_code == 201
    api.call("admin", "POST", "/v1/sessions", json={"name": "lab", "default_profile": "base"})
    r = api.call("admin", "POST", "/v1/sessions/lab/networks", json={"name": "data"})
    assert r.status_code == 201, r.text
    for body in (
        {"name": "a", "launch": True, "nics": [{}, {"network": "data"}]},
        {"name": "b", "launch": True},
    ):
        r = api.call("admin", "POST", "/v1/sessions/lab/vms", json=body)
        assert r.status_code == 201, r.text


def rate(api: Api, vm: str, nic: int) -> str:
    """The egress rate the fake driver runs on the VM's vNIC at position ``nic``."""
    return str(api.driver.vms[("lab", vm)].nics[nic].profile.egress.rate)


def explained(api: Api, vm: str, nic: str) -> dict[str, Any]:
    """The vNIC's effective profile as ``vnic vm explain`` has it: every field's value
    and the layer it came from."""
    r = api.call("admin", "GET", f"/v1/sessions/lab/vms/{vm}/explain")
    assert r.status_code == 200, r.text
    (one,) = [n for n in r.json()["nics"] if n["name"] == nic]
    return dict(one["effective"]["fields"])


def stats(egress_bps: dict[tuple[str, str], float]) -> Any:
    """An agent's stats: one document per VM, every vNIC's sample in ``nics`` (eth0's
    also at the top level), as ``vnic.agent.monitor.stats_by_vm`` makes them."""

    def fake(session: str) -> list[dict[str, Any]]:
        by_vm: dict[str, list[dict[str, Any]]] = {}
        for (vm, nic), bps in egress_bps.items():
            by_vm.setdefault(vm, []).append(
                {
                    "vm": vm,
                    "nic": nic,
                    "network": "default" if nic == "eth0" else "data",
                    "egress": {"rate_bps": bps, "profile_rate_bps": EGRESS, "drops": {}},
                    "ingress": {"rate_bps": 0.0, "profile_rate_bps": 50_000_000, "drops": {}},
                    "latency_seconds": 0.001,
                }
            )
        return [{**nics[0], "nics": nics} for nics in by_vm.values()]

    return fake


BUSY: dict[str, Any] = {
    "name": "busy",
    "metric": "egress.utilisation",
    "above": "80%",
    "for": "1s",
    "cooldown": "60s",
    "action": {"scale": {"field": "egress.rate", "factor": 2, "ceiling": "30Mbit"}},
}


def controller(api: Api, *rules: dict[str, Any], status: int = 200) -> Any:
    r = api.call("admin", "PUT", "/v1/sessions/lab/controller", json={"rules": list(rules)})
    assert r.status_code == status, r.text
    return r.json()


#: Every vNIC saturated: only a rule's scope decides which one it adjusts.
ALL_BUSY = {("a", "eth0"): 9.5e6, ("a", "eth1"): 9.5e6, ("b", "eth0"): 9.5e6}


def test_a_rule_on_eth1_adjusts_eth1_only_and_the_audit_names_it(api: Api) -> None:
    lab(api)
    controller(api, {**BUSY, "nic": "eth1"})
    clock = Clock()
    live = LiveControl(api.manager, clock=clock)
    api.manager.agent.stats = stats(ALL_BUSY)  # type: ignore[method-assign]
    eth0_before = explained(api, "a", "eth0")
    assert live.tick() == []  # the condition starts holding
    clock.now += 1.0
    (decision,) = live.tick()
    assert (decision.vm, decision.nic, decision.kind) == ("a", "eth1", "apply")
    assert rate(api, "a", 1) == "20Mbit"
    assert rate(api, "a", 0) == "10Mbit" and rate(api, "b", 0) == "10Mbit"
    assert explained(api, "a", "eth0") == eth0_before  # every field, value and layer
    eth1 = explained(api, "a", "eth1")["egress.rate"]
    assert eth1["value"] == "20Mbit" and eth1["source"]["layer"] == "runtime"
    assert eth1["source"]["detail"].startswith("rule:busy: egress.utilisation 0.95 above 0.8")
    (entry,) = api.manager.runtime.audit("lab")
    assert (entry.vm, entry.nic, entry.source) == ("a", "eth1", "rule:busy")
    assert entry.new["egress.rate"] == "20Mbit"
    (adjustment,) = api.manager.runtime.adjustments("lab")
    assert (adjustment.vm, adjustment.nic, adjustment.source) == ("a", "eth1", "rule:busy")
    state = live.state("lab")
    assert [(r["vnic"], r["armed"]) for r in state["rules"]] == [("a/eth1", False)]
    assert (state["events"][-1]["vm"], state["events"][-1]["nic"]) == ("a", "eth1")


def test_a_rule_naming_no_vnic_watches_eth0_as_before(api: Api) -> None:
    lab(api)
    controller(api, BUSY)
    clock = Clock()
    live = LiveControl(api.manager, clock=clock)
    # eth1 saturated, every eth0 idle: nothing fires.
    api.manager.agent.stats = stats(  # type: ignore[method-assign]
        {("a", "eth0"): 1e6, ("a", "eth1"): 9.9e6, ("b", "eth0"): 1e6}
    )
    for _ in range(3):
        assert live.tick() == []
        clock.now += 1.0
    assert sorted(r["vnic"] for r in live.state("lab")["rules"]) == ["a/eth0", "b/eth0"]
    api.manager.agent.stats = stats(ALL_BUSY)  # type: ignore[method-assign]
    live.tick()
    clock.now += 1.0
    assert sorted((d.vm, d.nic) for d in live.tick()) == [("a", "eth0"), ("b", "eth0")]
    assert rate(api, "a", 0) == "20Mbit" and rate(api, "a", 1) == "10Mbit"


def test_a_rule_on_a_network_watches_its_vnics_and_reverts_them(api: Api) -> None:
    lab(api)
    controller(api, {**BUSY, "network": "data", "revert": True, "cooldown": "0s"})
    clock = Clock()
    live = LiveControl(api.manager, clock=clock)
    api.manager.agent.stats = stats(ALL_BUSY)  # type: ignore[method-assign]
    live.tick()
    clock.now += 1.0
    assert [(d.vm, d.nic, d.kind) for d in live.tick()] == [("a", "eth1", "apply")]
    assert rate(api, "a", 1) == "20Mbit" and rate(api, "a", 0) == "10Mbit"
    # eth1 quiet again for `for`: its adjustment goes; eth0 (still busy) was never touched.
    api.manager.agent.stats = stats(  # type: ignore[method-assign]
        {**ALL_BUSY, ("a", "eth1"): 1e6}
    )
    live.tick()
    clock.now += 1.0
    assert [(d.vm, d.nic, d.kind) for d in live.tick()] == [("a", "eth1", "revert")]
    assert rate(api, "a", 1) == "10Mbit" and rate(api, "a", 0) == "10Mbit"
    assert api.manager.runtime.adjustments("lab") == []
    assert [e.nic for e in api.manager.runtime.audit("lab")] == ["eth1", "eth1"]


def test_rule_scope_refusals_name_the_field_and_store_nothing(api: Api) -> None:
    lab(api)
    before = controller(api, BUSY)
    for change, field in (
        ({"network": "nope"}, "rules[0].network"),
        ({"network": "Not A Name"}, "rules[0].network"),
        ({"nic": "eth8"}, "rules[0].nic"),
        ({"nic": "wlan0"}, "rules[0].nic"),
        ({"vnic": "eth1"}, "rules[0].vnic"),
    ):
        answer = controller(api, {**BUSY, **change}, status=422)
        assert [e["field"] for e in answer["fields"]] == [field], answer
    answer = controller(api, {**BUSY, "network": "nope"}, status=422)
    assert "default, data" in answer["fields"][0]["expected"], answer
    r = api.call("admin", "GET", "/v1/sessions/lab/controller")
    assert r.json() == before
    stored = controller(api, {**BUSY, "nic": "eth*", "network": "data"})
    assert (stored["rules"][0]["nic"], stored["rules"][0]["network"]) == ("eth*", "data")


def test_a_stats_document_without_nics_is_eth0s() -> None:
    old = {"vm": "a", "egress": {"rate_bps": 1.0}}
    assert nic_samples(old) == [old]
    new = {**old, "nic": "eth0", "nics": [{"nic": "eth0"}, {"nic": "eth1"}]}
    assert [s["nic"] for s in nic_samples(new)] == ["eth0", "eth1"]


def feedback_limits(api: Api) -> None:
    doc = {
        "feedback": {
            "fields": ["egress.rate"],
            "max": {"egress.rate": "30Mbit"},
            "max_duration": "10m",
            "per_minute": 10,
        }
    }
    r = api.call("admin", "PUT", "/v1/sessions/lab/controller", json=doc)
    assert r.status_code == 200, r.text


def test_feedback_names_the_vnic_it_is_about(api: Api) -> None:
    lab(api)
    feedback_limits(api)
    live = LiveControl(api.manager, clock=Clock())
    status, answer = live.feedback("lab", "a", "GET", {})
    assert status == 200 and answer["nic"] == "eth0"
    assert [(n["nic"], n["network"]) for n in answer["nics"]] == [
        ("eth0", "default"),
        ("eth1", "data"),
    ]
    status, answer = live.feedback("lab", "a", "GET", {"nic": "eth1"})
    assert status == 200 and answer["effective"]["egress"]["rate"] == "10Mbit"
    ask = {"set": {"egress.rate": "20Mbit"}}
    status, answer = live.feedback("lab", "a", "POST", {**ask, "nic": "eth1"})
    assert status == 200 and answer["nic"] == "eth1", answer
    assert rate(api, "a", 1) == "20Mbit" and rate(api, "a", 0) == "10Mbit"
    status, answer = live.feedback("lab", "a", "POST", {"set": {"egress.rate": "25Mbit"}})
    assert status == 200 and answer["nic"] == "eth0"  # no nic: eth0
    assert rate(api, "a", 0) == "25Mbit" and rate(api, "a", 1) == "20Mbit"
    # The limits hold on every vNIC.
    status, answer = live.feedback(
        "lab", "a", "POST", {"set": {"egress.rate": "80Mbit"}, "nic": "eth1"}
    )
    assert status == 403 and "30Mbit" in answer["message"]
    for vm, nic, expected in (
        ("a", "eth3", "eth0, eth1"),
        ("b", "eth1", "eth0"),
        ("a", "x", "eth0.."),
    ):
        for method in ("POST", "DELETE", "GET"):
            status, answer = live.feedback("lab", vm, method, {**ask, "nic": nic})
            assert status == 422, (vm, nic, method, answer)
            assert (
                answer["fields"][0]["field"] == "nic"
                and expected in answer["fields"][0]["expected"]
            )
    assert rate(api, "b", 0) == "10Mbit"
    status, answer = live.feedback("lab", "a", "DELETE", {"nic": "eth1"})
    assert status == 200 and answer["changed"]["egress.rate"]["new"] == "10Mbit"
    assert rate(api, "a", 1) == "10Mbit" and rate(api, "a", 0) == "25Mbit"  # eth0 keeps its grant
    audit = api.manager.runtime.audit("lab")
    assert [(e.source, e.nic) for e in reversed(audit)] == [
        ("feedback", "eth1"),
        ("feedback", None),  # eth0: as before VMs had several vNICs
        ("feedback", "eth1"),
    ]
    events = [(e["kind"], e["nic"]) for e in live.state("lab")["events"]]
    assert events == [("apply", "eth1"), ("apply", "eth0"), ("refused", "eth1")]


def test_a_scenario_on_eth1_changes_eth1_of_the_vms_that_have_one(api: Api) -> None:
    lab(api)
    live = LiveControl(api.manager)
    doc = {
        "name": "slow",
        "nic": "eth1",
        "loop": True,  # still running when stopped: stop takes its layer away
        "duration": "1s",
        "steps": [{"at": "0s", "set": {"egress.rate": "5Mbit"}}],
    }
    started = live.start_scenario("lab", doc)
    assert started["vms"] == ["a"] and started["nic"] == "eth1"  # b has no eth1
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and rate(api, "a", 1) != "5Mbit":
        time.sleep(0.01)
    assert rate(api, "a", 1) == "5Mbit"
    assert rate(api, "a", 0) == "10Mbit" and rate(api, "b", 0) == "10Mbit"
    (adjustment,) = api.manager.runtime.adjustments("lab")
    assert (adjustment.vm, adjustment.nic, adjustment.source) == ("a", "eth1", "scenario:slow")
    assert live.scenario("lab", "slow", "stop")["state"] == "stopped"
    assert rate(api, "a", 1) == "10Mbit" and api.manager.runtime.adjustments("lab") == []
    with pytest.raises(InvalidInput) as exc:
        live.start_scenario("lab", {**doc, "name": "other", "vms": ["a", "b"]})
    (error,) = exc.value.errors
    assert (error.path, "b has eth0" in error.expected) == ("nic", True), error
    with pytest.raises(InvalidInput) as exc:
        live.start_scenario("lab", {**doc, "name": "other", "nic": "eth9"})
    assert exc.value.errors[0].path == "nic"
