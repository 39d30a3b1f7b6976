"""Run the vnic delay engine (``vnic-delayd``, C) for one vNIC, and read its counters.

The engine is built from ``vnic/engine/delayd.c`` on first use (see
:mod:`vnic.engine`). It runs in the
session namespace, one process per vNIC (a thread per direction), detached
from whoever launched the VM: the VM outlives ``vnic vm launch``. It stops
when the VM is destroyed (by its pid file, after checking the process is
ours), when its session namespace is removed (every process in it is
stopped), or by itself when one of its interfaces disappears.

Pid, counters, log, arguments and control file live in
``<run dir>/<session>/<vm>.{pid,stats,log,argv,ctl}`` (run dir
``$VNIC_RUNTIME_DIR/delayd``, ``/run/vnic/delayd`` by default, or ``VNIC_RUN_DIR``).

An engine is found by its owner tag only among the processes of this host
(:func:`vnic.dataplane.procs.on_this_host`): hosts emulated on one machine
share its process table, and the same session and VM may run on two of them.

:func:`update` changes a running engine's parameters in place: it writes the
control file, sends SIGHUP, and waits until the engine acknowledges the new
generation in its stats file; held packets, counters and random state stay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import procs
from vnic.engine import build
from vnic.errors import DataplaneError
from vnic.plan import names
from vnic.plan.model import DelayEngine, Impairment
from vnic.settings import runtime_subdir

#: Counter names, in the order of ``enum counter`` in delayd.c.
COUNTERS = (
    "rx_frames",
    "rx_bytes",
    "tx_frames",
    "tx_bytes",
    "held_frames",
    "held_bytes",
    "dropped_loss",
    "dropped_overflow",
    "dropped_send",
    "duplicated",
    "corrupted",
    "reordered",
    "late",
    "max_late_ns",
    "socket_drops",
)
_MAGIC = 0x766E696364656C31
_HEADER = struct.Struct("=4Q")
_COUNTERS = struct.Struct(f"={len(COUNTERS)}Q")
#: Where the control generations (applied, rejected) sit in the stats file: after
#: the counters of both directions (engine version 2 and later).
_GENERATIONS = struct.Struct("=2Q")
_GENERATIONS_AT = _HEADER.size + 2 * _COUNTERS.size
_READY_TIMEOUT = 10.0
_UPDATE_TIMEOUT = 2.0


def binary() -> Path:
    """The engine executable (built on first use)."""
    return build("delayd")


def run_dir(session: str) -> Path:
    return runtime_subdir("delayd", "VNIC_RUN_DIR") / session


#: The files an engine has in its session's run dir, ``<vm>.<kind>``.
RUN_FILE_KINDS = ("pid", "stats", "log", "argv", "ctl")
#: What the engine's executable is called (``vnic-delayd-<build hash>``, see :mod:`vnic.engine`).
ENGINE_NAME = "vnic-delayd"


def _paths(session: str, vm: str) -> tuple[Path, Path, Path, Path, Path]:
    """The VM's pid, stats, log, argv and control files."""
    base = run_dir(session)
    return tuple(base / f"{vm}.{kind}" for kind in RUN_FILE_KINDS)  # type: ignore[return-value]


def direction_spec(imp: Impairment, source_dev: str, target_dev: str) -> str:
    """One direction's argument for the engine (times ns, probabilities ppb)."""
    burst = round(imp.loss_burst * 1000) if imp.loss_burst else 0
    fields = {
        "name": imp.direction,
        "from": source_dev,
        "to": target_dev,
        "delay": imp.delay,
        "jitter": imp.jitter,
        "dist": imp.distribution,
        "reorder": imp.reorder,
        "loss": imp.loss,
        "burst": burst,
        "dup": imp.duplicate,
        "corrupt": imp.corrupt,
        "limit": imp.limit,
        "seed": imp.seed,
    }
    return ",".join(f"{k}={v}" for k, v in fields.items())


def passthrough(direction: str) -> Impairment:
    """A direction the engine relays untouched (the other one is impaired)."""
    return Impairment(direction=direction, limit=64 << 20)


def argv(
    engine: DelayEngine, tag: str, stats: Path, exe: Path, control: Path | None = None
) -> list[str]:
    return [str(exe), *_arguments(engine, tag, stats, control)]


def direction_specs(engine: DelayEngine) -> tuple[str, str]:
    """The engine's egress and ingress arguments (a direction without impairment is relayed)."""
    egress = engine.egress or passthrough("egress")
    ingress = engine.ingress or passthrough("ingress")
    return (
        direction_spec(egress, engine.port, engine.relay),
        direction_spec(ingress, engine.relay, engine.port),
    )


def _arguments(engine: DelayEngine, tag: str, stats: Path, control: Path | None) -> list[str]:
    out = ["--tag", tag, "--stats", str(stats), *direction_specs(engine)]
    return [*out, "--control", str(control)] if control is not None else out


