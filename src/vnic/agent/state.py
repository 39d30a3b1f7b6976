"""The agent's desired state: the VMs this host must run, in a small JSON file.

Written atomically (a temporary file, fsync, rename) under a file lock before the
kernel is touched on launch and before anything is removed on destroy; see
:mod:`vnic.agent.core` for why that order makes SIGKILL at any moment harmless.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vnic.agent.port import DesiredVm, VmKey, vm_label
from vnic.agent.wire import request_from_wire, request_to_wire
from vnic.errors import Conflict


class DesiredState:
    """The desired VMs of one host, as ``<state_dir>/desired.json``.

    Every change re-reads the file and rewrites it through a temporary file,
    fsync and rename, under an exclusive ``flock`` on ``desired.lock``: a
    reader or a restarted agent sees the old or the new set, never a torn
    one, and two processes on one host (``vnic serve`` and an embedded
    ``vnic vm launch``) never lose each other's changes.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "desired.json"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = state_dir / "desired.lock"
        self._thread_lock = threading.Lock()
        self._sessions: set[str] = set()
        # Parsing every profile on every call would cost O(VMs) each time: keep the
        # last parse, keyed by the file's identity, and each VM's JSON form.
        self._cache: tuple[tuple[int, int, int], dict[VmKey, DesiredVm], set[str]] | None = None
        self._parsed: dict[str, DesiredVm] = {}
        self._wire: dict[VmKey, tuple[DesiredVm, dict[str, Any]]] = {}

    @contextmanager
    def _locked(self) -> Iterator[dict[VmKey, DesiredVm]]:
        with self._thread_lock, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._load()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[VmKey, DesiredVm]:
        """The file's VMs; parsed again only when the file changed (by inode, time, size)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._sessions = set()
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rename makes a new inode
        if self._cache is not None and self._cache[0] == stamp:
            self._sessions = set(self._cache[2])
            return dict(self._cache[1])
        doc = json.loads(self.path.read_text() or "{}")
        out: dict[VmKey, DesiredVm] = {}
        for entry in doc.get("vms", []):
            text = json.dumps(entry, sort_keys=True)
            known = self._parsed.get(text)
            if known is None:
                known = DesiredVm(str(entry["driver"]), request_from_wire(entry["request"]))
                self._wire[known.key] = (known, entry)
            out[known.key] = known
        self._parsed = {json.dumps(self._wire_of(vm), sort_keys=True): vm for vm in out.values()}
        self._sessions = {str(s) for s in doc.get("sessions", [])} | {k[0] for k in out}
        self._cache = (stamp, dict(out), set(self._sessions))
        return out

    def _wire_of(self, vm: DesiredVm) -> dict[str, Any]:
        """The JSON form of ``vm``, made once per request object (profiles are costly to dump)."""
        cached = self._wire.get(vm.key)
        if cached is not None and cached[0] is vm:
            return cached[1]
        entry = {"driver": vm.driver, "request": request_to_wire(vm.request)}
        self._wire[vm.key] = (vm, entry)
        return entry

    def _save(self, vms: Mapping[VmKey, DesiredVm]) -> None:
        """Write ``vms`` whole (temp file, fsync, rename). On failure (a full disk) the
        file, the temp file and what this object remembers stay as they were."""
        sessions = self._sessions | {k[0] for k in vms}
        doc = {
            # Every session this host's agent built something in and has not torn
            # down: the only sessions whose leftovers it may reap (ownership).
            "sessions": sorted(sessions),
            "vms": [self._wire_of(vm) for _, vm in sorted(vms.items())],
        }
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:
                # write() and fsync() name no file: say which one could not be written.
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise
        self._sessions = sessions
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        st = os.stat(self.path)
        self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), dict(vms), set(self._sessions))
        self._wire = {k: v for k, v in self._wire.items() if k in vms}

    def all(self) -> list[DesiredVm]:
        with self._locked() as vms:
            return list(vms.values())

    def get(self, key: VmKey) -> DesiredVm | None:
        with self._locked() as vms:
            return vms.get(key)

    def put(self, vm: DesiredVm, *, new: bool = False) -> None:
        """Record ``vm``; with ``new``, refuse (409) if the host already has it."""
        with self._locked() as vms:
            if new and vm.key in vms:
                raise Conflict(f"VM {vm_label(vm.key)} is already running on this host")
            vms[vm.key] = vm
            self._save(vms)

    def put_many(self, wanted: Sequence[DesiredVm]) -> None:
        """Record every VM of ``wanted`` (replacing its entry) with one write."""
        with self._locked() as vms:
            for vm in wanted:
                vms[vm.key] = vm
            self._save(vms)

    def remove(self, keys: Sequence[VmKey]) -> None:
        with self._locked() as vms:
            # Every key popped (a generator inside any() would stop at the first).
            removed = [k for k in keys if vms.pop(k, None) is not None]
            if removed:
                self._save(vms)

    def replace(self, wanted: Sequence[DesiredVm]) -> None:
        with self._locked():
            self._save({vm.key: vm for vm in wanted})

    def owned_sessions(self) -> set[str]:
        """Sessions this agent made objects in and has not torn down."""
        with self._locked():
            return set(self._sessions)

    def forget_session(self, session: str) -> None:
        """The session is gone from this host: stop owning it (it has no desired VM)."""
        with self._locked() as vms:
            if session in self._sessions and not any(k[0] == session for k in vms):
                self._sessions.discard(session)
                self._save(vms)
