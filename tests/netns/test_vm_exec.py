"""A command run in a netns VM through the agent port (:meth:`Agent.exec`, what ``vnic vm
exec --server`` reaches): it runs inside the VM, its output and status come back, each
stream is cut at ``max_output``, and at its timeout it is killed with what it started."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.netns.conftest import Lab
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import procs
from vnic.errors import Conflict, InvalidInput
from vnic.plan import names


def vm_processes(session: str, vm: str, word: bytes) -> list[int]:
    """Live processes in the VM whose command line has ``word``."""
    return [
        pid
        for pid in nsops.pids(names.vm_netns(session, vm))
        if word in procs.cmdline(pid) and nsops.alive(pid)
    ]


def gone(session: str, vm: str, word: bytes, seconds: float = 10.0) -> bool:
    """Whether the VM's processes with ``word`` are gone (a killed process waits a moment
    for its reaper, the VM's init)."""
    deadline = time.monotonic() + seconds
    while vm_processes(session, vm, word):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.timeout(120)
def test_a_command_runs_inside_the_vm_and_its_output_comes_back(lab: Lab) -> None:
    s = lab.session()
    lab.launch(s, "web")
    r = lab.agent.exec(s, "web", ["ip", "-o", "link", "show"])
    assert r.returncode == 0 and not r.timed_out and not r.truncated, r
    links = {line.split(": ")[1].split("@")[0] for line in r.stdout.splitlines()}
    assert links == {"lo", "eth0"}, r.stdout  # the VM's interfaces, not the host's
    r = lab.agent.exec(s, "web", ["sh", "-c", "hostname; echo oops >&2; exit 3"])
    assert (r.returncode, r.stdout, r.stderr, r.status) == (3, "web\n", "oops\n", 3)
    r = lab.agent.exec(s, "web", ["cat"])  # stdin is empty: cat ends at once
    assert (r.returncode, r.stdout) == (0, "")
    r = lab.agent.exec(s, "web", ["no-such-program-here"])
    assert r.returncode not in (0, None) and r.stderr


@pytest.mark.timeout(120)
def test_output_is_cut_at_max_output_and_the_rest_is_drained(lab: Lab) -> None:
    s = lab.session()
    lab.launch(s, "web")
    # 4 MiB on stdout (more than a pipe holds), a line on stderr after it.
    script = "head -c 4194304 /dev/zero | tr '\\0' x; echo end >&2"
    r = lab.agent.exec(s, "web", ["sh", "-c", script], max_output=1000)
    assert r.returncode == 0 and not r.timed_out
    assert r.stdout == "x" * 1000 and r.stdout_truncated
    assert r.stderr == "end\n" and not r.stderr_truncated
    r = lab.agent.exec(s, "web", ["echo", "exactly"], max_output=8)
    assert r.stdout == "exactly\n" and not r.truncated


@pytest.mark.timeout(120)
def test_a_command_past_its_timeout_is_killed_with_its_children(lab: Lab) -> None:
    s = lab.session()
    lab.launch(s, "web")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lab.agent.exec, s, "web", ["sleep", "3617"], timeout=3)
        seen = False
        while not running.done() and not seen:
            seen = bool(vm_processes(s, "web", b"3617"))  # it runs in the VM (this finds it)
            time.sleep(0.02)
        r = running.result()
    assert seen
    assert r.timed_out and r.returncode is None and r.status == 124, r
    assert gone(s, "web", b"3617"), vm_processes(s, "web", b"3617")
    # A shell's child goes with the shell (its process group is killed).
    r = lab.agent.exec(s, "web", ["sh", "-c", "echo begun; sleep 3618; echo never"], timeout=1)
    assert r.timed_out and r.stdout == "begun\n", r
    assert gone(s, "web", b"3618"), vm_processes(s, "web", b"3618")
    # The VM is as it was: the next command runs.
    assert lab.agent.exec(s, "web", ["true"]).returncode == 0


@pytest.mark.timeout(120)
def test_bad_arguments_and_a_vm_that_does_not_run_are_refused(lab: Lab) -> None:
    s = lab.session()
    with pytest.raises(Conflict, match="not running"):
        lab.agent.exec(s, "ghost", ["true"])
    lab.launch(s, "web")
    with pytest.raises(InvalidInput) as exc:
        lab.agent.exec(s, "web", ["touch", "/tmp/x\0y"], timeout=301)
    assert [e.path for e in exc.value.errors] == ["argv[1]", "timeout"]
