"""The emulated-host bed on the real kernel: an underlay the hosts share and the machine
does not, namespaces private to each host, the same session and VM on two hosts at once,
a partition and its heal, the manager host on the throwaway PostgreSQL, and a destroy
(also of a bed a killed run left, and of a failed create) that leaves nothing."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import new_pg_url
from tests.netns.helpers import until
from tests.netns.hostbeds import VNIC, new_bed
from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.lab.hostbed import Host, HostBed

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostBed]:
    with new_bed(3, tmp_path_factory.mktemp("hosts")) as made:
        yield made


def pings(bed: HostBed, host: str, address: str) -> bool:
    return bed.run(host, ["ping", "-c", "1", "-W", "1", address], timeout=10).returncode == 0


def machine_addresses() -> list[str]:
    """The machine's own global addresses (its root namespace), IPv4 and IPv6."""
    proc = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    return [
        a["local"]
        for link in json.loads(proc.stdout)
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    ]


def test_hosts_reach_each_other_and_the_manager_not_the_machine(bed: HostBed) -> None:
    h1, h2, h3 = bed.hosts
    for src, dst in [(h1, h2), (h2, h3), (h3, h1), (h1, bed.manager), (bed.manager, h3)]:
        assert pings(bed, src.short, dst.address4), f"{src.short} -> {dst.short} (IPv4)"
        assert pings(bed, src.short, dst.address6), f"{src.short} -> {dst.short} (IPv6)"
    underlay = ipaddress.ip_network("10.250.0.0/24"), ipaddress.ip_network("fd00:250::/64")
    outside = [
        a for a in machine_addresses() if not any(ipaddress.ip_address(a) in n for n in underlay)
    ]
    assert outside, "the machine has no global address to try"
    for address in outside:
        route = bed.run("h1", ["ip", "route", "get", address], timeout=10)
        assert route.returncode != 0, f"h1 has a route to the machine's {address}: {route.stdout}"
    assert not pings(bed, "h1", outside[0])
    # Nothing of the bed sits in the machine's namespace.
    links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    assert not [x for x in json.loads(links.stdout) if bed.tag in x["ifname"]]


