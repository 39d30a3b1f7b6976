"""A netns VM's processes live in the VM's own PID, mount and UTS namespaces (issue #15,
finding 14): from inside a VM nothing of the host or of other VMs is visible or can be
signalled, each VM has its own /proc and /etc/hosts, killing its init kills everything in
it (drift, which reconcile repairs), and destroy or a failed launch leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import Lab, leftovers
from vnic.agent.core import Agent, local_agent
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import vminit
from vnic.errors import Conflict, DataplaneError, VnicError
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.profile import parse_profile_document
from vnic.plan import names
from vnic.store.db import Database

#: Lists every process a VM sees: "PID ARGV..." per line, from the VM's /proc.
PROC_TABLE = (
    'for p in /proc/[0-9]*; do printf "%s " "${p#/proc/}"; '
    'tr "\\0" " " < "$p/cmdline" 2>/dev/null; echo; done'
)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.01)


def proc_table(lab: Lab, session: str, vm: str) -> dict[int, str]:
    out = lab.exec(session, vm, "sh", "-c", PROC_TABLE)
    table = {}
    for line in out.splitlines():
        pid, _, argv = line.partition(" ")
        table[int(pid)] = argv.strip()
    return table


def sees(lab: Lab, session: str, vm: str, needle: str) -> bool:
    return any(needle in argv for argv in proc_table(lab, session, vm).values())


class Started:
    """Processes the test starts (on the host or in VMs), killed at the end by their handle."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def host(self, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(argv), text=True, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def vm(self, session: str, vm: str, *argv: str) -> subprocess.Popen[str]:
        proc = nsops.popen(names.vm_netns(session, vm), list(argv), stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    try:
        yield s
    finally:
        s.stop()


def host_pids_of_vm(session: str, vm: str) -> list[int]:
    """The host's pids of every process in the VM (they are all in its network namespace)."""
    return nsops.pids(names.vm_netns(session, vm))


def tagged_inits(session: str, vm: str) -> list[int]:
    """Live processes on the host whose command line carries the VM's init tag."""
    tag = names.owner_tag(session, vm).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if vminit.MARK.encode() in argv and tag in argv and nsops.alive(int(entry)):
                found.append(int(entry))
    return found


def host_mounts_naming(*needles: str) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if any(n in line for n in needles)]


# ----------------------------------------------------------------------------- isolation


@pytest.mark.timeout(90)
def test_a_vm_sees_and_signals_only_its_own_processes(lab: Lab, started: Started) -> None:
    s, t = lab.session(), lab.session()
    lab.launch(s, "web")
    lab.launch(s, "db")
    lab.launch(t, "web")
    port = 20000 + os.getpid() % 20000
    host_sleep = started.host("sleep", "3601")
    host_iperf = started.host("iperf3", "-s", "-B", "127.0.0.1", "-p", str(port))
    db_sleep = started.vm(s, "db", "sleep", "3602")
    db_iperf = started.vm(s, "db", "iperf3", "-s")
    other_sleep = started.vm(t, "web", "sleep", "3604")
    other_iperf = started.vm(t, "web", "iperf3", "-s")
    web_sleep = started.vm(s, "web", "sleep", "3603")
    web_iperf = started.vm(s, "web", "iperf3", "-s")
    wait_until(lambda: sees(lab, s, "web", "iperf3 -s") and sees(lab, s, "web", "sleep 3603"))
    wait_until(lambda: sees(lab, s, "db", "iperf3 -s") and sees(lab, t, "web", "iperf3 -s"))
    wait_until(lambda: nsops.alive(host_iperf.pid) and nsops.alive(host_sleep.pid))

    # What web sees: its init as PID 1, its own processes, nothing else.
    table = proc_table(lab, s, "web")
    assert vminit.MARK in table[1] and names.owner_tag(s, "web") in table[1], table
    listed = "\n".join(table.values())
    assert "sleep 3603" in listed and "iperf3 -s" in listed
    for foreign in ("3601", "3602", "3604", str(port), "pytest"):
        assert foreign not in listed, (foreign, table)
    pgrep = lab.exec(s, "web", "pgrep", "-a", "sleep|iperf3")
    assert sorted(line.split(" ", 1)[1] for line in pgrep.splitlines()) == [
        "iperf3 -s",
        "sleep 3603",
    ], pgrep
    ps = lab.exec(s, "web", "ps", "-e", "-o", "args=")
    assert "3601" not in ps and "3602" not in ps and "3604" not in ps, ps
    # The VM's pids count from 1: far below the host's pids of the test's processes.
    assert str(host_sleep.pid) not in lab.exec(s, "web", "ls", "/proc").split()

    # pkill and kill -9 -1 inside web reach web's processes only.
    lab.exec(s, "web", "pkill", "iperf3")
    assert web_iperf.wait(timeout=10) != 0
    lab.exec(s, "web", "sh", "-c", "kill -9 -1; true")
    assert web_sleep.wait(timeout=10) == -signal.SIGKILL
    for proc in (host_sleep, host_iperf, db_sleep, db_iperf, other_sleep, other_iperf):
        assert proc.poll() is None, proc.args
    assert nsops.alive(host_sleep.pid) and nsops.alive(host_iperf.pid)
    assert sees(lab, s, "db", "iperf3 -s") and sees(lab, t, "web", "iperf3 -s")
    # web's init survives both (it is PID 1: the kernel drops SIGKILL sent to it from inside).
    assert vminit.running(s, "web")
    lab.exec(s, "web", "sh", "-c", "kill -TERM 1; kill -HUP 1; kill -INT 1; true")
    assert vminit.running(s, "web")
    assert sorted(proc_table(lab, s, "web"))[0] == 1
    # Nor can it uncover the host's /proc under the VM's, or enter the host's namespaces.
    for escape in ("umount /proc", "umount -l /proc", "mount -t proc proc /mnt", "nsenter -a -t 1"):
        proc = lab.driver.exec(s, "web", ["sh", "-c", escape], capture_output=True, timeout=10)
        assert proc.returncode != 0, (escape, proc.stdout)
    assert max(proc_table(lab, s, "web")) < 1000  # still the VM's own table
    assert lab.exec(s, "web", "echo", "still here").strip() == "still here"
    # Nor trace its init to borrow the init's capabilities: neither capability is in any
    # set of a VM's program, so no exec inside gets them back.
    status = lab.exec(s, "web", "cat", "/proc/self/status")
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    for cap_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        for bit in (19, 21):  # CAP_SYS_PTRACE, CAP_SYS_ADMIN
            assert not int(caps[cap_set], 16) >> bit & 1, (cap_set, bit, caps)
    assert int(caps["CapEff"], 16) >> 12 & 1  # CAP_NET_ADMIN stays


