"""Hypervisor hosts: their tokens, registrations, leases and epochs, placement, and
each host's desired state as a snapshot and as changes since a revision.

A host is added by an admin (:meth:`Hosts.add_host`, which shows its token once);
its agent registers with that token (:meth:`Hosts.register_host`: the epoch rises
by one, the lease starts) and renews the lease every few seconds. A host whose lease
ran out is ``unknown``: its VMs keep running where they are and are not moved, but
nothing new is placed on it, and its agent's writes are refused until it registers
again (with a new epoch) and relists. See ``docs/hosts.md``.

While no host is added, every VM runs on the manager's own agent, as on one host.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from vnic.errors import InUse, InvalidInput, NotFound, Unauthenticated
from vnic.manager import changelog
from vnic.manager.auth import hash_secret
from vnic.manager.changelog import StatusReport, Waiters
from vnic.manager.core import ServiceCore
from vnic.manager.overlays import OverlayDoc, hosts_of, overlays_of
from vnic.manager.rows import VM_RESOLVE_LOADS, aware
from vnic.model.launch import LaunchRequest
from vnic.model.placement import (
    Candidate,
    Constraint,
    choose_host,
    parse_constraint,
    parse_host_name,
    parse_labels,
)
from vnic.store.models import HostRow, NicRow, SessionRow, VmRow, VmStatusRow

#: Seconds a registration or renewal holds the lease (agents renew every third of it).
LEASE_SECONDS = 10.0
#: Seconds a launch, stop or live change on a host waits for its agent's report.
HOST_WAIT = 60.0
#: Host tokens start with this (API tokens with ``vnic_``).
HOST_TOKEN_PREFIX = "vnich_"
#: Capacity an agent may report at most (vNICs, CPUs): a bound on a hostile host.
MAX_VNICS, MAX_CPUS = 100_000, 4096

#: A VM's desired state on its host: (driver kind, launch request), or None: not to run.
Desired = tuple[str, LaunchRequest] | None
#: One change as agents read it: revision, session, VM (:data:`SESSION_OVERLAYS` for the
#: session's overlays), the VM's desired state, and the session's overlays (or None).
Change = tuple[int, str, str, Desired, list[OverlayDoc] | None]
#: The ``vm`` of a change that is a change of the session's overlays on the host.
SESSION_OVERLAYS = ""


@dataclass(frozen=True)
class HostInfo:
    name: str
    #: ``new`` (never registered), ``ready`` (lease held) or ``unknown`` (lease ran out).
    state: str
    cordoned: bool
    labels: Mapping[str, str]
    underlay: str | None
    #: Capacity the agent reported: vNICs and CPUs (0 before it registered).
    vnics: int
    cpus: int
    epoch: int
    lease_until: datetime | None
    metrics_url: str | None
    #: VMs placed on it, and their vNICs.
    vms: int = 0
    used: int = 0


@dataclass(frozen=True)
class Registration:
    host: str
    epoch: int
    lease_seconds: float
    revision: int


@dataclass(frozen=True)
class VmStatus:
    """What the agent of a VM's host last reported for it."""

    host: str
    revision: int
    epoch: int
    error: Mapping[str, Any] | None
    changes: Sequence[str] = field(default_factory=list)