def expected_arguments(session: str, vm: str, engine: DelayEngine) -> list[str]:
    """The arguments (after the executable) :func:`start` gives the VM's engine for ``engine``.

    Without the executable: its path names the build, which is not part of what
    the plan asks for (and finding it could mean compiling it).
    """
    paths = _paths(session, vm)
    return _arguments(engine, names.owner_tag(session, vm), paths[1], paths[4])


def running_arguments(session: str, vm: str) -> list[str] | None:
    """The arguments (after the executable) the VM's running engine was started with
    (empty when they were not recorded); None when no engine of the VM runs.

    Read from the argv file :func:`_spawn` writes next to the pid file, not from
    ``/proc/PID/cmdline``: the engine splits its direction arguments in place,
    so its command line no longer reads back as given.
    """
    if _owned_pid(session, vm) is None:
        return None
    try:
        args = json.loads(_paths(session, vm)[3].read_text())
    except (FileNotFoundError, ValueError):
        return []  # running, but what with is not known
    return [str(a) for a in args[1:]]


def start(session_ns: str, session: str, vm: str, engine: DelayEngine) -> int:
    """Start the engine for ``vm`` in ``session_ns``; return its pid once it is relaying."""
    paths = _paths(session, vm)
    tag = names.owner_tag(session, vm)
    return _spawn(session_ns, session, vm, argv(engine, tag, paths[1], binary(), paths[4]))


def restart(session_ns: str, session: str, vm: str) -> int:
    """Stop the VM's engine and start a fresh one with the same arguments (same seed)."""
    argv_file = _paths(session, vm)[3]
    try:
        args = json.loads(argv_file.read_text())
    except FileNotFoundError:
        raise DataplaneError(f"no delay engine was started for {session}/{vm}") from None
    stop(session, vm)
    return _spawn(session_ns, session, vm, args)


def update(session: str, vm: str, engine: DelayEngine, timeout: float = _UPDATE_TIMEOUT) -> int:
    """Give the VM's running engine ``engine``'s parameters in place; return its pid.

    Writes the control file (whole, by rename), sends SIGHUP to the engine
    (after checking the pid is this VM's engine, as :func:`stop` does, and that
    it was started with a control file: SIGHUP would end one that was not), and
    waits up to ``timeout`` s for it to acknowledge. Then records the new
    arguments, so :func:`running_arguments` (and drift) see them. Raises
    :class:`DataplaneError` when no engine of the VM runs, it has no control
    file, it rejects the parameters, or it does not answer in time.
    """
    pid = _owned_pid(session, vm)
    who = f"{session}/{vm}"
    if pid is None:
        raise DataplaneError(f"no delay engine runs for {who}")
    _, stats, log, argv_file, control = _paths(session, vm)
    cmdline = procs.cmdline(pid)
    if b"--control" not in cmdline:
        raise DataplaneError(f"the delay engine of {who} (pid {pid}) has no control file")
    try:
        recorded_args = [str(a) for a in json.loads(argv_file.read_text())]
    except (FileNotFoundError, ValueError):
        recorded_args = [os.fsdecode(cmdline[0])]
    generation = (_generations(stats) or (0, 0))[0] + 1
    egress, ingress = direction_specs(engine)
    tmp = control.with_name(f"{control.name}.{os.getpid()}.tmp")
    tmp.write_text(f"generation={generation}\n{egress}\n{ingress}\n")
    os.replace(tmp, control)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        applied, rejected = _generations(stats) or (0, 0)
        if applied >= generation:
            break
        if rejected == generation or not nsops.alive(pid):
            why = _last_line(log) or ("it exited" if not nsops.alive(pid) else "no reason")
            raise DataplaneError(f"the delay engine of {who} refused the change: {why}")
        if time.monotonic() > deadline:
            raise DataplaneError(
                f"the delay engine of {who} did not take the change within {timeout:g} s"
            )
        time.sleep(0.0005)
    args = argv(engine, names.owner_tag(session, vm), stats, Path(recorded_args[0]), control)
    tmp = argv_file.with_name(f"{argv_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(args))
    os.replace(tmp, argv_file)
    return pid


def controllable(session: str, vm: str) -> bool:
    """Whether the VM's engine runs and takes live changes (it was started with a control file)."""
    pid = _owned_pid(session, vm)
    return pid is not None and b"--control" in procs.cmdline(pid)


def _generations(stats: Path) -> tuple[int, int] | None:
    """(applied, rejected) control generations from the engine's stats file; None when the
    file is missing or older than control files."""
    try:
        with open(stats, "rb") as f:
            f.seek(_GENERATIONS_AT)
            data = f.read(_GENERATIONS.size)
    except FileNotFoundError:
        return None
    if len(data) < _GENERATIONS.size:
        return None
    applied, rejected = _GENERATIONS.unpack(data)
    return int(applied), int(rejected)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def _spawn(session_ns: str, session: str, vm: str, args: list[str]) -> int:
    pid_file, _, log, argv_file, _ = _paths(session, vm)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    argv_file.write_text(json.dumps(args))
    with open(log, "w") as log_fh:
        # A new session: the engine must outlive the command that launched the VM.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", session_ns, *args],
            stdout=subprocess.PIPE,
            stderr=log_fh,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    # Recorded at once, so a launch killed right now still leaves a way to stop it.
    pid_file.write_text(f"{proc.pid}\n")
    if not became_ready(proc):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)
        reason = log.read_text().strip() or "no output"
        pid_file.unlink()
        raise DataplaneError(f"the delay engine for {session}/{vm} did not start: {reason}")
    return proc.pid


