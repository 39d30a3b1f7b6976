"""The change log of every host's desired state, and what the agents report back.

Every write of desired state of a VM placed on a host (launch, stop, a move, and every
write a live change follows: a profile, a session's policy, a VM's or vNIC's override,
a runtime adjustment set, cleared or expired) appends a row naming the VM, in the same
transaction as the write:
:func:`append` takes the next revision from ``fleet_state``, whose row it updates, so
on PostgreSQL concurrent writers queue on that row lock and revisions commit in
order (a watcher that has seen revision R has seen every change up to R; a sequence
would hand out numbers that commit out of order). Rows are level-based: they name a
VM, and the reader sends the VM's desired state as of its read.

The live change that follows such a write waits for the report of the row the write
logged (``VmRow.applied[LOGGED]`` says which row's report the manager last took in;
a newer row is the write's) and appends one itself only for a write that logged none.

Agents report per VM: the revision applied, under their epoch, with the error or the
kernel changes (:func:`record_status`); a manager answering a launch waits for that
report (:class:`Waiters`, woken in process at once, and by polling otherwise: a lost
wake-up costs latency, never a change).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from vnic.errors import Conflict, VnicError
from vnic.manager.notify import notify
from vnic.manager.rows import aware
from vnic.store.models import FleetStateRow, HostChangeRow, HostRow, VmRow, VmStatusRow

#: Changes kept per host before the oldest are pruned; a watcher behind them relists.
KEEP_PER_HOST = 10_000
#: Changes one answer carries at most (the agent asks again for the rest).
CHANGES_MAX = 500
#: Seconds a long poll may wait at most.
WAIT_MAX = 30.0
#: The key of ``VmRow.applied`` holding the revision of the VM's change whose outcome
#: ``applied`` records (absent: a VM launched before the key existed).
LOGGED = "logged"


class Relist(VnicError):
    """The revision asked for is older than what the log still holds: take a snapshot."""

    http_status = 410
    kind = "gone"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "relist": True}


class Stale(Conflict):
    """An agent wrote with an epoch that is not its host's (it was paused, partitioned or
    replaced, or its lease ran out): it must register again and relist."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "stale": True}


def append(s: Session, host_id: int, session: str, vm: str, now: datetime) -> int:
    """Append a change of VM ``session/vm`` on host ``host_id``; its revision."""
    # One statement, and no matching against the objects the session holds (SQLAlchemy's
    # default for an ORM UPDATE: 13 ms an append once a re-check had loaded 100 VMs).
    revision = int(
        s.execute(
            update(FleetStateRow)
            .where(FleetStateRow.id == 1)
            .values(revision=FleetStateRow.revision + 1)
            .returning(FleetStateRow.revision)
            .execution_options(synchronize_session=False)
        ).scalar_one()
    )
    s.add(HostChangeRow(revision=revision, host_id=host_id, session=session, vm=vm, at=now))
    notify(s, host_key(host_id))
    return revision


def host_key(host_id: int) -> str:
    """What wakes the long polls of host ``host_id`` (:meth:`Waiters.wait`)."""
    return f"h{host_id}"


def append_removal(s: Session, vm: VmRow, now: datetime) -> int | None:
    """Before ``vm`` is deleted: tell its host, if it runs on one, that it is no longer
    desired (the change outlives the row: its reader finds no VM, so desired None); in
    the caller's transaction. The revision, or None for a VM running on no host."""
    if vm.host_id is None or vm.state != "running":
        return None
    return append(s, vm.host_id, vm.session.name, vm.name, now)


def newest(s: Session, vms: Iterable[VmRow]) -> dict[int, int]:
    """The revision of the newest change of each of ``vms`` (placed on hosts) on its
    current host, by VM id; VMs without one are left out."""
    wanted = {(v.host_id, v.session.name, v.name): v.id for v in vms if v.host_id is not None}
    if not wanted:
        return {}
    query = (
        select(
            HostChangeRow.host_id,
            HostChangeRow.session,
            HostChangeRow.vm,
            func.max(HostChangeRow.revision),
        )
        .where(HostChangeRow.host_id.in_({h for h, _, _ in wanted}))
        .where(HostChangeRow.vm.in_({v for _, _, v in wanted}))
        .group_by(HostChangeRow.host_id, HostChangeRow.session, HostChangeRow.vm)
    )
    out: dict[int, int] = {}
    for host_id, session, vm, revision in s.execute(query).all():
        vm_id = wanted.get((host_id, session, vm))
        if vm_id is not None:
            out[vm_id] = int(revision)
    return out


def logged(applied: Mapping[str, Any] | None) -> int:
    """The revision whose outcome ``applied`` records; -1 when it names none."""
    value = (applied or {}).get(LOGGED)
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def current_revision(s: Session) -> int:
    return int(s.scalar(select(FleetStateRow.revision).where(FleetStateRow.id == 1)) or 0)


def changes_after(
    s: Session, host_id: int, after: int, limit: int = CHANGES_MAX
) -> list[HostChangeRow]:
    """The host's changes after revision ``after``, oldest first, at most ``limit``;
    Relist when ``after`` is behind what was pruned."""
    floor = int(s.scalar(select(FleetStateRow.floor).where(FleetStateRow.id == 1)) or 0)
    if after < floor:
        raise Relist(
            f"revision {after} is older than the change log holds (it starts after {floor}): relist"
        )
    query = (
        select(HostChangeRow)
        .where(HostChangeRow.host_id == host_id, HostChangeRow.revision > after)
        .order_by(HostChangeRow.revision)
        .limit(limit)
    )
    return list(s.scalars(query))