class Hosts(ServiceCore):
    """Hosts, placement and each host's desired state (see the module)."""

    lease_seconds: float = LEASE_SECONDS
    host_wait: float = HOST_WAIT

    @functools.cached_property
    def waiters(self) -> Waiters:
        """Wakes long polls and launch waits when a change or a report is written: in this
        process at once; on PostgreSQL in every replica (:mod:`vnic.manager.notify`)."""
        waiters = Waiters()
        if self.db.dialect == "postgresql":
            from vnic.manager.notify import Listener

            waiters.listening = threading.Event()
            Listener(self.db, waiters, waiters.listening).start()
        return waiters

    # ---------------------------------------------------------------- admins

    def add_host(self, name: str, labels: Mapping[str, str] | None = None) -> tuple[HostInfo, str]:
        """Add host ``name`` (labels as its agent will not report them); returns it and
        its token, shown only here."""
        parse_host_name(name, "name")
        wanted = parse_labels(dict(labels or {}), "labels")
        secret = HOST_TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self.db.transaction() as s:
            if s.scalar(select(HostRow).where(HostRow.name == name)) is not None:
                raise InvalidInput.one("name", name, "a host name not in use")
            row = HostRow(
                name=name, secret_hash=hash_secret(secret), labels=wanted, created_at=self.clock()
            )
            s.add(row)
            s.flush()
            return self._host_info(s, row), secret

    def remove_host(self, name: str) -> None:
        """Remove a host no running VM is placed on (those that are are named); stopped
        VMs assigned to it lose the assignment."""
        with self.db.transaction() as s:
            row = self._host_row(s, name)
            assigned = list(s.scalars(select(VmRow).where(VmRow.host_id == row.id)))
            placed = [f"{v.session.name}/{v.name}" for v in assigned if v.state == "running"]
            if placed:
                raise InUse("host", name, placed)
            for vm in assigned:
                vm.host_id = None
            s.flush()
            s.delete(row)

    def list_hosts(self) -> list[HostInfo]:
        with self.db.reading() as s:
            used = self._used(s)
            return [
                self._host_info(s, r, used)
                for r in s.scalars(select(HostRow).order_by(HostRow.name))
            ]

    def get_host(self, name: str) -> HostInfo:
        with self.db.reading() as s:
            return self._host_info(s, self._host_row(s, name))

    def cordon_host(self, name: str, cordoned: bool = True) -> HostInfo:
        """Place nothing new on the host (its VMs stay), or again allow it."""
        with self.db.transaction() as s:
            row = self._host_row(s, name)
            row.cordoned = cordoned
            return self._host_info(s, row)

    def prometheus_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: every ready host that serves metrics, with
        its ``host`` label (and its own labels as ``label_<key>``)."""
        out = []
        for h in self.list_hosts():
            if h.state != "ready" or not h.metrics_url:
                continue
            target, path = _target_of(h.metrics_url)
            labels = {"host": h.name, "__metrics_path__": path}
            labels |= {
                f"label_{k.replace('.', '_').replace('-', '_')}": v for k, v in h.labels.items()
            }
            out.append({"targets": [target], "labels": labels})
        return out

    def stats_urls(self, session: str) -> list[str]:
        """The stats endpoints (``http://addr:port/stats``) of the ready hosts that run
        VMs of ``session``, read by :class:`vnic.agent.fleet.FleetAgent`."""
        with self.db.reading() as s:
            query = (
                select(HostRow.metrics_url, HostRow.lease_until)
                .join(VmRow, VmRow.host_id == HostRow.id)
                .join(SessionRow, SessionRow.id == VmRow.session_id)
                .where(SessionRow.name == session, VmRow.state == "running")
                .distinct()
            )
            now = self.clock()
            out = []
            for url, until in s.execute(query).all():
                lease = aware(until)
                if url and lease is not None and lease >= now:
                    out.append(url.rsplit("/", 1)[0] + "/stats")
            return out

    # ---------------------------------------------------------------- agents

    def host_of_token(self, secret: str | None) -> str:
        """The host whose token ``secret`` is; Unauthenticated otherwise."""
        if not secret:
            raise Unauthenticated(
                "an agent needs its host token: 'Authorization: Bearer vnich_...'"
            )
        digest = hash_secret(secret)
        with self.db.reading() as s:
            row = s.scalar(select(HostRow).where(HostRow.secret_hash == digest))
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                raise Unauthenticated("the host token is not known (removed, or mistyped)")
            return row.name

    def register_host(
        self,
        name: str,
        *,
        underlay: str,
        vnics: int,
        cpus: int,
        labels: Mapping[str, str] | None = None,
        metrics_url: str | None = None,
    ) -> Registration:
        """An agent (re)registers: record what it reports, raise the epoch, start the lease."""
        _check_count(vnics, "capacity.vnics", MAX_VNICS)
        _check_count(cpus, "capacity.cpus", MAX_CPUS)
        reported = parse_labels(dict(labels or {}), "labels")
        underlay = _parse_address(underlay)
        if metrics_url is not None and (
            not isinstance(metrics_url, str)
            or len(metrics_url) > 200
            or not metrics_url.startswith(("http://", "https://"))
        ):
            raise InvalidInput.one(
                "metrics_url", metrics_url, "an http(s) URL of at most 200 characters"
            )
        now = self.clock()
        with self.db.transaction() as s:
            row = self._host_row(s, name)
            row.underlay, row.vnics, row.cpus, row.metrics_url = underlay, vnics, cpus, metrics_url
            row.labels = {**reported, **{k: v for k, v in row.labels.items() if k not in reported}}
            row.epoch += 1
            row.lease_until = changelog.lease_until(now, self.lease_seconds)
            row.registered_at = now
            return Registration(name, row.epoch, self.lease_seconds, changelog.current_revision(s))

    def renew_lease(self, name: str, epoch: int) -> float:
        """Extend the lease of the host's current epoch; Stale otherwise."""
        now = self.clock()
        until = changelog.lease_until(now, self.lease_seconds)
        with self.db.transaction() as s:
            # The common case in one statement (a fleet renews many times a second);
            # anything else (stale, run out, no such host) is told apart below.
            renewed = s.execute(
                update(HostRow)
                .where(HostRow.name == name, HostRow.epoch == epoch, HostRow.lease_until >= now)
                .values(lease_until=until)
                .execution_options(synchronize_session=False)
            )
            if renewed.rowcount == 1:  # type: ignore[attr-defined]
                return self.lease_seconds
            row = self._host_row(s, name)
            changelog.check_epoch(row, epoch, now)
            row.lease_until = until
        return self.lease_seconds

    def host_snapshot(
        self, name: str
    ) -> tuple[int, int, list[tuple[str, str, Desired]], dict[str, list[OverlayDoc]]]:
        """``(revision, epoch, [(session, vm, desired)], {session: overlays})``: every VM
        the host must run and the overlays its sessions need there, read in one
        transaction with the revision it is current at."""
        with self.db.reading() as s:
            row = self._host_row(s, name)
            revision = changelog.current_revision(s)
            query = (
                select(VmRow)
                .options(*VM_RESOLVE_LOADS)
                .where(VmRow.host_id == row.id, VmRow.state == "running")
            )
            vms = list(s.scalars(query))
            out = [(v.session.name, v.name, self._desired(s, v, row.id)) for v in vms]
            sessions = {v.session.name: v.session_id for v in vms}
            overlays = {name: overlays_of(s, row.id, sid) for name, sid in sessions.items()}
            return revision, row.epoch, out, {k: v for k, v in overlays.items() if v}

    def host_changes(self, name: str, after: int, wait: float = 0.0) -> tuple[int, list[Change]]:
        """The host's changes after ``after`` with each VM's desired state now (and, for a
        change of a session's overlays, ``vm`` :data:`SESSION_OVERLAYS`, the overlays
        the host needs for it now), oldest first; when there are none, waits up to ``wait`` seconds (at most
        :data:`~vnic.manager.changelog.WAIT_MAX`) for one. Relist when ``after`` is
        behind the log. Returns the revision to ask after next time."""
        if not isinstance(after, int) or after < 0:
            raise InvalidInput.one("after", after, "a revision: an integer of at least 0")
        end = time.monotonic() + max(0.0, min(wait, changelog.WAIT_MAX))
        while True:
            with self.db.reading() as s:
                row = self._host_row(s, name)
                key = changelog.host_key(row.id)
                found = changelog.changes_after(s, row.id, after)
                if found:
                    out: list[Change] = []
                    # A session's overlays as of this read, once however many of its
                    # changes the answer carries (a launch burst writes one each).
                    overlays: dict[str, list[OverlayDoc]] = {}
                    for c in found:
                        if c.vm == SESSION_OVERLAYS:
                            if c.session not in overlays:
                                srow = s.scalar(
                                    select(SessionRow).where(SessionRow.name == c.session)
                                )
                                overlays[c.session] = (
                                    overlays_of(s, row.id, srow.id) if srow is not None else []
                                )
                            out.append((c.revision, c.session, c.vm, None, overlays[c.session]))
                            continue
                        vm = self._vm_by_name(s, c.session, c.vm)
                        desired = self._desired(s, vm, row.id) if vm is not None else None
                        out.append((c.revision, c.session, c.vm, desired, None))
                    return found[-1].revision, out
            left = end - time.monotonic()
            if left <= 0:
                return after, []
            self.waiters.wait(left, key)

    def report_status(self, name: str, epoch: int, reports: Iterable[StatusReport]) -> int:
        """Store the agent's reports (Stale for a stale epoch); wakes launch waits."""
        with self.db.transaction() as s:
            stored = changelog.record_status(
                s, self._host_row(s, name), epoch, reports, self.clock()
            )
        if stored:
            self.waiters.wake([changelog.STATUS])
        return stored

    def vm_status(self, session: str, vm: str) -> VmStatus | None:
        with self.db.reading() as s:
            return self._vm_status(s, self._vm_row(s, session, vm))

    def wait_status(self, session: str, vm: str, revision: int, timeout: float) -> VmStatus | None:
        """The VM's report once it covers ``revision``; None after ``timeout`` seconds."""
        return self.wait_statuses([(session, vm, revision)], timeout)[(session, vm)]

    def wait_statuses(
        self, items: Sequence[tuple[str, str, int]], timeout: float
    ) -> dict[tuple[str, str], VmStatus | None]:
        """:meth:`wait_status` of each ``(session, vm, revision)``, ``timeout`` seconds in
        all; None for those not reported in time."""
        end = time.monotonic() + timeout
        out: dict[tuple[str, str], VmStatus | None] = {(s, v): None for s, v, _ in items}
        pending = list(items)
        while pending:
            with self.db.reading() as s:
                found = self._statuses(s, [(session, vm) for session, vm, _ in pending])
            for item in list(pending):
                key = (item[0], item[1])
                if key not in found:
                    pending.remove(item)  # removed meanwhile: nothing to wait for
                    continue
                status = found[key]
                if status is not None and status.revision >= item[2]:
                    out[key] = status
                    pending.remove(item)
            left = end - time.monotonic()
            if not pending or left <= 0:
                return out
            self.waiters.wait(left, changelog.STATUS)
        return out

    @staticmethod
    def _statuses(
        s: Session, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], VmStatus | None]:
        """:meth:`_vm_status` of each VM of ``keys`` that exists, in one query (a wait
        polls it every few hundred ms: loading each VM with what resolves it cost
        about 20 ms a VM)."""
        if not keys:
            return {}
        query = (
            select(SessionRow.name, VmRow.name, VmRow.host_id, HostRow.name, VmStatusRow)
            .join(SessionRow, SessionRow.id == VmRow.session_id)
            .outerjoin(HostRow, HostRow.id == VmRow.host_id)
            .outerjoin(VmStatusRow, VmStatusRow.vm_id == VmRow.id)
            .where(SessionRow.name.in_({k[0] for k in keys}), VmRow.name.in_({k[1] for k in keys}))
        )
        wanted = set(keys)
        out: dict[tuple[str, str], VmStatus | None] = {}
        for session, vm, host_id, host, row in s.execute(query).all():
            if (session, vm) not in wanted:
                continue
            placed = row is not None and host is not None and row.host_id == host_id
            out[(session, vm)] = (
                VmStatus(host, row.revision, row.epoch, row.error, list(row.changes))
                if placed
                else None
            )
        return out

    # ---------------------------------------------------------------- for the use cases

    def _fleet_active(self, s: Session) -> bool:
        """Whether VMs go to hosts (some host was added) rather than the own agent."""
        return bool(s.scalar(select(func.count()).select_from(HostRow)))

    def _place(self, s: Session, vm: VmRow, host: str | None) -> HostRow:
        """Choose the host of ``vm`` (``host`` if given) among every host."""
        now = self.clock()
        rows = list(s.scalars(select(HostRow).order_by(HostRow.name)))
        used = self._used(s)
        in_session = dict(
            s.execute(
                select(VmRow.host_id, func.count())
                .where(VmRow.session_id == vm.session_id, VmRow.host_id.is_not(None))
                .where(VmRow.state == "running")
                .group_by(VmRow.host_id)
            ).all()
        )
        candidates = [
            Candidate(
                r.name,
                _ready(r, now),
                r.cordoned,
                r.vnics,
                used.get(r.id, 0),
                dict(r.labels),
                int(in_session.get(r.id, 0)),
            )
            for r in rows
        ]
        chosen = choose_host(candidates, len(vm.nics), self._constraint(vm.session), host=host)
        return next(r for r in rows if r.name == chosen)

    @staticmethod
    def _constraint(session: SessionRow) -> Constraint:
        return parse_constraint(session.placement)

    def _append(self, s: Session, vm: VmRow, *, placement: set[int] | None = None) -> int:
        """A change of ``vm`` on its host, in the caller's transaction; its revision (what
        the VM's report answers). ``placement``: the hosts the VM ran on before this
        change, when its placement changes: then every host of the session, and those,
        also get a change of the session's overlays, after the VM's."""
        assert vm.host_id is not None
        revision = changelog.append(s, vm.host_id, vm.session.name, vm.name, self.clock())
        if placement is not None:
            self._append_overlays(s, vm.session_id, vm.session.name, placement | {vm.host_id})
        return revision

    def _append_overlays(self, s: Session, session_id: int, session: str, also: set[int]) -> None:
        """A change of the session's overlays for every host that runs VMs of it, and the
        hosts ``also`` (those that ran some before this transaction's changes). None
        while all of them are one host: a session on one host has no overlay, before or
        after."""
        s.flush()
        touched = hosts_of(s, session_id) | also
        if len(touched) < 2:
            return
        for host_id in sorted(touched):
            changelog.append(s, host_id, session, SESSION_OVERLAYS, self.clock())

    def _desired(self, s: Session, vm: VmRow, host_id: int) -> Desired:
        if vm.state != "running" or vm.host_id != host_id:
            return None
        kind = str((vm.applied or {}).get("driver", "netns"))
        return kind, self._launch_request(vm, self._resolve_nics(s, vm))

    def _vm_by_name(self, s: Session, session: str, name: str) -> VmRow | None:
        query = (
            select(VmRow)
            .options(*VM_RESOLVE_LOADS)
            .join(VmRow.session)
            .where(SessionRow.name == session, VmRow.name == name)
        )
        return s.scalar(query)

    @staticmethod
    def _vm_status(s: Session, vm: VmRow) -> VmStatus | None:
        row = s.get(VmStatusRow, vm.id)
        if row is None or vm.host is None or row.host_id != vm.host_id:
            return None
        return VmStatus(vm.host.name, row.revision, row.epoch, row.error, list(row.changes))

    def _host_row(self, s: Session, name: str) -> HostRow:
        row = s.scalar(select(HostRow).where(HostRow.name == name))
        if row is None:
            known = s.scalars(select(HostRow.name).order_by(HostRow.name)).all()
            raise NotFound("host", name, known)
        return row

    def _used(self, s: Session) -> dict[int, int]:
        """vNICs of running VMs per host id."""
        query = (
            select(VmRow.host_id, func.count(NicRow.id))
            .join(NicRow, NicRow.vm_id == VmRow.id)
            .where(VmRow.host_id.is_not(None), VmRow.state == "running")
            .group_by(VmRow.host_id)
        )
        return {int(h or 0): int(n) for h, n in s.execute(query).all()}

    def _host_info(self, s: Session, row: HostRow, used: dict[int, int] | None = None) -> HostInfo:
        """``row`` as a :class:`HostInfo`; ``used``: :meth:`_used`, when the caller has it
        (a list of hosts reads it once, not once per host)."""
        now = self.clock()
        state = "new" if row.registered_at is None else ("ready" if _ready(row, now) else "unknown")
        vms = int(
            s.scalar(
                select(func.count())
                .select_from(VmRow)
                .where(VmRow.host_id == row.id, VmRow.state == "running")
            )
            or 0
        )
        return HostInfo(
            row.name,
            state,
            row.cordoned,
            dict(row.labels),
            row.underlay,
            row.vnics,
            row.cpus,
            row.epoch,
            aware(row.lease_until) if row.lease_until else None,
            row.metrics_url,
            vms,
            (self._used(s) if used is None else used).get(row.id, 0),
        )


def _ready(row: HostRow, now: datetime) -> bool:
    until = aware(row.lease_until)
    return until is not None and until >= now


def _check_count(value: Any, path: str, most: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise InvalidInput.one(path, value, f"an integer from 1 to {most}")


def _parse_address(value: Any) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except (TypeError, ValueError):
        raise InvalidInput.one(
            "underlay", value, "the host's underlay IPv4 or IPv6 address"
        ) from None


def _target_of(url: str) -> tuple[str, str]:
    """``http://10.0.0.1:8472/metrics`` -> (``10.0.0.1:8472``, ``/metrics``)."""
    rest = url.split("://", 1)[1]
    target, _, path = rest.partition("/")
    return target, "/" + path