def test_a_hosts_namespaces_are_its_own(bed: HostBed) -> None:
    name = f"vnic.x{uuid.uuid4().hex[:6]}"
    made = bed.run("h1", ["ip", "netns", "add", name])
    assert made.returncode == 0, made.stderr
    try:
        assert name in bed.inventory("h1").namespaces
        assert name not in bed.inventory("h2").namespaces
        assert name not in bed.run("h2", ["ip", "netns", "list"]).stdout
        assert name not in nsops.listing()  # the machine's own /run/netns
        # The same name is free on host 2: its own namespace, not host 1's.
        assert bed.run("h2", ["ip", "netns", "add", name]).returncode == 0
        assert bed.run("h2", ["ip", "netns", "del", name]).returncode == 0
        # A namespace outlives the process that made it, killed: the host keeps running.
        kept = f"{name}k"
        proc = bed.spawn("h1", ["sh", "-c", f"ip netns add {kept} && exec sleep 600"])
        assert until(lambda: kept in bed.inventory("h1").namespaces, 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert kept in bed.inventory("h1").namespaces
        assert bed.run("h1", ["ip", "netns", "del", kept]).returncode == 0
    finally:
        bed.run("h1", ["ip", "netns", "del", name])
    assert name not in bed.inventory("h1").namespaces


def launch_script(session: str) -> str:
    """The embedded CLI making a session and two VMs, ``a`` behind 5 ms of egress delay."""
    vnic = " ".join(VNIC)
    return (
        f"set -e; {vnic} session create {session} >/dev/null;"
        f" {vnic} vm launch {session} a --set egress.delay=5ms;"
        f" {vnic} vm launch {session} b"
    )


def min_rtt_ms(output: str) -> float:
    found = re.search(r"= ([\d.]+)/", output)
    assert found, output
    return float(found.group(1))


def test_same_session_and_vm_on_two_hosts(bed: HostBed) -> None:
    """Each host has its own database and agent state: the same session gets the same VMs,
    MACs and addresses on both, and each host's VM is its own: destroying it on one host
    leaves the other's, its delay engine included, running."""
    session = f"s{uuid.uuid4().hex[:6]}"
    env = {"VNIC_ENGINE": "delayd"}  # a process per VM of the data plane, found by tag
    launches = {
        h: bed.spawn(
            h,
            ["sh", "-c", launch_script(session)],
            env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in ("h1", "h2")
    }
    outputs = {}
    for h, proc in launches.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{h}: {err}"
        outputs[h] = out
    assert outputs["h1"] == outputs["h2"]  # same MACs and addresses
    b_address = re.search(rf"vm {session}/b: running, MAC \S+, ([\d.]+)", outputs["h1"])
    assert b_address
    # In a's network namespace (what `vnic vm exec` adds, a's own processes, a ping needs not).
    ping = ["ip", "netns", "exec", f"vnic.{session}.a", "ping", "-c", "3", "-i", "0.2"]
    ping.append(b_address.group(1))
    for h in ("h1", "h2"):
        inventory = bed.inventory(h)
        assert inventory.vms() == {(session, "a"), (session, "b")}
        assert inventory.sessions() == {session}
        tagged = {link.alias for link in inventory.namespaces[f"vnic.{session}"]}
        assert {f"vnic:{session}/a", f"vnic:{session}/b"} <= tagged
        done = bed.run(h, ping, env=env)
        assert done.returncode == 0, done.stderr
        assert min_rtt_ms(done.stdout) >= 5.0  # through this host's own engine

    engine = bed.hosts[1].runtime_dir / "delayd" / session / "a.pid"
    engine_pid = int(engine.read_text())
    gone = bed.run("h1", [*VNIC, "vm", "destroy", session, "a"], env=env)
    assert gone.returncode == 0, gone.stderr
    assert (session, "a") not in bed.inventory("h1").vms()
    assert bed.inventory("h2").vms() == {(session, "a"), (session, "b")}
    assert nsops.alive(engine_pid), "destroying h1's VM stopped h2's delay engine"
    done = bed.run("h2", ping, env=env)
    assert done.returncode == 0, done.stderr
    assert min_rtt_ms(done.stdout) >= 5.0
    # The rest goes with the bed, through vnic's own teardown on each host.


def test_partition_and_heal(bed: HostBed) -> None:
    h1, h2, h3 = bed.hosts
    assert pings(bed, "h1", h2.address4)
    bed.partition("h1", True)
    try:
        bed.partition("h1", True)  # again: still one table
        assert not pings(bed, "h1", h2.address4)
        assert not pings(bed, "h2", h1.address6)
        assert not pings(bed, "h1", bed.manager.address4)
        assert pings(bed, "h2", h3.address4)  # the others still reach each other
    finally:
        bed.partition("h1", False)
    assert pings(bed, "h1", h2.address4)
    assert pings(bed, "h2", h1.address6)
    bed.partition("h1", False)  # healing a healed host changes nothing
    tables = bed.run("h1", ["nft", "list", "tables"])
    assert bed.plan.nft_table not in tables.stdout


def run_pids(home: Path) -> list[int]:
    """The pids vnic recorded on a host: its VMs' inits and delay engines."""
    run = home / "run"
    files = [*run.glob("netns/*/*/init.pid"), *run.glob("delayd/*/*.pid")]
    return [int(f.read_text()) for f in files]


def state(pid: int) -> str:
    """The process's state letter (``S`` sleeping, ``T`` stopped...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]


def test_destroy_leaves_nothing(tmp_path: Path) -> None:
    bed = HostBed(uuid.uuid4().hex[:8], 2, root=tmp_path / "hosts").create()
    try:
        made = bed.run("h1", ["sh", "-c", launch_script("d")], env={"VNIC_ENGINE": "delayd"})
        assert made.returncode == 0, made.stderr
        vnic_pids = run_pids(bed.hosts[0].home)
        assert len(vnic_pids) == 3  # two VM inits, a's delay engine
        # Stand-ins for agents: one running, one paused, one in a namespace of its own.
        bed.spawn("h1", ["sleep", "600"])
        paused = bed.spawn("h2", ["sleep", "600"]).pid
        bed.pause(paused)
        assert until(lambda: state(paused) == "T", 10)
        bed.resume(paused)
        assert until(lambda: state(paused) == "S", 10)
        bed.pause(paused)  # destroy stops it paused
        assert bed.run("h2", ["ip", "netns", "add", "vnic.other"]).returncode == 0
        bed.spawn("h2", ["ip", "netns", "exec", "vnic.other", "sleep", "600"])
        started = bed.processes()
        assert len(started) == 3 + 3  # the holders of hm, h1, h2 and the three sleeps
    finally:
        bed.destroy()
    assert not [n for n in nsops.listing() if bed.tag in n]
    links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    assert not [
        x for x in json.loads(links.stdout) if bed.plan.owns_link(x["ifname"], x.get("ifalias"))
    ]
    assert [p for p in [*started, *vnic_pids] if nsops.alive(p)] == []
    assert bed.leftovers() == []
    bed.destroy()  # again: nothing to do, no error
    assert bed.leftovers() == []


def test_a_bed_a_killed_run_left_is_destroyed_by_its_tag(tmp_path: Path) -> None:
    """The run that made the bed is gone (its HostBed object with it); its hosts still run,
    with a VM. A new HostBed with the same tag and root enters each host through a
    process found in it and destroys everything."""
    root = tmp_path / "hosts"
    left = HostBed(uuid.uuid4().hex[:8], 1, root=root).create()
    vnic = " ".join(VNIC)
    made = left.run("h1", ["sh", "-c", f"{vnic} session create k && {vnic} vm launch k x"])
    assert made.returncode == 0, made.stderr
    holders = left.processes()
    vm_pids = run_pids(left.hosts[0].home)
    assert len(holders) == 2 and len(vm_pids) == 1
    with pytest.raises(DataplaneError, match="exist already"):
        HostBed(left.tag, 1, root=root).create()

    again = HostBed(left.tag, 1, root=root)
    again.destroy()
    assert again.leftovers() == []
    assert not [n for n in nsops.listing() if left.tag in n]
    assert [p for p in [*holders, *vm_pids] if nsops.alive(p)] == []
    for holder in (h.holder for h in left.every_host):
        assert holder is not None
        holder.wait(timeout=10)  # reaped: the killed run's object is this test's


def test_the_manager_host_reaches_the_throwaway_postgresql(bed: HostBed, pg_server: object) -> None:
    """The test run's PostgreSQL listens on a Unix socket only: a manager in the manager
    host (its own network namespace) reaches it through the file system it shares."""
    url = new_pg_url(pg_server)  # type: ignore[arg-type]
    done = bed.run("hm", [*VNIC, "db", "upgrade"], env={"VNIC_DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    sessions = bed.run("hm", [*VNIC, "session", "list", "--json"], env={"VNIC_DATABASE_URL": url})
    assert sessions.returncode == 0 and json.loads(sessions.stdout) == [], sessions.stderr


def test_a_failed_create_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bed = HostBed(uuid.uuid4().hex[:8], 3, root=tmp_path / "hosts")
    real = HostBed._start_holder

    def second_host_fails(self: HostBed, host: Host) -> subprocess.Popen[bytes]:
        if host.short == "h2":
            raise DataplaneError("injected: h2's holder")
        return real(self, host)

    monkeypatch.setattr(HostBed, "_start_holder", second_host_fails)
    with pytest.raises(DataplaneError, match="injected"):
        bed.create()
    assert not [n for n in nsops.listing() if bed.tag in n]
    assert bed.leftovers() == []
    assert bed.processes() == []


def test_hosts_script_up_then_down() -> None:
    """`scripts/hosts.sh` (python -m vnic.lab.hostbed_main): a bed that outlives `up`, and
    `down` that removes it, its directories too."""
    tag = uuid.uuid4().hex[:8]
    main = [sys.executable, "-m", "vnic.lab.hostbed_main"]
    made = subprocess.run([*main, "up", "2", tag], capture_output=True, text=True, timeout=60)
    try:
        assert made.returncode == 0, made.stderr
        assert "h2: 10.250.0.12 fd00:250::12" in made.stdout
        assert {f"vnic-h1-{tag}", f"vnic-h2-{tag}"} <= set(nsops.listing())
    finally:
        gone = subprocess.run([*main, "down", tag], capture_output=True, text=True, timeout=120)
    assert gone.returncode == 0, gone.stderr
    assert not [n for n in nsops.listing() if tag in n]
    assert not Path(f"/tmp/vnic-hosts-{tag}").exists()
    again = subprocess.run([*main, "down", tag], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "none on this machine" in again.stdout