@pytest.mark.timeout(60)
def test_each_vm_has_its_own_hosts_hostname_sys_and_proc(lab: Lab) -> None:
    host_hosts = Path("/etc/hosts").read_bytes()
    host_name = os.uname().nodename
    s = lab.session()
    web = lab.launch(s, "web").vm
    db = lab.launch(s, "db").vm
    for name, info, other in (("web", web, "db"), ("db", db, "web")):
        hosts = lab.exec(s, name, "cat", "/etc/hosts")
        assert f"{info.ipv4}\t{name}" in hosts and f"{info.ipv6}\t{name}" in hosts, hosts
        assert "localhost" in hosts and other not in hosts.split(), hosts
        assert lab.exec(s, name, "cat", "/etc/hostname").strip() == name
        assert lab.exec(s, name, "hostname").strip() == name
        assert "nameserver" not in lab.exec(s, name, "cat", "/etc/resolv.conf")
        assert sorted(lab.exec(s, name, "ls", "/sys/class/net").split()) == ["eth0", "lo"]
        assert lab.exec(s, name, "sh", "-c", "echo $$").strip() != ""
        assert lab.exec(s, name, "cat", "/proc/1/comm").strip() == "vnic-vm-init"
        # No namespace file of the host's /run/netns is mounted in the VM (it would hold
        # other VMs' namespaces and take every namespace change the host makes).
        assert " nsfs " not in lab.exec(s, name, "cat", "/proc/self/mountinfo")
    # Nothing of it reached the host.
    assert Path("/etc/hosts").read_bytes() == host_hosts
    assert os.uname().nodename == host_name
    assert host_mounts_naming(str(vminit.run_root())) == []
    # The caller's working directory is kept, as it was with ip netns exec.
    here = Path.cwd()
    proc = nsops.run(names.vm_netns(s, "web"), ["pwd"], capture_output=True, timeout=10, cwd="/tmp")
    assert proc.stdout.strip() == "/tmp" and Path.cwd() == here


# ----------------------------------------------------------------------------- the init's life