def prune(s: Session, keep: int = KEEP_PER_HOST) -> int:
    """Drop every host's changes but its newest ``keep``; raise the floor past them.
    Returns the rows dropped."""
    dropped = 0
    for (host_id,) in s.execute(select(HostChangeRow.host_id).distinct()).all():
        cut = s.scalar(
            select(HostChangeRow.revision)
            .where(HostChangeRow.host_id == host_id)
            .order_by(HostChangeRow.revision.desc())
            .offset(keep)
            .limit(1)
        )
        if cut is None:
            continue
        result = s.execute(
            delete(HostChangeRow).where(
                HostChangeRow.host_id == host_id, HostChangeRow.revision <= cut
            )
        )
        dropped += int(result.rowcount or 0)  # type: ignore[attr-defined]
        s.execute(
            update(FleetStateRow)
            .where(FleetStateRow.id == 1, FleetStateRow.floor < cut)
            .values(floor=cut)
            .execution_options(synchronize_session=False)
        )
    return dropped


def count(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(HostChangeRow)) or 0)


@dataclass(frozen=True)
class StatusReport:
    """One VM's result as its agent reports it."""

    session: str
    vm: str
    revision: int
    error: Mapping[str, Any] | None = None
    changes: Sequence[str] = ()


def check_epoch(host: HostRow, epoch: int, now: datetime) -> None:
    """Stale unless ``epoch`` is the host's and its lease has not run out."""
    if epoch != host.epoch:
        raise Stale(
            f"host {host.name} wrote with epoch {epoch}, its epoch is {host.epoch}: "
            "register again and relist"
        )
    until = aware(host.lease_until)
    if until is None or until < now:
        raise Stale(f"the lease of host {host.name} ran out: register again and relist")


def record_status(
    s: Session, host: HostRow, epoch: int, reports: Iterable[StatusReport], now: datetime
) -> int:
    """Store each report of a VM placed on ``host`` (reports of VMs placed elsewhere, or
    older than what is stored, are ignored); Stale for a stale epoch. Returns how many
    were stored."""
    check_epoch(host, epoch, now)
    stored = 0
    for r in reports:
        # FOR UPDATE: a VM removed meanwhile is either gone here or waits for this
        # report (its status row goes with it); unlocked, the two raced on PostgreSQL
        # (the report's write of a status row a removal had just deleted failed).
        vm = s.scalar(
            select(VmRow)
            .join(VmRow.session)
            .where(VmRow.name == r.vm, VmRow.session.has(name=r.session))
            .with_for_update(of=VmRow)
        )
        if vm is None or vm.host_id != host.id:
            continue
        row = s.get(VmStatusRow, vm.id)
        if row is None:
            row = VmStatusRow(vm_id=vm.id, host_id=host.id, revision=-1, epoch=epoch)
            s.add(row)
        elif row.revision > r.revision:
            continue
        row.host_id, row.revision, row.epoch = host.id, r.revision, epoch
        row.error = dict(r.error) if r.error else None
        row.changes = [str(c) for c in r.changes][:200]
        row.at = now
        stored += 1
    if stored:
        notify(s, STATUS)
    return stored


#: What wakes the waits for agents' reports (:meth:`Waiters.wait`).
STATUS = "s"


@dataclass
class Waiters:
    """Wakes threads waiting for a host's changes or for reports when they are written;
    the others wake at the next poll (``poll`` seconds, default 0.2).

    A wake names what was written: :func:`host_key` of a host whose changes were
    appended, :data:`STATUS` for reports, or nothing (everything). A host's long poll
    waits on its own key only: with every wake waking every long poll, 200 hosts'
    long polls each read the database on every write of any of them (a stampede that
    saturated the replicas of the bench's simulation).

    ``listening``: set while the PostgreSQL listener (:mod:`vnic.manager.notify`)
    receives this process's own notifications, which then wake, and waits poll only
    every ``poll_listening`` seconds (default 5: a notification is lost only with the
    listener's connection, and the listener wakes everyone when it is back); until then,
    and on SQLite, a writer wakes everyone itself (:meth:`local_wake`).
    """

    poll: float = 0.2
    listening: threading.Event | None = None
    poll_listening: float = 5.0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _all: int = 0
    _keyed: dict[str, int] = field(default_factory=dict, repr=False)

    def wake(self, keys: Iterable[str] | None = None) -> None:
        """Wake the waits for ``keys`` (None: every wait)."""
        with self._cond:
            if keys is None:
                self._all += 1
            else:
                for key in keys:
                    self._keyed[key] = self._keyed.get(key, 0) + 1
            self._cond.notify_all()

    def local_wake(self) -> None:
        """After a write in this process: wake everyone, unless the listener will."""
        if self.listening is None or not self.listening.is_set():
            self.wake()

    def wait(self, timeout: float, key: str | None = None) -> None:
        """Return on the next :meth:`wake` of ``key`` or of everything (any wake, for
        None), or after ``min(timeout, poll)`` seconds (``poll_listening`` while
        listening)."""
        live = self.listening is not None and self.listening.is_set()
        poll = self.poll_listening if live else self.poll
        with self._cond:
            start = self._seen(key)
            self._cond.wait_for(lambda: self._seen(key) != start, min(timeout, poll))

    def _seen(self, key: str | None) -> tuple[int, int]:
        if key is None:
            return self._all, sum(self._keyed.values())
        return self._all, self._keyed.get(key, 0)


def lease_until(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def deadline(timeout: float) -> float:
    return time.monotonic() + timeout
