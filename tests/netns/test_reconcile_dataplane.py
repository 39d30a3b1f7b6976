"""What a restarting host agent needs from the netns driver, on the real kernel.

``inventory`` finds every VM that has anything on the host, ``drift`` names
each difference between the kernel and what a launch builds, and
``destroy``/``teardown_session`` remove whatever a launch killed at any moment
left. Every assertion is on state read back from the kernel, /proc and the
run dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from tests.netns.conftest import Lab, launch_in_child, leftovers
from tests.netns.helpers import with_nic
from vnic.dataplane import delayd
from vnic.dataplane import namespaces as nsops
from vnic.manager.results import VmRequest
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.compile import guard_chain

#: A profile the delay engine carries (this kernel has no netem), with rates both ways.
DELAYED = {"egress": {"rate": "10Mbit", "delay": "5ms"}, "ingress": {"rate": "20Mbit"}}
#: A profile shaped by HTB alone, with a TCP setting to read back.
PLAIN = {"egress": {"rate": "10Mbit"}, "ingress": {"rate": "20Mbit"}, "tcp": {"sack": False}}


def requests(lab: Lab) -> dict[str, LaunchRequest]:
    """The launch request of every running VM of the lab, by VM name (the agent's desired state)."""
    return {r.vm: r for _, r in lab.service.desired()}


def tagged_links(session: str) -> dict[str, str]:
    """Links in the session namespace carrying a VM owner tag: name -> tag (empty without it)."""
    ns = names.session_netns(session)
    if ns not in nsops.listing():
        return {}
    proc = nsops.run(ns, ["ip", "-j", "link", "show"], capture_output=True, timeout=10)
    if proc.returncode != 0:  # a placeholder file, not a namespace: no links can be in it
        return {}
    prefix = names.owner_tag(session, "x")[:-1]
    return {
        str(link["ifname"]): str(link["ifalias"])
        for link in json.loads(proc.stdout or "[]")
        if str(link.get("ifalias", "")).startswith(prefix)
    }


def engine_pids(session: str) -> list[int]:
    """Live delay-engine processes carrying one of ``session``'s owner tags."""
    return sorted(pid for pid, (s, _) in delayd.engine_processes().items() if s == session)


def run_files(session: str) -> list[str]:
    directory = delayd.run_dir(session)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def nothing_left(lab: Lab, session: str) -> None:
    """Assert that nothing of ``session`` is on the host, read back every way there is."""
    assert leftovers(session) == []
    assert tagged_links(session) == {}
    assert engine_pids(session) == []
    assert run_files(session) == []
    assert session not in lab.driver.inventory()


def wait_until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def placeholders() -> Iterator[list[str]]:
    """Placeholder files this test put in /run/netns; removed if the test did not."""
    made: list[str] = []
    yield made
    for name in made:
        path = Path(nsops.RUN_DIR, name)
        if path.is_file() and path.stat().st_size == 0 and not os.path.ismount(path):
            path.unlink()


# ----------------------------------------------------------------------------- inventory


@pytest.mark.timeout(60)
def test_inventory_finds_vms_by_every_object_they_have(lab: Lab) -> None:
    lab.profile(name="plain", **PLAIN)
    lab.profile(name="delayed", **DELAYED)
    s = lab.session(default="plain")
    lab.launch(s, "a")
    lab.launch(s, "b", profile="delayed")
    lab.launch(s, "c")
    empty = lab.session(default="plain")
    lab.launch(empty, "gone")
    lab.driver.destroy(empty, "gone")  # its session namespace stays, with no VM in it
    # Behind vnic's back: c's namespace goes, taking eth0 and the port; its IFB stays.
    subprocess.run(["ip", "netns", "delete", names.vm_netns(s, "c")], check=True, timeout=10)
    assert set(tagged_links(s).values()) >= {names.owner_tag(s, "c")}

    inventory = lab.driver.inventory()

    assert inventory[s] == {"a", "b", "c"}
    assert inventory[empty] == set()
    assert delayd.running(s, "b")

    # The VM found only by its links is removed by destroy, links and all.
    lab.driver.destroy(s, "c")
    assert names.owner_tag(s, "c") not in tagged_links(s).values()
    assert lab.driver.inventory()[s] == {"a", "b"}


# ----------------------------------------------------------------------------- drift


@pytest.mark.timeout(60)
def test_drift_is_empty_after_launch_and_names_each_change(lab: Lab) -> None:
    lab.profile(name="plain", **PLAIN)
    lab.profile(name="delayed", **DELAYED)
    s = lab.session(default="plain")
    lab.launch(s, "a")
    lab.launch(s, "b", profile="delayed")
    wanted = requests(lab)
    assert lab.driver.drift(wanted["a"]) == []
    assert lab.driver.drift(wanted["b"]) == []

    session_ns = names.session_netns(s)
    links_a = names.VmLinks.of("a")
    ingress = lab.driver.plan_for(wanted["a"]).ingress
    assert ingress.root is not None
    default = next(c for c in ingress.classes if c.minor == ingress.root.default_minor)
    parent = f"1:{default.parent_minor:x}" if default.parent_minor else "1:"
    # A class rate changed with tc, inside the session namespace.
    change = ["tc", "class", "change", "dev", links_a.port, "parent", parent]
    change += ["classid", f"1:{default.minor:x}", "htb", "rate", "10mbit", "ceil", "20mbit"]
    subprocess.run(["ip", "netns", "exec", session_ns, *change], check=True, timeout=10)
    rate = f"ingress class 1:{default.minor:x} on {links_a.port} rate"
    assert f"{rate}: expected 20Mbit, found 10Mbit" in lab.driver.drift(wanted["a"])

    # A sysctl changed inside the VM (the profile turns SACK off).
    vm_a = names.vm_netns(s, "a")
    subprocess.run(
        ["ip", "netns", "exec", vm_a, "sysctl", "-qw", "net.ipv4.tcp_sack=1"],
        check=True,
        timeout=10,
    )
    assert "sysctl net.ipv4.tcp_sack: expected 0, found 1" in lab.driver.drift(wanted["a"])

    # The IFB deleted: named, and its classes and qdiscs are not reported on top.
    subprocess.run(["ip", "-n", session_ns, "link", "del", links_a.ifb], check=True, timeout=10)
    drift = lab.driver.drift(wanted["a"])
    assert f"IFB {links_a.ifb}: expected present, found missing" in drift
    assert not [d for d in drift if "class" in d and links_a.ifb in d]

    # The guard's chain removed from nftables.
    chain = guard_chain(links_a.port)
    script = f"flush chain bridge vnic {chain}\n"
    subprocess.run(
        ["ip", "netns", "exec", session_ns, "nft", "-f", "-"],
        input=script,
        text=True,
        check=True,
        timeout=10,
    )
    drift = lab.driver.drift(wanted["a"])
    assert any(d.startswith(f"nft chain {chain} rules: expected spoof-mac") for d in drift), drift
    assert any(d.endswith("found none") for d in drift if d.startswith(f"nft chain {chain}"))

    # The desired profile changed (10 ms, 30 Mbit/s in): the engine's arguments and the
    # ingress classes no longer match it.
    lab.profile(name="slower", egress={"delay": "10ms"}, ingress={"rate": "30Mbit"})
    lab.launch(s, "x", profile="slower")
    changed = with_nic(wanted["b"], profile=requests(lab)["x"].profile)
    drift = lab.driver.drift(changed)
    assert "delay engine egress delay: expected 10000000, found 5000000" in drift, drift
    assert any(d.endswith("rate: expected 30Mbit, found 20Mbit") for d in drift), drift

    # The delay engine killed, by its recorded pid only.
    pid = int((delayd.run_dir(s) / "b.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not nsops.alive(pid))
    assert lab.driver.drift(wanted["b"]) == [
        "delay engine: expected running, found not running (its pid file names no live engine)"
    ]

    # Rebuilt from scratch, as the agent repairs a drifted VM: no drift left.
    for vm in ("a", "b"):
        lab.driver.destroy(s, vm)
        lab.driver.launch(wanted[vm])
        assert lab.driver.drift(wanted[vm]) == []

    # A VM that is not there at all is one difference.
    lab.driver.destroy(s, "a")
    assert lab.driver.drift(wanted["a"]) == [f"VM {s}/a: namespace {vm_a} expected, found missing"]


# ----------------------------------------------------------------------------- partial states


@pytest.mark.timeout(60)
def test_destroy_removes_each_partial_state_a_killed_launch_can_leave(
    lab: Lab, placeholders: list[str]
) -> None:
    """The windows a kill lands in rarely, made on purpose."""
    lab.profile(name="delayed", **DELAYED)
    s = lab.session(default="delayed")
    lab.launch(s, "up")
    session_ns = names.session_netns(s)

    # A VM namespace file made but not mounted yet (killed inside namespaces.create).
    placeholder = names.vm_netns(s, "unmounted")
    Path(nsops.RUN_DIR, placeholder).touch()
    placeholders.append(placeholder)
    # Links made but not tagged yet (killed between adding a link and setting its alias).
    untagged = names.VmLinks.of("untagged")
    subprocess.run(
        ["ip", "-n", session_ns, "link", "add", untagged.ifb, "type", "ifb"], check=True, timeout=10
    )
    veth = ["link", "add", untagged.relay, "type", "veth", "peer", "name", untagged.relay_port]
    subprocess.run(["ip", "-n", session_ns, *veth], check=True, timeout=10)
    Path(nsops.RUN_DIR, names.vm_netns(s, "untagged")).touch()  # found by its namespace
    placeholders.append(names.vm_netns(s, "untagged"))
    # Engine files without an engine (killed before the pid was written, or after it died).
    run = delayd.run_dir(s)
    (run / "argvonly.argv").write_text("[]")
    (run / "argvonly.log").write_text("")
    (run / "deadpid.pid").write_text("999999999\n")
    # An engine whose pid was never recorded: the VM's pid file is gone, the engine runs.
    engine = int((run / "up.pid").read_text())
    (run / "up.pid").unlink()

    found = lab.driver.inventory()[s]
    assert found == {"up", "unmounted", "untagged", "argvonly", "deadpid"}
    for vm in sorted(found):
        lab.driver.destroy(s, vm)
    assert not nsops.alive(engine)
    assert leftovers(s) == [session_ns]
    links = json.loads(
        nsops.run(session_ns, ["ip", "-j", "link"], capture_output=True, timeout=10).stdout
    )
    assert sorted(link["ifname"] for link in links) == ["lo", names.BRIDGE]
    assert run_files(s) == []
    assert lab.driver.inventory()[s] == set()

    # A session namespace file made but not mounted: found, and teardown removes it.
    lab.driver.teardown_session(s)
    Path(nsops.RUN_DIR, session_ns).touch()
    placeholders.append(session_ns)
    assert lab.driver.inventory()[s] == set()
    lab.driver.teardown_session(s)
    nothing_left(lab, s)


# ----------------------------------------------------------------------------- kill at any moment


def _launch_in_child(lab: Lab) -> tuple[str, subprocess.Popen[bytes]]:
    """A new session, and VM ``k`` (delay + rates) launched in it by a child process,
    once the launch starts touching the kernel (its session namespace appears; before
    that the child only imports, reads the database and plans)."""
    s = lab.session(default="delayed")
    lab.service.add_vm(VmRequest(s, "k"))
    proc = launch_in_child(lab, s, ["k"])
    wait_until(lambda: names.session_netns(s) in nsops.listing() or proc.poll() is not None, 30)
    return s, proc


def _state(lab: Lab, s: str) -> str:
    try:
        return lab.service.explain(s, "k").vm.state
    except OperationalError:  # the child is writing it
        return "busy"


def _launch_duration(lab: Lab) -> float:
    """Seconds from a child's launch touching the kernel until the VM is recorded running."""
    s, proc = _launch_in_child(lab)
    started = time.monotonic()
    try:
        wait_until(lambda: _state(lab, s) == "running", 30)
        return time.monotonic() - started
    finally:
        proc.wait(timeout=30)
        lab.driver.teardown_session(s)
        nothing_left(lab, s)


def _launch_killed_after(lab: Lab, delay: float) -> str:
    """Launch ``k`` in a child and SIGKILL it ``delay`` s into the launch; the session."""
    s, proc = _launch_in_child(lab)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return s


@pytest.mark.timeout(120)
def test_whatever_a_killed_launch_left_is_found_and_removed(lab: Lab) -> None:
    lab.profile(name="delayed", **DELAYED)
    duration = _launch_duration(lab)
    phases = set()
    for i in range(8):
        s = _launch_killed_after(lab, duration * i / 7)
        # Read back, independently of inventory, what the kill left.
        vms = {names.parse_vm_netns(n, s) for n in leftovers(s)} - {None}
        vms |= {tag.rsplit("/", 1)[1] for tag in tagged_links(s).values()}
        vms |= {p.split(".")[0] for p in run_files(s)}
        vms |= {vm for s2, vm in delayd.engine_processes().values() if s2 == s}
        phases.add((bool(leftovers(s)), bool(vms), bool(engine_pids(s))))
        inventory = lab.driver.inventory()
        if leftovers(s) or vms:
            assert inventory.get(s) == vms, (i, inventory.get(s), vms)
        # What the agent does with what nobody wants: each VM, then the session.
        for vm in sorted(inventory.get(s, set())):
            lab.driver.destroy(s, vm)
        lab.driver.teardown_session(s)
        nothing_left(lab, s)
    # The kills landed in different phases of the launch (session only, VM, engine running).
    assert len(phases) >= 2, phases