class AgentLab:
    """A database and a local agent (the driver set a host runs), and the sessions made."""

    def __init__(self, tmp: Path) -> None:
        self.db = Database(f"sqlite:///{tmp / 'vnic.db'}")
        self.service = Service(self.db)
        self.agent: Agent = local_agent("netns", state_dir=tmp / "agent")
        spec = parse_profile_document({"name": "plain"})
        self.service.apply_profiles([spec])
        self.session = f"p{uuid.uuid4().hex[:8]}"
        self.service.create_session(self.session, default_profile="plain")

    def launch(self, vm: str) -> None:
        self.service.add_vm(VmRequest(self.session, vm))
        self.service.launch_vm(self.session, vm, self.agent, "netns")

    def exec(self, vm: str, *argv: str) -> subprocess.CompletedProcess[str]:
        driver = self.agent.driver("netns")
        return driver.exec(self.session, vm, list(argv), capture_output=True, timeout=30)  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def alab(tmp_path: Path) -> Iterator[AgentLab]:
    lab = AgentLab(tmp_path)
    try:
        yield lab
    finally:
        lab.service.session_down(lab.session, lab.agent)
        lab.db.dispose()
        assert leftovers(lab.session) == []
        assert not (vminit.run_root() / lab.session).exists()


@pytest.mark.timeout(90)
def test_killing_the_init_kills_the_vm_is_drift_and_reconcile_relaunches_it(
    alab: AgentLab, started: Started
) -> None:
    s = alab.session
    alab.launch("web")
    alab.launch("db")
    host_sleep = started.host("sleep", "3611")
    db_sleep = started.vm(s, "db", "sleep", "3612")
    web_sleep = started.vm(s, "web", "sleep", "3613")
    # A daemon: its shell exits at once, so it is the init's child from then on.
    alab.exec("web", "sh", "-c", "sleep 3614 </dev/null >/dev/null 2>&1 &")
    init = vminit.init_pid(s, "web")
    assert init is not None
    wait_until(lambda: len(host_pids_of_vm(s, "web")) >= 3, what="web's processes")
    inside = [p for p in host_pids_of_vm(s, "web") if p != init]
    assert alab.agent.drift() == {}

    os.kill(init, signal.SIGKILL)
    wait_until(lambda: not any(nsops.alive(p) for p in [init, *inside]), what="web emptied")
    assert web_sleep.wait(timeout=10) == -signal.SIGKILL
    assert host_pids_of_vm(s, "web") == []
    assert host_sleep.poll() is None and db_sleep.poll() is None  # only web's went
    drift = alab.agent.drift()
    assert list(drift) == [f"{s}/web"], drift
    assert drift[f"{s}/web"] == [f"init of VM {s}/web: expected running, found not running"]
    with pytest.raises(Conflict, match="no running init"):  # nothing to enter now
        alab.exec("web", "true")

    report = alab.agent.reconcile()
    assert f"{s}/web" in report.reapplied and report.failed == {}, report
    assert alab.agent.drift() == {}
    relaunched = vminit.init_pid(s, "web")
    assert relaunched is not None and relaunched != init
    assert alab.exec("web", "hostname").stdout.strip() == "web"
    # Database, the agent's desired state and the kernel agree: web runs, db was left alone.
    assert sorted(vm for _, r in alab.service.desired() for vm in [r.vm]) == ["db", "web"]
    assert alab.agent.state.get((s, "web")) is not None
    assert alab.agent.driver("netns").running(s) == ["db", "web"]  # type: ignore[attr-defined]
    assert db_sleep.poll() is None


@pytest.mark.timeout(60)
def test_destroy_leaves_no_process_mount_or_run_dir(lab: Lab, started: Started) -> None:
    s = lab.session()
    lab.launch(s, "web")
    lab.launch(s, "db")
    web_sleep = started.vm(s, "web", "sleep", "3621")
    lab.exec(s, "web", "sh", "-c", "sleep 3622 </dev/null >/dev/null 2>&1 &")
    wait_until(lambda: sees(lab, s, "web", "sleep 3621") and sees(lab, s, "web", "sleep 3622"))
    victims = host_pids_of_vm(s, "web")
    init = vminit.init_pid(s, "web")
    assert init in victims and len(victims) >= 3
    run = vminit.run_dir(s, "web")
    assert run.is_dir()

    lab.driver.destroy(s, "web")
    assert not any(nsops.alive(p) for p in victims)
    # Killed with the VM (its nsenter, in the VM's network namespace, may get the TERM
    # that namespace's removal sends before it passes on its child's SIGKILL).
    assert web_sleep.wait(timeout=10) in (-signal.SIGKILL, -signal.SIGTERM)
    assert tagged_inits(s, "web") == []
    assert not run.exists()
    assert host_mounts_naming(str(run), names.vm_netns(s, "web") + " ") == []
    assert names.vm_netns(s, "web") not in nsops.listing()
    assert lab.driver.inventory()[s] == {"db"}
    # The other VM of the session is untouched.
    assert vminit.running(s, "db") and lab.exec(s, "db", "hostname").strip() == "db"
    lab.driver.destroy(s, "web")  # idempotent
    lab.driver.destroy(s, "db")
    assert not (vminit.run_root() / s).exists()


