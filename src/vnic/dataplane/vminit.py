"""The init of a netns VM: its processes' own PID, mount and UTS namespaces (needs root).

A netns VM is a network namespace; on its own that would share the host's
process table, so a ``pkill`` in one VM would hit other VMs and the host. Each
VM therefore gets an init (:mod:`vnic.dataplane.vminit_main`): PID 1 of a new
PID namespace, inside the VM's network namespace, with a mount namespace of its
own (its /proc shows only the VM's processes, its /sys only its links, and
/etc/hosts, /etc/hostname and /etc/resolv.conf are the VM's) and a UTS
namespace whose host name is the VM's name. Every process run "in the VM"
(:func:`vnic.dataplane.namespaces.run` and ``popen`` on a VM namespace, and so
``vnic vm exec``, :mod:`vnic.dataplane.vmexec` and the measurements) enters all four
namespaces through :func:`entry`, without CAP_SYS_ADMIN (so it cannot uncover
the host's /proc). Killing the init makes the kernel kill every process in the
VM.

Each VM has a run directory ``/run/vnic/netns/<session>/<vm>/`` (under
``$VNIC_RUNTIME_DIR/netns``, or ``VNIC_NETNS_RUN_DIR`` if set) holding ``init.pid`` and the files bound over
/etc. The init carries the VM's owner tag in its command line after
:data:`MARK`; a pid from the pid file is only used (entered or signalled) after
its command line shows that tag.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vnic.dataplane import procs
from vnic.errors import DataplaneError
from vnic.plan import names
from vnic.settings import runtime_subdir

#: The word before the owner tag in an init's command line.
MARK = "vnic-vm-init"
#: The init's program (standard library only, see its docstring).
PROGRAM = Path(__file__).with_name("vminit_main.py")
#: Seconds an init may take to set up its namespaces (about 0.05 s on an idle host).
START_TIMEOUT = 10.0
#: Seconds to wait for a killed init (and so every process of the VM) to be gone.
STOP_TIMEOUT = 5.0
#: The capabilities a program run in the VM does not get (from its bounding and
#: inheritable sets, so no exec gets them back): without CAP_SYS_ADMIN it cannot unmount
#: the VM's /proc (which would show the host's, every process of the host and of other
#: VMs), mount another one, or enter other namespaces; without CAP_SYS_PTRACE it cannot
#: borrow the capabilities of the VM's init (PID 1, which it sees) by tracing it.
#: Network administration (ip, tc, nft, ethtool, net sysctls) needs CAP_NET_ADMIN, which
#: it keeps.
DROPPED_CAPABILITIES = ("sys_admin", "sys_ptrace")
#: Where network namespaces are mounted (as in :mod:`vnic.dataplane.namespaces`).
NETNS_DIR = "/run/netns"


def run_root() -> Path:
    return runtime_subdir("netns", "VNIC_NETNS_RUN_DIR")


def run_dir(session: str, vm: str) -> Path:
    return run_root() / session / vm


def owner_of_netns(name: str) -> tuple[str, str] | None:
    """``(session, vm)`` if ``name`` is a VM's network namespace (``vnic.<session>.<vm>``)."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == names.PREFIX and all(parts[1:]):
        return (parts[1], parts[2])
    return None


def session_dirs(root: Path) -> dict[str, set[str]]:
    """The ``root/<session>/<vm>/`` tree of run directories: each session's VM names
    (a session directory without VMs maps to an empty set)."""
    if not root.is_dir():
        return {}
    return {
        session_dir.name: {d.name for d in session_dir.iterdir() if d.is_dir()}
        for session_dir in root.iterdir()
        if session_dir.is_dir()
    }


def run_dirs() -> dict[str, set[str]]:
    """Every session with VM run directories here, and those VMs' names."""
    return {session: vms for session, vms in session_dirs(run_root()).items() if vms}


def _is_init(pid: int, session: str, vm: str) -> bool:
    """Whether ``pid`` is this VM's live init (a zombie has no command line)."""
    tag = names.owner_tag(session, vm).encode()
    return any(a == MARK.encode() and b == tag for a, b in itertools.pairwise(procs.cmdline(pid)))


