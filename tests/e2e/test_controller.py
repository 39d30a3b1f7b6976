"""The controller at work in a real `vnic serve`, with real traffic in a real session:

- a threshold rule fires on measured utilisation and the rate in the kernel follows;
- an application inside a VM asks the feedback endpoint for more bandwidth: granted within
  the session's limits, refused beyond them, refused when it names another VM;
- a scenario timeline changes the kernel on time;
- a rule on eth1 of two-vNIC VMs fires on eth1's traffic and shapes eth1 only, while
  eth0 carries as much; a VM's feedback naming eth1 changes eth1's kernel rate only;
- every change leaves the fields it does not name as they were, and is audited.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Client, Server, admin_token
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_classes
from vnic.drivers.netns import NetnsDriver
from vnic.lab import measure
from vnic.model.launch import PRIMARY_NIC, link_unit
from vnic.plan import names

MBIT = 1_000_000


def egress_rate_bps(session: str, vm: str, nic: str = PRIMARY_NIC) -> int:
    """The rate of the vNIC's egress HTB root class, read from the kernel (bit/s)."""
    with nsops.opened(names.session_netns(session)) as ns:
        classes = read_classes(ns, names.VmLinks.of(link_unit(vm, nic)).ifb)
    return int(classes[1].rate) * 8


def start(
    home: Path,
    session: str,
    controller: dict[str, Any] | None = None,
    *,
    data: bool = False,
) -> tuple[Server, Client]:
    """``vnic serve`` with session ``session`` and VMs a and b; ``data``: with network
    ``data`` too, and each VM with a second vNIC (eth1) on it."""
    server = Server(home, "serve", "--controller-interval", "0.5", "--latency-interval", "2")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    profile = {"name": "base", "egress": {"rate": "10Mbit"}, "ingress": {"rate": "50Mbit"}}
    admin("POST", "/v1/profiles", 201, json=profile)
    admin("POST", "/v1/sessions", 201, json={"name": session, "default_profile": "base"})
    if data:
        admin("POST", f"/v1/sessions/{session}/networks", 201, json={"name": "data"})
    if controller is not None:
        admin("PUT", f"/v1/sessions/{session}/controller", json=controller)
    for vm in ("a", "b"):
        body: dict[str, Any] = {"name": vm, "launch": True}
        if data:
            body["nics"] = [{}, {"network": "data"}]
        admin("POST", f"/v1/sessions/{session}/vms", 201, json=body)
    return server, admin


def stop(server: Server, admin: Client, session: str) -> None:
    try:
        admin("DELETE", f"/v1/sessions/{session}", 204, params={"force": True})
    finally:
        server.kill()
        NetnsDriver().teardown_session(session)


def untouched(before: dict[str, Any], after: dict[str, Any], changed: set[str]) -> list[str]:
    """Fields whose value or source differs between two explains, other than ``changed``."""
    return [
        path
        for path, field in after["effective"]["fields"].items()
        if path not in changed and field != before["effective"]["fields"][path]
    ]


def test_threshold_rule_fires_on_real_traffic_and_the_rate_follows(
    home: Path, session_name: str
) -> None:
    rule = {
        "name": "busy",
        "vms": "a",
        "metric": "egress.utilisation",
        "above": "80%",
        "for": "1s",
        "hysteresis": "10%",
        "cooldown": "60s",
        "action": {
            "scale": {"field": "egress.rate", "factor": 2, "floor": "1Mbit", "ceiling": "20Mbit"}
        },
    }
    server, admin = start(home, session_name, {"rules": [rule]})
    try:
        s = session_name
        before = admin("GET", f"/v1/sessions/{s}/vms/a/explain")
        assert egress_rate_bps(s, "a") == 10 * MBIT
        ip_b = admin("GET", f"/v1/sessions/{s}/vms/b")["ipv4"]
        result: dict[str, Any] = {}
        flow = threading.Thread(
            target=lambda: result.update(t=measure.iperf3(s, "a", "b", ip_b, seconds=8, omit=0))
        )
        flow.start()
        fired_at = None
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and fired_at is None:
            if egress_rate_bps(s, "a") == 20 * MBIT:
                fired_at = time.monotonic()
            time.sleep(0.1)
        flow.join(timeout=30)
        assert fired_at is not None, admin("GET", f"/v1/sessions/{s}/controller/state")
        assert "t" in result, "the flow through the change failed"
        # The scale is clamped at the ceiling and happens once (cooldown).
        time.sleep(1.5)
        assert egress_rate_bps(s, "a") == 20 * MBIT
        assert egress_rate_bps(s, "b") == 10 * MBIT  # the rule names a only
        after = admin("GET", f"/v1/sessions/{s}/vms/a/explain")
        source = after["effective"]["fields"]["egress.rate"]["source"]
        assert source["layer"] == "runtime" and source["detail"].startswith("rule:busy: ")
        assert untouched(before, after, {"egress.rate", "egress.queue"}) == []
        (entry,) = [e for e in admin("GET", "/v1/audit", params={"session": s}) if e["vm"] == "a"]
        assert entry["source"] == "rule:busy"
        assert (entry["old"]["egress.rate"], entry["new"]["egress.rate"]) == ("10Mbit", "20Mbit")
        assert "egress.utilisation" in entry["reason"]
    finally:
        stop(server, admin, session_name)


