"""QEMU guests on this host: boot image, accelerator, processes, QMP and the guest agent.

Each guest has a run directory ``/run/vnic/qemu/<session>/<vm>/`` (under
``$VNIC_RUNTIME_DIR/qemu``, or ``VNIC_QEMU_RUN_DIR`` if set) holding its pid file, QMP socket, guest-agent
socket and console log. The run directory is made before anything else of the
guest and removed last, so it is what marks a VM as a QEMU guest. The QEMU
process carries the VM's owner tag as its ``-name``; a pid is only ever
signalled after its command line shows that tag.

Both sockets are QEMU chardev servers that take one client at a time, so each
call here connects, does one exchange and disconnects: any process (the agent,
a CLI command, a test) can talk to a guest without holding it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import procs, vminit
from vnic.errors import Conflict, DataplaneError
from vnic.plan.guest import READY_MARK, GuestSpec, RunFiles, owner_of_cmdline, qemu_argv
from vnic.settings import Settings, runtime_subdir

#: The image builder, in the repository (vnic is installed editable from it).
BUILD_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vm" / "build-image.sh"
#: Seconds a launch waits for the guest's NIC to come up (boot under TCG takes about 3 s).
READY_TIMEOUT = 60.0
#: Seconds one QMP or guest-agent exchange may take.
CALL_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- image


@dataclasses.dataclass(frozen=True)
class Image:
    """A built boot image: kernel, initramfs and what went into them (``info``)."""

    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def info(self) -> dict[str, str]:
        path = self.directory / "info"
        if not path.exists():
            return {}
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k: v for k, v in pairs}


def image_cache() -> Path:
    """Where ``build-image.sh`` keeps its builds: ``VNIC_VM_CACHE``, else /var/cache/vnic/vm."""
    return Path(os.environ.get("VNIC_VM_CACHE") or "/var/cache/vnic/vm")


def image_key(script: Path | None = None) -> str | None:
    """The cache key the build script (``script``, default :data:`BUILD_SCRIPT`) builds
    under, computed as the script does: the first 16 hex digits of the SHA-256 of the
    script followed by the host tools it copies in (its ``GUEST_TOOLS``). None if the
    script, its tool list or one of the tools is missing (it would then fail, not build)."""
    try:
        text = (script or BUILD_SCRIPT).read_bytes()
        found = re.search(rb"^GUEST_TOOLS=\(([^)]*)\)", text, re.MULTILINE)
        if found is None:
            return None
        digest = hashlib.sha256(text)
        for tool in found.group(1).split():
            digest.update(Path(tool.decode()).read_bytes())
    except OSError:
        return None
    return digest.hexdigest()[:16]


def cached_image() -> Image | None:
    """The guest boot image if it exists already, without building anything:
    ``VNIC_VM_IMAGE`` if set, else the finished build (its ``complete`` file written) of
    the current build script in :func:`image_cache`. None when a launch would build it."""
    given = os.environ.get("VNIC_VM_IMAGE")
    if given:
        found = Image(Path(given))
    else:
        key = image_key()
        if key is None:
            return None
        found = Image(image_cache() / key)
        if not (found.directory / "complete").is_file():
            return None
    return found if found.kernel.is_file() and found.initrd.is_file() else None


@cache
def image() -> Image:
    """The guest boot image: ``VNIC_VM_IMAGE`` if set, else built (or found cached) by
    ``scripts/vm/build-image.sh`` (a few seconds the first time, milliseconds after)."""
    given = os.environ.get("VNIC_VM_IMAGE")
    if given:
        found = Image(Path(given))
    else:
        if not BUILD_SCRIPT.exists():
            raise DataplaneError(
                f"cannot build the guest image: {BUILD_SCRIPT} is missing "
                "(install vnic from its repository, or set VNIC_VM_IMAGE)"
            )
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            raise DataplaneError(f"building the guest image failed: {proc.stderr.strip()[-800:]}")
        found = Image(Path(proc.stdout.strip().splitlines()[-1]))
    for path in (found.kernel, found.initrd):
        if not path.is_file():
            raise DataplaneError(f"guest image {found.directory} has no {path.name}")
    return found


# ----------------------------------------------------------------------------- accelerator


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """How guests run here: ``kvm`` (hardware) or ``tcg`` (software emulation), and why."""

    name: str
    reason: str


def cpu_has_virtualisation(cpuinfo: str) -> bool:
    """Whether the CPU flags of ``/proc/cpuinfo`` include vmx (Intel) or svm (AMD)."""
    return any(
        line.startswith("flags") and re.search(r"\b(vmx|svm)\b", line)
        for line in cpuinfo.splitlines()
    )


@cache
def accelerator() -> Accelerator:
    """KVM when it really runs a guest, else TCG; ``VNIC_QEMU_ACCEL`` forces one.

    ``/dev/kvm`` alone proves nothing (a paravirtual variant exists that cannot
    run stock kernels), so KVM is chosen only when the CPU shows vmx/svm and a
    trial boot of the guest image reaches its ready line.
    """
    decided = _accelerator_without_trial()
    if decided is not None:
        return decided
    ok, detail = _trial_boot("kvm")
    if ok:
        return Accelerator("kvm", "hardware virtualisation (a trial boot succeeded)")
    return Accelerator("tcg", f"a KVM trial boot failed ({detail}): software emulation (TCG)")


def known_accelerator() -> Accelerator | None:
    """:func:`accelerator` if telling it builds nothing (``vnic doctor``): None only when
    a KVM trial boot would decide and the guest image is not built yet."""
    decided = _accelerator_without_trial()
    if decided is not None or cached_image() is None:
        return decided
    return accelerator()


def _accelerator_without_trial() -> Accelerator | None:
    """The accelerator where no trial boot is needed to tell (forced, no /dev/kvm, or no
    vmx/svm), else None."""
    forced = os.environ.get("VNIC_QEMU_ACCEL", "").strip()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise DataplaneError(f"VNIC_QEMU_ACCEL: got {forced!r}; expected kvm or tcg")
        return Accelerator(forced, "forced by VNIC_QEMU_ACCEL")
    if not os.path.exists("/dev/kvm"):
        return Accelerator("tcg", "no /dev/kvm: software emulation (TCG)")
    with open("/proc/cpuinfo") as f:
        if not cpu_has_virtualisation(f.read()):
            return Accelerator(
                "tcg",
                "/dev/kvm exists but the CPU shows no vmx/svm (a paravirtual KVM that cannot "
                "run stock kernels): software emulation (TCG)",
            )
    return None


def _trial_boot(accel: str, timeout: float = 20.0) -> tuple[bool, str]:
    """Boot the guest image with ``accel`` and no NIC until its init runs; (worked, detail)."""
    img = image()
    directory = Settings.from_env().runtime_dir / f"qemu-trial-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    console = directory / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(img.kernel),
        "-initrd",
        str(img.initrd),
        "-append",
        "console=ttyS0 quiet panic=-1",
        "-serial",
        f"file:{console}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if console.exists() and "vnic-guest:" in console.read_text(errors="replace"):
                return True, "booted"
            if proc.poll() is not None:
                return False, (proc.stderr.read() if proc.stderr else "").strip()[-200:]
            time.sleep(0.1)
        return False, f"no console output within {timeout:.0f} s"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------- processes


def run_root() -> Path:
    return runtime_subdir("qemu", "VNIC_QEMU_RUN_DIR")


def run_files(session: str, vm: str) -> RunFiles:
    return RunFiles(run_root() / session / vm)


def is_guest(session: str, vm: str) -> bool:
    """Whether the VM is a QEMU guest here: its run directory exists (made first, removed last)."""
    return run_files(session, vm).directory.is_dir()


def guests() -> dict[str, set[str]]:
    """Every session with guest run directories on this host, and those guests' VM names."""
    return vminit.session_dirs(run_root())


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def guest_pid(session: str, vm: str, owner: str) -> int | None:
    """The pid of the VM's QEMU, if its pid file names a live process whose ``-name`` is
    ``owner`` (a recycled pid is someone else's)."""
    try:
        pid = int(run_files(session, vm).pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if owner_of_cmdline(_cmdline(pid)) == owner else None


def owned_processes(owner_prefix: str) -> dict[int, str]:
    """QEMU processes of this host whose ``-name`` starts with ``owner_prefix``, by pid (found
    in /proc, for a guest whose pid file was never written; this host's alone, see
    :func:`vnic.dataplane.procs.on_this_host`)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        owner = owner_of_cmdline(argv)
        if owner is not None and owner.startswith(owner_prefix) and procs.on_this_host(int(entry)):
            out[int(entry)] = owner
    return out


def start(session_ns: str, spec: GuestSpec) -> RunFiles:
    """Start the guest's QEMU in ``session_ns`` (where its tap is); returns once QEMU has
    daemonized (tap opened, sockets listening). The run directory must exist."""
    img = image()
    run = run_files(spec.session, spec.vm)
    argv = qemu_argv(spec, img.kernel, img.initrd, run)
    proc = nsops.run(session_ns, argv, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise DataplaneError(
            f"QEMU for {spec.session}/{spec.vm} did not start: {proc.stderr.strip()[-500:]}"
        )
    return run


def wait_ready(run: RunFiles, owner: str, timeout: float = READY_TIMEOUT) -> float:
    """Wait until the guest's console shows its NIC up; seconds waited.

    Raises DataplaneError with the console's last lines if QEMU exits or the
    deadline passes first.
    """
    start_at = time.monotonic()
    deadline = start_at + timeout
    pid = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if READY_MARK in run.console.read_text(errors="replace"):
                return time.monotonic() - start_at
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = int(run.pid.read_text().strip())
        if pid is not None and owner_of_cmdline(_cmdline(pid)) != owner:
            raise DataplaneError(f"guest {owner} stopped while booting: {_tail(run)}")
        time.sleep(0.02)
    raise DataplaneError(f"guest {owner} not ready after {timeout:.0f} s: {_tail(run)}")


def _tail(run: RunFiles, lines: int = 8) -> str:
    try:
        text = run.console.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no console output"
    return " | ".join(text[-lines:]) or "no console output"


def stop(session: str, vm: str, owner: str, grace: float = 3.0) -> None:
    """Stop the VM's QEMU: QMP ``quit``, then SIGTERM, then SIGKILL, ``grace`` s apart.
    Idempotent; only a process carrying ``owner`` is signalled."""
    run = run_files(session, vm)
    pids = set(p for p, o in owned_processes(owner).items() if o == owner)
    pid = guest_pid(session, vm, owner)
    if pid is not None:
        pids.add(pid)
    if pids and run.qmp.exists():
        with contextlib.suppress(OSError, DataplaneError):
            qmp(run, "quit", timeout=1.0)
    for sig, wait in ((None, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if sig is not None:
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if owner_of_cmdline(_cmdline(p)) == owner}
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    if pids:
        raise DataplaneError(f"QEMU of {owner} (pid {sorted(pids)}) did not stop")


def remove_run_dir(session: str, vm: str) -> None:
    """Remove the guest's run directory (after its QEMU stopped), and the session's if empty."""
    run = run_files(session, vm)
    shutil.rmtree(run.directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.directory.parent.rmdir()  # only when empty: other guests' directories stay


# ----------------------------------------------------------------------------- QMP and agent


@contextlib.contextmanager
def _connected(path: Path, timeout: float) -> Iterator[Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        with sock.makefile("rwb", buffering=0) as f:
            yield f
    except (OSError, ValueError) as exc:
        raise DataplaneError(f"{path}: {exc}") from exc
    finally:
        sock.close()


def _send(f: Any, data: bytes) -> None:
    """Write all of ``data``: one write to a socket may take only part of it (a large
    ``input-data`` does not fit the socket's buffer)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]


def _read_json(f: Any) -> dict[str, Any]:
    line = f.readline()
    if not line:
        raise DataplaneError("the QEMU socket closed")
    return dict(json.loads(line))


def qmp(run: RunFiles, command: str, timeout: float = CALL_TIMEOUT, **arguments: Any) -> Any:
    """One QMP command's ``return`` (events in between are skipped); DataplaneError on error."""
    with _connected(run.qmp, timeout) as f:
        _read_json(f)  # greeting
        _send(f, b'{"execute": "qmp_capabilities"}\n')
        _answer(f, "qmp_capabilities")
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        _send(f, json.dumps(message).encode() + b"\n")
        return _answer(f, command)


def _answer(f: Any, command: str) -> Any:
    while True:
        reply = _read_json(f)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise DataplaneError(f"{command}: {reply['error'].get('desc', reply['error'])}")


def agent_call(
    run: RunFiles, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """One guest-agent command's ``return``.

    Each exchange starts with ``guest-sync-delimited``: the agent answers a
    0xFF byte and the sync id, which skips whatever an earlier, interrupted
    client left unread in the channel.
    """
    sync = random.randrange(1, 2**31)
    with _connected(run.agent, timeout) as f:
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync}}
        _send(f, b"\xff" + json.dumps(request).encode() + b"\n")
        while True:
            byte = f.read(1)
            if not byte:
                raise DataplaneError("the guest agent's socket closed")
            if byte != b"\xff":
                continue
            reply = _read_json(f)
            if reply.get("return") == sync:
                break
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        _send(f, json.dumps(message).encode() + b"\n")
        return _answer(f, command)


def wait_agent(run: RunFiles, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the guest agent answers (it starts just after the NIC is up)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            agent_call(run, "guest-ping", timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except DataplaneError as exc:
            last = str(exc)
            time.sleep(0.05)
    raise DataplaneError(f"the guest agent of {run.directory} did not answer: {last}")


@dataclasses.dataclass
class GuestProcess:
    """A process started in a guest by its agent; :meth:`wait` collects its output."""

    run: RunFiles
    pid: int
    argv: tuple[str, ...]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        status = agent_call(self.run, "guest-exec-status", {"pid": self.pid})
        if not status.get("exited"):
            return None
        self.stdout = _decoded(status.get("out-data"))
        self.stderr = _decoded(status.get("err-data"))
        code = status.get("exitcode")
        self.returncode = int(code) if code is not None else 128 + int(status.get("signal", 9))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(list(self.argv), timeout or 0.0)
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        return code

    def kill(self) -> None:
        """SIGKILL the process (through a second command in the guest)."""
        if self.poll() is None:
            spawn(self.run, ["kill", "-9", str(self.pid)], capture=False)


def _decoded(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""


def spawn(
    run: RunFiles, argv: Sequence[str], *, stdin: str | None = None, capture: bool = True
) -> GuestProcess:
    """Start ``argv`` in the guest (looked up on the guest's PATH); output is captured
    (with ``capture``) and returned when it ends."""
    if not argv:
        raise Conflict("no command to run in the guest")
    args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin.encode()).decode()
    result = agent_call(run, "guest-exec", args)
    return GuestProcess(run, int(result["pid"]), tuple(argv))


def execute(
    run: RunFiles, argv: Sequence[str], *, timeout: float = 60.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the guest to completion; killed (and TimeoutExpired) after ``timeout`` s."""
    proc = spawn(run, argv, stdin=stdin)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(DataplaneError):
            proc.kill()
        raise
    return subprocess.CompletedProcess(list(argv), code, proc.stdout, proc.stderr)