def init_pid(session: str, vm: str) -> int | None:
    """The pid (host's view) of the VM's init, if its pid file names a live process carrying
    the VM's tag (a recycled pid is someone else's)."""
    try:
        pid = int((run_dir(session, vm) / "init.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_init(pid, session, vm) else None


def running(session: str, vm: str) -> bool:
    return init_pid(session, vm) is not None


def _etc_files(
    session: str, vm: str, addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
) -> dict[str, str]:
    """The VM's own hosts, hostname and resolv.conf."""
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts += [f"{a.ip}\t{vm}" for a in addresses]
    return {
        "hosts": f"# vnic VM {session}/{vm}\n" + "\n".join(hosts) + "\n",
        "hostname": f"{vm}\n",
        # No name server: a VM reaches its session's networks only (the resolver
        # then fails at once instead of waiting on a server it cannot reach).
        "resolv.conf": f"# vnic VM {session}/{vm}: no name server\n",
    }


@dataclass
class Starting:
    """An init being started: the launcher process to collect with :func:`finish`."""

    session: str
    vm: str
    launcher: subprocess.Popen[str]


def start(
    session: str,
    vm: str,
    netns: str,
    addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> Starting:
    """Start the VM's init in network namespace ``netns`` (a name under /run/netns) without
    waiting for it; :func:`finish` waits. The run directory is made here (its VM must have
    none: :class:`DataplaneError` otherwise, and nothing changed)."""
    directory = run_dir(session, vm)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir()
    except FileExistsError:
        raise DataplaneError(
            f"run directory {directory} of VM {session}/{vm} already exists"
        ) from None
    try:
        for name, text in _etc_files(session, vm, addresses).items():
            (directory / name).write_text(text)
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                str(PROGRAM),
                MARK,
                names.owner_tag(session, vm),
                os.path.join(NETNS_DIR, netns),
                str(directory),
                vm,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Its own session: the init must outlive the command that launched the VM.
            start_new_session=True,
        )
    except BaseException:
        remove_run_dir(session, vm)
        raise
    return Starting(session, vm, launcher)


def finish(starting: Starting, timeout: float | None = None) -> int:
    """Wait until the init has set up its namespaces; its pid. On failure (it exits, or
    ``timeout`` s pass, default :data:`START_TIMEOUT`) :class:`DataplaneError` says why, and
    the init is stopped (the run directory stays for :func:`remove_run_dir`)."""
    session, vm = starting.session, starting.vm
    timeout = START_TIMEOUT if timeout is None else timeout
    try:
        out, err = starting.launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abandon(starting)
        raise DataplaneError(
            f"the init of VM {session}/{vm} did not start within {timeout:g} s"
        ) from None
    pid = init_pid(session, vm)
    if starting.launcher.returncode != 0 or pid is None or out.strip() != str(pid):
        stop(session, vm)
        reason = err.strip() or out.strip() or f"exit status {starting.launcher.returncode}"
        raise DataplaneError(f"the init of VM {session}/{vm} did not start: {reason}")
    return pid


def abandon(starting: Starting) -> None:
    """Stop an init being started (a failed launch): the launcher, then the init."""
    with contextlib.suppress(ProcessLookupError):
        starting.launcher.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        starting.launcher.communicate(timeout=STOP_TIMEOUT)
    stop(starting.session, starting.vm)


def stop(session: str, vm: str, timeout: float = STOP_TIMEOUT) -> None:
    """Kill the VM's init, and so every process of the VM; wait until it is gone.

    SIGKILL at once: the kernel sends every other process of the PID namespace
    SIGKILL when its init ends anyway. Idempotent; only a process carrying the
    VM's tag is signalled. An init whose pid was never recorded (its launcher
    killed in between) is in the VM's network namespace, and goes with it (see
    :func:`vnic.dataplane.namespaces.remove`).
    """
    pid = init_pid(session, vm)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _is_init(pid, session, vm):
        if time.monotonic() > deadline:
            raise DataplaneError(f"the init of VM {session}/{vm} (pid {pid}) did not stop")
        time.sleep(0.005)


def remove_run_dir(session: str, vm: str) -> None:
    """Remove the VM's run directory (its init stopped), and the session's if empty."""
    directory = run_dir(session, vm)
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # only when empty: other VMs' directories stay


@contextlib.contextmanager
def entry(session: str, vm: str) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """The command prefix that runs a program in the VM, and the file descriptors it needs
    passed (``pass_fds``); both valid for the block.

    The init's four namespace files are opened first and its tag checked after,
    so the namespaces entered are those of the VM's init even if its pid were
    recycled in between. ``nsenter`` forks into the PID namespace and waits;
    ``setpriv --pdeathsig KILL`` makes the program die with that ``nsenter``, so
    killing what the caller started (a timeout, :meth:`subprocess.Popen.kill`)
    kills the program, and takes :data:`DROPPED_CAPABILITIES` from it. The working
    directory is the caller's.
    :class:`DataplaneError` if the VM has no running init.
    """
    pid = init_pid(session, vm)
    fds: list[int] = []
    try:
        if pid is not None:
            try:
                for kind in ("net", "uts", "pid", "mnt"):
                    fds.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY))
            except OSError:
                pid = None
        if pid is None or not _is_init(pid, session, vm):
            raise DataplaneError(
                f"VM {session}/{vm} has no running init (its processes' namespaces): "
                "it is not running, or its init was killed (drift, repaired by relaunching it)"
            )
        net, uts, pidns, mnt = (f"/proc/self/fd/{fd}" for fd in fds)
        yield (
            [
                "nsenter",
                f"--net={net}",
                f"--uts={uts}",
                f"--pid={pidns}",
                f"--mount={mnt}",
                "--wd=.",
                "--",
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--bounding-set",
                ",".join(f"-{cap}" for cap in DROPPED_CAPABILITIES),
                "--inh-caps",
                ",".join(f"-{cap}" for cap in DROPPED_CAPABILITIES),
                "--",
            ],
            tuple(fds),
        )
    finally:
        for fd in fds:
            os.close(fd)
