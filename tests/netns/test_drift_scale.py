"""``drift_many``: the drift of many VMs from one read of each session namespace, sentence
for sentence what ``drift`` says VM by VM, on the real kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.netns.conftest import Lab
from tests.netns.helpers import with_nic
from vnic.dataplane import delayd
from vnic.dataplane import namespaces as nsops
from vnic.manager.results import VmRequest
from vnic.model.launch import LaunchRequest
from vnic.plan import names

#: Shaped both ways, with a TCP setting read back inside the VM.
SHAPED = {"egress": {"rate": "100Mbit"}, "ingress": {"rate": "100Mbit"}, "tcp": {"sack": False}}
#: Carried by the delay engine (this kernel has no netem), rates both ways.
DELAYED = {"egress": {"rate": "100Mbit", "delay": "2ms"}, "ingress": {"rate": "100Mbit"}}
#: A queue in packets (a pfifo leaf) and per-route congestion control.
PACKETS = {
    "egress": {"rate": "50Mbit", "queue": "100pkt"},
    "ingress": {"rate": "100Mbit"},
    "tcp": {"congestion_control": "cubic"},
}

Key = tuple[str, str]


def launch_all(lab: Lab, session: str, vms: dict[str, str]) -> None:
    """Define ``vms`` (name -> profile) in ``session`` and launch them side by side."""
    for vm, profile in vms.items():
        lab.service.add_vm(VmRequest(session, vm, profile=profile))
    outcomes = lab.service.launch_many(session, list(vms), agents=lab.agents)
    assert [o.error for o in outcomes if o.error] == []


def wanted(lab: Lab) -> list[LaunchRequest]:
    """The launch request of every running VM of the lab (the agent's desired state)."""
    return sorted((r for _, r in lab.service.desired()), key=lambda r: (r.session, r.vm))


def one_by_one(lab: Lab, requests: list[LaunchRequest]) -> dict[Key, list[str]]:
    return {(r.session, r.vm): lab.driver.drift(r) for r in requests}


def in_session(session: str, *argv: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", names.session_netns(session), *argv], check=True, timeout=10
    )


@pytest.mark.timeout(120)
def test_drift_many_says_what_drift_says_of_each_vm(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, doc in (("shaped", SHAPED), ("delayed", DELAYED), ("packets", PACKETS)):
        lab.profile(name=name, **doc)
    s1 = lab.session(default="shaped")
    launch_all(lab, s1, {"a": "shaped", "b": "delayed", "c": "packets", "d": "shaped"})
    launch_all(lab, s1, {"e": "delayed"})
    s2 = lab.session(default="shaped")
    launch_all(lab, s2, {"x": "shaped", "y": "delayed"})
    requests = wanted(lab)
    keys = [(r.session, r.vm) for r in requests]
    assert len(keys) == 7

    # Right after launch nothing differs, either way.
    many = lab.driver.drift_many(requests)
    assert many == {key: [] for key in keys}
    assert one_by_one(lab, requests) == many

    # One read of each session namespace, whatever the number of its VMs: one link dump
    # (ip), one qdisc dump (tc), one nftables listing (nft); nothing per VM.
    tools: list[str] = []
    run = subprocess.run

    def counted(argv: Any, *args: Any, **kwargs: Any) -> Any:
        tools.append(os.path.basename(str(argv[0])))
        return run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    assert lab.driver.drift_many(requests) == many
    monkeypatch.undo()
    assert sorted(tools) == ["ip", "ip", "nft", "nft", "tc", "tc"]

    # Changes behind vnic's back, one per VM.
    by_key = dict(zip(keys, requests, strict=True))
    links = {vm: names.VmLinks.of(vm) for vm in ("a", "b", "c", "d", "e", "x", "y")}
    # a: an ingress class rate, changed with tc.
    ingress = lab.driver.plan_for(by_key[(s1, "a")]).ingress
    assert ingress.root is not None
    default = next(c for c in ingress.classes if c.minor == ingress.root.default_minor)
    parent = f"1:{default.parent_minor:x}" if default.parent_minor else "1:"
    in_session(
        s1,
        *["tc", "class", "change", "dev", links["a"].port, "parent", parent],
        *["classid", f"1:{default.minor:x}", "htb", "rate", "10mbit"],
        *["ceil", f"{default.ceil * 8}bit", "prio", str(default.prio)],
    )
    # b: its delay engine killed, by its recorded pid.
    pid = int((delayd.run_dir(s1) / "b.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while nsops.alive(pid):
        assert time.monotonic() < deadline, "the engine did not die"
        time.sleep(0.01)
    # c: its packet queue shortened.
    leaf = lab.driver.plan_for(by_key[(s1, "c")]).egress.leaves[0]
    assert leaf.kind == "pfifo"
    in_session(
        s1,
        *["tc", "qdisc", "replace", "dev", leaf.device, "parent", f"1:{leaf.class_minor:x}"],
        *["pfifo", "limit", "7"],
    )
    # e: its namespace gone; x: eth0 down inside the VM; ghost: never launched.
    subprocess.run(["ip", "netns", "delete", names.vm_netns(s1, "e")], check=True, timeout=10)
    subprocess.run(
        ["ip", "-n", names.vm_netns(s2, "x"), "link", "set", "eth0", "down"],
        check=True,
        timeout=10,
    )
    ghost = replace(by_key[(s2, "y")], vm="ghost")
    requests.append(ghost)
    # y: asked for with another profile than it was launched with.
    requests[keys.index((s2, "y"))] = with_nic(by_key[(s2, "y")], profile=by_key[(s2, "x")].profile)

    many = lab.driver.drift_many(requests)
    assert many == one_by_one(lab, requests)
    rate = f"ingress class 1:{default.minor:x} on {links['a'].port} rate"
    assert many[(s1, "a")] == [f"{rate}: expected 100Mbit, found 10Mbit"]
    assert many[(s1, "b")] == [
        "delay engine: expected running, found not running (its pid file names no live engine)"
    ]
    assert many[(s1, "c")] == [
        f"qdisc under 1:{leaf.class_minor:x} on {leaf.device} limit: expected {leaf.limit}, found 7"
    ]
    assert many[(s1, "d")] == []
    e_ns = names.vm_netns(s1, "e")
    assert many[(s1, "e")] == [f"VM {s1}/e: namespace {e_ns} expected, found missing"]
    assert "eth0 state: expected up, found down" in many[(s2, "x")]
    y = links["y"]
    assert f"IFB {y.ifb}: expected present, found missing" in many[(s2, "y")]
    assert f"relay {y.relay}: expected none, found one" in many[(s2, "y")]
    assert "delay engine: expected none, found one running" in many[(s2, "y")]
    g_ns = names.vm_netns(s2, "ghost")
    assert many[(s2, "ghost")] == [f"VM {s2}/ghost: namespace {g_ns} expected, found missing"]
