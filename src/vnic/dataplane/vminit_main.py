"""The init of a netns VM: PID 1 of the VM's own PID, mount and UTS namespaces.

Started by :func:`vnic.dataplane.vminit.start` as::

    python -I -S vminit_main.py vnic-vm-init TAG NETNS RUN_DIR HOSTNAME

Standard library only, and run without ``site`` (and without modules it does not
need) so it starts in tens of milliseconds and holds about 4 MB of its own. The launcher (this program as first started) enters the
VM's network namespace ``NETNS`` (a /run/netns file), unshares PID, mount and
UTS namespaces and forks; the child is PID 1 of the new PID namespace. The
launcher writes the child's pid (as the host sees it) to ``RUN_DIR/init.pid``
at once, waits until the child has set up its namespaces, prints that pid and
exits 0, or prints why not to stderr and exits 1 with the child gone.

The child's mount namespace is a slave of the host's (mounts and unmounts on
the host reach it; its own never reach the host), without the host's
/run/netns, with /proc of its PID namespace, /sys of its network namespace,
and ``RUN_DIR``'s ``hosts``, ``hostname`` and ``resolv.conf`` bound over
/etc's. Its host name is ``HOSTNAME``.

PID 1 then only reaps the processes that end up its children (orphans in the
VM) and waits for a signal: TERM, INT or HUP sent from outside the VM ends it,
and with it (the kernel's doing) every process in the VM. Signals from inside
the VM do not: its processes cannot kill their init (``kill -9 -1`` spares it,
and the kernel drops SIGKILL sent to PID 1 from its own namespace).
"""

from __future__ import annotations

# The C module under ``signal``: the same functions, without the import of enum that
# ``signal`` costs (a third of this program's start-up).
import _signal as signal  # type: ignore[import-not-found]
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2
PR_SET_NAME = 15
NETNS_DIR = "/run/netns"
#: Files of the run dir bound over /etc's (when /etc has one to cover).
ETC_FILES = ("hosts", "hostname", "resolv.conf")
#: Signals that end the init when sent from outside the VM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    src = source.encode() if source is not None else None
    kind = fstype.encode() if fstype is not None else None
    _check(_libc.mount(src, target.encode(), kind, flags, None), what)


def _set_up(run_dir: str, hostname: str) -> None:
    """The child's namespaces, as the module says; raises OSError naming the failed step."""
    # First: without it, the mounts below would propagate to the host's tree.
    _mount(None, "/", None, MS_REC | MS_SLAVE, "making / a slave mount")
    # The host's /run/netns goes from this tree: its namespace files would keep other
    # VMs' namespaces referenced here, and every namespace made or removed on the host
    # would have to be propagated to every VM. (A bind of the directory on itself, as
    # ip netns makes it, may be stacked: detach until nothing is mounted there.)
    while _libc.umount2(NETNS_DIR.encode(), MNT_DETACH) == 0:
        pass
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mounting /proc")
    _libc.umount2(b"/sys", MNT_DETACH)  # none there is fine, as for ip netns exec
    _mount("sysfs", "/sys", "sysfs", 0, "mounting /sys")
    for name in ETC_FILES:
        target = f"/etc/{name}"
        if os.path.exists(target):
            _mount(os.path.join(run_dir, name), target, None, MS_BIND, f"binding {target}")
    host = hostname.encode()
    _check(_libc.sethostname(host, len(host)), "setting the host name")
    _libc.prctl(PR_SET_NAME, b"vnic-vm-init", 0, 0, 0)
    os.chdir("/")  # hold no directory of the caller's
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _serve() -> None:
    """Reap children and wait for a stop signal from outside the VM; never returns."""
    waited = {signal.SIGCHLD, *STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        info = signal.sigwaitinfo(waited)
        # The kernel gives the sender's pid as seen in the VM: 0 when it is outside.
        if info.si_signo != signal.SIGCHLD and info.si_pid == 0:
            os._exit(0)


def main(argv: list[str]) -> int:
    _, tag, netns, run_dir, hostname = argv
    fd = os.open(netns, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"entering {netns}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            _set_up(run_dir, hostname)
        except OSError as exc:
            os.write(write_end, f"init of {tag}: {exc.strerror}".encode())
            os._exit(1)
        os.write(write_end, b"ok")
        os.close(write_end)
        _serve()
    os.close(write_end)
    pid_file = os.path.join(run_dir, "init.pid")
    try:
        with open(pid_file + ".new", "w") as f:
            f.write(f"{child}\n")
        os.rename(pid_file + ".new", pid_file)
        answer = os.read(read_end, 4096)
    except BaseException:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    if answer == b"ok":
        print(child, flush=True)
        return 0
    os.waitpid(child, 0)
    os.unlink(pid_file)
    print(answer.decode(errors="replace") or f"init of {tag} exited", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as exc:
        print(f"init: {exc}", file=sys.stderr)
        sys.exit(1)