FAILING_INIT = "import sys\nprint('init set-up refused', file=sys.stderr)\nsys.exit(1)\n"
HANGING_INIT = "import time\ntime.sleep(30)\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("program", "message"),
    [(FAILING_INIT, "init set-up refused"), (HANGING_INIT, "did not start within")],
    ids=["fails", "hangs"],
)
def test_an_init_that_does_not_start_fails_the_launch_and_leaves_nothing(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, message: str
) -> None:
    script = tmp_path / "init.py"
    script.write_text(program)
    monkeypatch.setattr(vminit, "PROGRAM", script)
    monkeypatch.setattr(vminit, "START_TIMEOUT", 1.0)
    s = lab.session()
    with pytest.raises(VnicError, match=message):
        lab.launch(s, "web")
    assert names.vm_netns(s, "web") not in nsops.listing()
    assert not vminit.run_dir(s, "web").exists()
    assert tagged_inits(s, "web") == []
    assert lab.driver.inventory().get(s, set()) == set()
    assert [vm for _, r in lab.service.desired() for vm in [r.vm] if r.session == s] == []

    monkeypatch.undo()  # the real init: the same VM (still defined) launches now
    lab.service.launch_vm(s, "web", lab.agent)
    assert lab.exec(s, "web", "hostname").strip() == "web"


@pytest.mark.timeout(120)
def test_vnic_vm_exec_runs_inside_the_vm(tmp_path: Path, started: Started) -> None:
    env = {**os.environ, "VNIC_HOME": str(tmp_path / "home")}
    env.pop("VNIC_DATABASE_URL", None)
    env.pop("VNIC_SERVER", None)

    def vnic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vnic.cli.app", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    s = f"c{uuid.uuid4().hex[:8]}"
    assert vnic("session", "create", s).returncode == 0
    try:
        assert vnic("vm", "launch", s, "web").returncode == 0
        host_sleep = started.host("sleep", "3631")
        proc = vnic("vm", "exec", s, "web", "--", "sh", "-c", "hostname; pgrep -a sleep; exit 3")
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.splitlines() == ["web"], proc.stdout  # the host's sleep is not seen
        proc = vnic("vm", "exec", s, "web", "--", "pkill", "-f", "sleep 3631")
        assert proc.returncode == 1  # pkill: no process matched
        assert host_sleep.poll() is None
    finally:
        vnic("session", "down", s)
    assert leftovers(s) == [] and not (vminit.run_root() / s).exists()


@pytest.mark.timeout(60)
def test_a_launch_failing_after_its_init_started_leaves_nothing(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = lab.session()
    lab.launch(s, "db")
    seen: list[int | None] = []

    def broken_plug(*args: object, **kwargs: object) -> None:
        # The init was started just before: wait for its pid, then fail the launch.
        wait_until(lambda: vminit.init_pid(s, "web") is not None, what="web's init")
        seen.append(vminit.init_pid(s, "web"))
        raise DataplaneError("veth refused (injected)")

    monkeypatch.setattr(nsops, "plug_vm", broken_plug)
    with pytest.raises(VnicError, match="injected"):
        lab.launch(s, "web")
    (init,) = seen
    assert init is not None and not nsops.alive(init)
    assert tagged_inits(s, "web") == []
    assert not vminit.run_dir(s, "web").exists()
    assert names.vm_netns(s, "web") not in nsops.listing()
    assert lab.driver.inventory()[s] == {"db"}
    assert lab.exec(s, "db", "hostname").strip() == "db"  # the session's other VM is intact


def test_a_visitor_of_the_vm_namespace_is_not_stopped_with_the_vm(lab: Lab) -> None:
    """A process that only entered the VM's network namespace (``setns``, keeping the host's
    mount namespace: a single-threaded reader such as the embedded CLI or a test looking
    in while an agent destroys the VM) is not the VM's, and survives its destroy; the
    VM's own processes do not."""
    s = lab.session()
    lab.launch(s, "web")
    path = f"{nsops.RUN_DIR}/{names.vm_netns(s, 'web')}"
    visitor = subprocess.Popen(["nsenter", f"--net={path}", "sleep", "3624"])
    try:
        wait_until(lambda: os.stat(f"/proc/{visitor.pid}/ns/net").st_ino == os.stat(path).st_ino)
        init = vminit.init_pid(s, "web")
        assert init in host_pids_of_vm(s, "web")
        assert visitor.pid not in host_pids_of_vm(s, "web")
        lab.driver.destroy(s, "web")
        assert visitor.poll() is None, "the visitor was stopped with the VM"
        assert init is not None and not nsops.alive(init)
        assert names.vm_netns(s, "web") not in nsops.listing()
    finally:
        visitor.kill()
        visitor.wait(timeout=10)