def became_ready(proc: subprocess.Popen[bytes], timeout: float = _READY_TIMEOUT) -> bool:
    """Whether a just-started engine printed "ready" (all sockets bound) within ``timeout`` s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    return line.strip() == b"ready"


def _owned_pid(session: str, vm: str) -> int | None:
    """The engine's pid if its pid file names a live process started for this VM."""
    pid_file = _paths(session, vm)[0]
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    tag = names.owner_tag(session, vm).encode()
    owned = any(a == b"--tag" and b == tag for a, b in itertools.pairwise(cmdline))
    return pid if owned else None


def run_files() -> dict[str, set[str]]:
    """Every session with files in the run dir, mapped to the VMs they belong to.

    Any of a VM's files counts, not only its pid file: a launch killed while
    starting the engine can leave its argv and log before the pid is recorded.
    """
    base = run_dir("")
    out: dict[str, set[str]] = {}
    if not base.is_dir():
        return out
    for directory in base.iterdir():
        if not directory.is_dir():
            continue
        vms = {p.stem for p in directory.iterdir() if p.suffix[1:] in RUN_FILE_KINDS}
        if vms:
            out[directory.name] = vms
    return out


def engine_processes() -> dict[int, tuple[str, str]]:
    """Every live engine process on this host, by pid: its (session, VM) from its ``--tag``.

    Found by the owner tag in the command line, as :func:`stop` checks it, so an
    engine whose pid was never recorded (its launch was killed between starting
    it and writing the pid file) is found too. The ``ip netns exec`` that starts
    an engine carries the same arguments until it becomes the engine.
    """
    out: dict[int, tuple[str, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked, or a kernel thread
        if not any(Path(os.fsdecode(a)).name.startswith(ENGINE_NAME) for a in cmdline):
            continue
        for flag, value in itertools.pairwise(cmdline):
            if flag != b"--tag":
                continue
            owner = _parse_tag(value.decode(errors="replace"))
            pid = int(entry.name)
            if owner is not None and nsops.alive(pid) and procs.on_this_host(pid):
                out[pid] = owner
    return out


def _parse_tag(tag: str) -> tuple[str, str] | None:
    """``(session, vm)`` of a VM owner tag ``vnic:<session>/<vm>``, else None."""
    prefix = f"{names.PREFIX}:"
    if not tag.startswith(prefix) or "/" not in tag:
        return None
    session, _, vm = tag[len(prefix) :].partition("/")
    return (session, vm) if session and vm else None


def recorded(session: str) -> list[str]:
    """VMs of ``session`` with an engine pid file (running or left by a crash)."""
    base = run_dir(session)
    return sorted(p.stem for p in base.glob("*.pid")) if base.is_dir() else []


def session_engines(session: str) -> dict[str, list[str] | None]:
    """Every VM of ``session`` with an engine pid file, mapped to its :func:`running_arguments`
    (None when the pid file names no live engine of the VM).

    One listing of the session's run dir for all its VMs; a VM absent here has
    no pid file, so no engine of it runs (by :func:`running_arguments`).
    """
    return {vm: running_arguments(session, vm) for vm in recorded(session)}


def running(session: str, vm: str) -> bool:
    return _owned_pid(session, vm) is not None


def stop(session: str, vm: str, grace: float = 2.0) -> None:
    """Stop the VM's engine (TERM, then KILL after ``grace`` s) and remove its files."""
    pid = _owned_pid(session, vm)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and nsops.alive(pid):
            time.sleep(0.01)
        if nsops.alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for path in _paths(session, vm):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        run_dir(session).rmdir()  # only when empty: other VMs' files stay


@dataclass(frozen=True)
class EngineStats:
    """Counters of one VM's engine: direction -> counter name -> value."""

    pid: int
    directions: dict[str, dict[str, int]]
    cpu_seconds: float


def read_stats(session: str, vm: str) -> EngineStats | None:
    """The engine's counters, or None when no engine runs for the VM."""
    pid = _owned_pid(session, vm)
    stats = _paths(session, vm)[1]
    if pid is None:
        return None
    with open(stats, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic, _version, _pid, ndirs = _HEADER.unpack_from(m, 0)
        if magic != _MAGIC:
            return None
        size = struct.calcsize(f"={len(COUNTERS)}Q")
        dirs = {}
        for i, name in enumerate(("egress", "ingress")[:ndirs]):
            values = struct.unpack_from(f"={len(COUNTERS)}Q", m, _HEADER.size + i * size)
            dirs[name] = dict(zip(COUNTERS, values, strict=True))
    return EngineStats(pid, dirs, cpu_seconds(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