def ask(
    session: str, vm: str, network_id: int, method: str, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    """An HTTP request from inside the VM to the session's feedback endpoint."""
    from vnic.agent.feedback import endpoint_url

    script = (
        "import json,sys,urllib.request,urllib.error\n"
        "req=urllib.request.Request(sys.argv[1],method=sys.argv[2],data=sys.argv[3].encode() or None,"
        "headers={'Content-Type':'application/json'})\n"
        "try:\n r=urllib.request.urlopen(req,timeout=10); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
    )
    import sys

    proc = nsops.run(
        names.vm_netns(session, vm),
        [
            sys.executable,
            "-c",
            script,
            endpoint_url(network_id),
            method,
            json.dumps(body) if body else "",
        ],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    status, _, text = proc.stdout.partition("\n")
    return int(status), json.loads(text)


def test_feedback_from_inside_a_vm_within_limits_and_beyond(home: Path, session_name: str) -> None:
    limits = {
        "feedback": {
            "enabled": True,
            "fields": ["egress.rate", "egress.delay"],
            "max": {"egress.rate": "30Mbit"},
            "max_duration": "10m",
            "per_minute": 20,
        }
    }
    server, admin = start(home, session_name, limits)
    try:
        s = session_name
        net = admin("GET", f"/v1/sessions/{s}")["network_id"]
        before_b = admin("GET", f"/v1/sessions/{s}/vms/b/explain")

        status, answer = ask(s, "a", net, "GET", None)
        assert status == 200 and answer["vm"] == "a", answer  # known by its address

        status, answer = ask(
            s, "a", net, "POST", {"set": {"egress.rate": "25Mbit"}, "duration": "5m"}
        )
        assert status == 200, answer
        assert egress_rate_bps(s, "a") == 25 * MBIT

        status, answer = ask(s, "a", net, "POST", {"set": {"egress.rate": "80Mbit"}})
        assert status == 403, answer
        assert "egress.rate" in answer["message"] and "30Mbit" in answer["message"]
        assert egress_rate_bps(s, "a") == 25 * MBIT  # the refusal changed nothing

        status, answer = ask(s, "a", net, "POST", {"vm": "b", "set": {"egress.rate": "20Mbit"}})
        assert status == 403 and "a" in answer["message"], answer
        assert egress_rate_bps(s, "b") == 10 * MBIT
        assert admin("GET", f"/v1/sessions/{s}/vms/b/explain") == before_b

        status, answer = ask(s, "a", net, "POST", {"set": {"ingress.rate": "1Mbit"}})
        assert status == 403 and "ingress.rate" in answer["message"], answer

        entries = admin("GET", "/v1/audit", params={"session": s, "vm": "a"})
        assert [e["source"] for e in entries] == ["feedback"]
        assert entries[0]["new"]["egress.rate"] == "25Mbit"

        status, _ = ask(s, "a", net, "DELETE", None)
        assert status == 200
        assert egress_rate_bps(s, "a") == 10 * MBIT
    finally:
        stop(server, admin, session_name)


def test_scenario_timeline_changes_the_kernel_on_time(home: Path, session_name: str) -> None:
    server, admin = start(home, session_name)
    try:
        s = session_name
        scenario = {
            "name": "steps",
            "vms": ["a"],
            "steps": [
                {"at": "0s", "set": {"egress.rate": "5Mbit"}},
                {"at": "1s", "set": {"egress.rate": "15Mbit"}},
                {"at": "2s", "clear": True},
            ],
        }
        started_at = time.monotonic()
        started = admin("POST", f"/v1/sessions/{s}/scenarios", 201, json=scenario)
        assert started["state"] == "running"
        # The kernel's rate, sampled until the timeline has ended (bounded): each step
        # reaches the kernel, in order, and none before its time. How punctual the steps
        # are is a benchmark's (vnic bench change), not a test's: a loaded machine is late.
        seen: list[tuple[float, int]] = []
        while time.monotonic() - started_at < 60:
            seen.append((time.monotonic() - started_at, egress_rate_bps(s, "a")))
            if any(r == 15 * MBIT for _, r in seen) and seen[-1][1] == 10 * MBIT:
                break
            time.sleep(0.02)
        steps = [r for i, (_, r) in enumerate(seen) if i == 0 or r != seen[i - 1][1]]
        if steps[0] == 10 * MBIT:  # sampled before the first step reached the kernel
            steps = steps[1:]
        assert steps == [5 * MBIT, 15 * MBIT, 10 * MBIT], seen  # the last: cleared, the profile's
        first_15 = min(when for when, r in seen if r == 15 * MBIT)
        back_to_10 = min(when for when, r in seen if r == 10 * MBIT and when > first_15)
        assert first_15 >= 1.0 and back_to_10 >= 2.0, seen  # never early
        done = admin("POST", f"/v1/sessions/{s}/scenarios/steps/stop")
        assert done["steps_applied"] == 3, done
        assert egress_rate_bps(s, "b") == 10 * MBIT
    finally:
        stop(server, admin, session_name)


def test_a_rule_on_eth1_shapes_eth1_on_its_traffic_and_leaves_eth0(
    home: Path, session_name: str
) -> None:
    rule = {
        "name": "busy-data",
        "nic": "eth1",
        "metric": "egress.utilisation",
        "above": "80%",
        "for": "0.5s",
        "cooldown": "60s",
        "action": {"scale": {"field": "egress.rate", "factor": 2, "ceiling": "20Mbit"}},
    }
    server, admin = start(home, session_name, {"rules": [rule]}, data=True)
    try:
        s = session_name
        before = admin("GET", f"/v1/sessions/{s}/vms/a/explain")
        eth0_b, eth1_b = (n["ipv4"] for n in admin("GET", f"/v1/sessions/{s}/vms/b")["nics"])
        assert egress_rate_bps(s, "a", "eth1") == egress_rate_bps(s, "a") == 10 * MBIT
        # Both vNICs of a saturated at once, each towards b's vNIC on the same network:
        # only the rule's scope, eth1, decides which one is scaled.
        results: dict[str, Any] = {}

        def flow(nic: str, ip: str, port: int) -> None:
            results[nic] = measure.iperf3(s, "a", "b", ip, seconds=3, omit=0, port=port)

        flows = [
            threading.Thread(target=flow, args=("eth0", eth0_b, 5201)),
            threading.Thread(target=flow, args=("eth1", eth1_b, 5202)),
        ]
        for t in flows:
            t.start()
        fired = False
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not fired:
            fired = egress_rate_bps(s, "a", "eth1") == 20 * MBIT
            time.sleep(0.1)
        for t in flows:
            t.join(timeout=30)
        state = admin("GET", f"/v1/sessions/{s}/controller/state")
        assert fired, state
        assert set(results) == {"eth0", "eth1"}, "a flow failed"
        assert egress_rate_bps(s, "a") == 10 * MBIT  # eth0, as busy, untouched
        assert egress_rate_bps(s, "b", "eth1") == 10 * MBIT  # b's eth1 only acknowledged
        after = admin("GET", f"/v1/sessions/{s}/vms/a/explain")
        assert after["nics"][0] == before["nics"][0]  # eth0: every field and layer
        source = after["nics"][1]["effective"]["fields"]["egress.rate"]["source"]
        assert source["layer"] == "runtime" and source["detail"].startswith("rule:busy-data: ")
        (entry,) = admin("GET", "/v1/audit", params={"session": s})
        assert (entry["vm"], entry["nic"], entry["source"]) == ("a", "eth1", "rule:busy-data")
        assert (entry["old"]["egress.rate"], entry["new"]["egress.rate"]) == ("10Mbit", "20Mbit")
        watched = {r["vnic"] for r in state["rules"]}
        assert watched == {"a/eth1", "b/eth1"}, state
    finally:
        stop(server, admin, session_name)


def test_feedback_naming_eth1_changes_eth1_in_the_kernel_only(
    home: Path, session_name: str
) -> None:
    limits = {
        "feedback": {
            "fields": ["egress.rate"],
            "max": {"egress.rate": "30Mbit"},
            "max_duration": "10m",
            "per_minute": 20,
        }
    }
    server, admin = start(home, session_name, limits, data=True)
    try:
        s = session_name
        net = admin("GET", f"/v1/sessions/{s}")["network_id"]
        status, answer = ask(s, "a", net, "GET", None)
        assert status == 200 and [n["nic"] for n in answer["nics"]] == ["eth0", "eth1"], answer
        status, answer = ask(s, "a", net, "POST", {"nic": "eth1", "set": {"egress.rate": "25Mbit"}})
        assert status == 200 and answer["nic"] == "eth1", answer
        assert egress_rate_bps(s, "a", "eth1") == 25 * MBIT
        assert egress_rate_bps(s, "a") == 10 * MBIT
        status, answer = ask(s, "a", net, "POST", {"nic": "eth3", "set": {"egress.rate": "5Mbit"}})
        assert status == 422 and answer["fields"][0]["field"] == "nic", answer
        (entry,) = admin("GET", "/v1/audit", params={"session": s, "vm": "a"})
        assert (entry["source"], entry["nic"]) == ("feedback", "eth1")
        status, _ = ask(s, "a", net, "DELETE", {"nic": "eth1"})
        assert status == 200
        assert egress_rate_bps(s, "a", "eth1") == 10 * MBIT
    finally:
        stop(server, admin, session_name)
