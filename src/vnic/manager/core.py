"""What every part of the service shares: rows by name, resolution, re-checks.

:class:`ServiceCore` holds the database and the clock; each aggregate's use cases
are a subclass of it (:mod:`~vnic.manager.profiles`, :mod:`~vnic.manager.sessions`,
:mod:`~vnic.manager.vms`, :mod:`~vnic.manager.launch`, :mod:`~vnic.manager.reapply`)
and :class:`vnic.manager.service.Service` composes them. Here: finding profile,
session and VM rows (a missing one is :class:`~vnic.errors.NotFound`), resolving a
VM's effective profile, re-checking VMs after a change of what they resolve from,
a VM's launch request, and the agent's host lock around a use case.

A re-check is also where a write of desired state tells the hosts: each re-checked VM
that runs on a host and whose effective profile now differs from what it runs gets a
change-log row in the write's own transaction (:meth:`ServiceCore._log_desired`), so
the change reaches its agent even if the manager dies right after the commit.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, FieldError, InvalidInput, NotFound, Unsupported
from vnic.manager import changelog
from vnic.manager.results import Explanation, NicInfo, SessionInfo, VmInfo
from vnic.manager.rows import VM_RESOLVE_LOADS, aware, field_changes, unexpired
from vnic.model.launch import (
    PRIMARY_NIC,
    Capabilities,
    LaunchRequest,
    NicRequest,
    check_supported,
)
from vnic.model.network import nic_addresses
from vnic.model.profile import document_to_values, parse_name, parse_patch, values_to_document
from vnic.model.resolve import Adjustment, Effective, ProfileRef, resolve
from vnic.model.session import AssignmentRule, Policy, VmFacts
from vnic.model.units import MacAddress
from vnic.store.db import Database
from vnic.store.models import (
    NetworkRow,
    NicRow,
    ProfileRevisionRow,
    ProfileRow,
    SessionRow,
    VmRow,
)


def _now() -> datetime:
    return datetime.now(UTC)


class ServiceCore:
    """The database and the clock, and what every use case needs of them.

    ``clock`` (default: now, UTC) is injectable; it dates rows and decides which
    adjustments have expired.
    """

    def __init__(self, db: Database, clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.clock = clock

    def _profile_row(self, s: Session, name: str) -> ProfileRow:
        row = s.scalar(select(ProfileRow).where(ProfileRow.name == name))
        if row is None:
            raise NotFound("profile", name, s.scalars(select(ProfileRow.name)).all())
        return row

    def _revision_row(self, s: Session, row: ProfileRow, revision: int) -> ProfileRevisionRow:
        rev = s.scalar(
            select(ProfileRevisionRow).where(
                ProfileRevisionRow.profile_id == row.id, ProfileRevisionRow.revision == revision
            )
        )
        if rev is None:
            raise NotFound(
                f"revision of profile {row.name!r}",
                str(revision),
                [str(r.revision) for r in row.revisions],
            )
        return rev

    def _current_document(self, s: Session, row: ProfileRow) -> Mapping[str, Any]:
        return self._revision_row(s, row, row.current_revision).document

    def _refs(self, s: Session, names: set[str]) -> dict[str, ProfileRef]:
        """Current revisions of the named profiles, in one query."""
        if not names:
            return {}
        rows = s.execute(
            select(ProfileRow.name, ProfileRow.current_revision, ProfileRevisionRow.document)
            .join(ProfileRevisionRow, ProfileRevisionRow.profile_id == ProfileRow.id)
            .where(
                ProfileRow.name.in_(names),
                ProfileRevisionRow.revision == ProfileRow.current_revision,
            )
        )
        refs: dict[str, ProfileRef] = {}
        for name, revision, document in rows:
            errors: list[FieldError] = []
            values = document_to_values(document, errors)
            if errors:  # pragma: no cover - documents are validated before they are stored
                raise InvalidInput(errors)
            refs[name] = ProfileRef(name, revision, values)
        return refs

    def _existing_profile(self, s: Session, name: str | None, path: str) -> ProfileRow | None:
        """The named profile, or None for no name; a missing one is an input error at ``path``."""
        if name is None:
            return None
        try:
            return self._profile_row(s, parse_name(name, path))
        except NotFound as exc:
            raise InvalidInput.one(path, name, f"an existing profile ({exc})") from None

    def _session_row(self, s: Session, name: str) -> SessionRow:
        row = s.scalar(select(SessionRow).where(SessionRow.name == name))
        if row is None:
            raise NotFound("session", name, s.scalars(select(SessionRow.name)).all())
        return row

    @staticmethod
    def _policy(row: SessionRow) -> Policy:
        rules = tuple(
            AssignmentRule.from_document({"profile": r.profile.name, **r.match}) for r in row.rules
        )
        return Policy(
            default_profile=row.default_profile.name if row.default_profile else None,
            rules=rules,
            overrides_allowed=row.overrides_allowed,
        )

    def _session_info(self, row: SessionRow) -> SessionInfo:
        return SessionInfo(
            name=row.name,
            network_id=row.network_id,
            policy=self._policy(row),
            vms=[v.name for v in row.vms],
            created_at=row.created_at,
            owner=row.owner,
            networks=[n.name for n in row.networks],
            placement=row.placement,
        )

    def _vm_row(self, s: Session, session: str, name: str) -> VmRow:
        srow = self._session_row(s, session)
        vm = s.scalar(select(VmRow).where(VmRow.session_id == srow.id, VmRow.name == name))
        if vm is None:
            raise NotFound(f"VM in session {session!r}", name, [v.name for v in srow.vms])
        return vm

    def _resolve(
        self,
        s: Session,
        vm: VmRow,
        at: datetime | None = None,
        cache: dict[Any, Any] | None = None,
        nic: NicRow | None = None,
    ) -> Effective:
        """The effective profile of the VM's vNIC ``nic`` (None: eth0) now (or ``at``:
        which adjustments count).

        ``cache``: shared by the calls of one transaction that resolve many vNICs, so
        each session's policy and each set of profiles is loaded once.
        """
        nic = nic if nic is not None else primary_nic(vm)
        session = vm.session
        cache = {} if cache is None else cache
        policy = cache.get(("policy", session.id))
        if policy is None:
            policy = cache[("policy", session.id)] = self._policy(session)
        now = at or self.clock()
        active = [a for a in vm.adjustments if a.nic == nic.name and unexpired(a, now)]
        network = nic.network
        network_profile = network.default_profile.name if network.default_profile else None
        wanted = {
            *policy.profile_names(),
            *([network_profile] if network_profile else []),
            *([nic.override_profile.name] if nic.override_profile else []),
            *(a.profile for a in active if a.profile),
        }
        key = ("refs", frozenset(wanted))
        refs = cache.get(key)
        if refs is None:
            refs = cache[key] = self._refs(s, wanted)
        # vNICs that resolve from the same layers (a VM's vNICs on one network, without
        # overrides of their own) get the same answer: resolved once per transaction.
        # Not with adjustments: they depend on the time.
        memo = None
        if not active:
            memo = (
                "effective",
                session.id,
                vm.name,
                vm.role,
                tuple(sorted(vm.labels.items())),
                tuple(vm.needs),
                network.name,
                network_profile,
                nic.override_profile.name if nic.override_profile else None,
                json.dumps(nic.override_patch, sort_keys=True) if nic.override_patch else None,
            )
            found = cache.get(memo)
            if found is not None:
                return cast(Effective, found)
        patch = parse_patch(nic.override_patch) if nic.override_patch else None
        adjustments = [
            Adjustment(
                parse_patch(a.patch),
                a.reason,
                aware(a.expires_at),
                refs.get(a.profile) if a.profile else None,  # a deleted profile: values only
                a.source,
            )
            for a in active
        ]
        effective = resolve(
            vm=VmFacts(vm.name, vm.role, dict(vm.labels), tuple(vm.needs), network.name),
            policy=policy,
            profiles=refs,
            vm_profile=nic.override_profile.name if nic.override_profile else None,
            vm_patch=patch,
            adjustments=adjustments,
            now=now,
            network_profile=network_profile,
        )
        if memo is not None:
            cache[memo] = effective
        return effective

    def _resolve_nics(
        self,
        s: Session,
        vm: VmRow,
        at: datetime | None = None,
        cache: dict[Any, Any] | None = None,
    ) -> dict[str, Effective]:
        """The effective profile of every vNIC of the VM, by name, eth0 first."""
        cache = {} if cache is None else cache
        return {n.name: self._resolve(s, vm, at, cache, n) for n in vm.nics}

    @staticmethod
    def _nic_row(vm: VmRow, name: str) -> NicRow:
        for nic in vm.nics:
            if nic.name == name:
                return nic
        raise NotFound(f"vNIC of VM {vm.session.name}/{vm.name}", name, [n.name for n in vm.nics])

    @staticmethod
    def _nic_info(nic: NicRow) -> NicInfo:
        net = nic.network
        addresses = nic_row_addresses(net, nic.host_index) if nic.host_index else None
        return NicInfo(
            name=nic.name,
            network=net.name,
            network_id=net.network_id,
            mac=str(MacAddress(nic.mac.mac)) if nic.mac else None,
            ipv4=str(addresses[0].ip) if addresses else None,
            ipv6=str(addresses[1].ip) if addresses else None,
            override_profile=nic.override_profile.name if nic.override_profile else None,
            override_patch=nic.override_patch,
        )

    @classmethod
    def _vm_info(cls, vm: VmRow) -> VmInfo:
        nics = [cls._nic_info(n) for n in vm.nics]
        first = nics[0] if nics else None
        return VmInfo(
            session=vm.session.name,
            name=vm.name,
            role=vm.role,
            labels=dict(vm.labels),
            needs=list(vm.needs),
            override_profile=first.override_profile if first else None,
            override_patch=first.override_patch if first else None,
            mac=first.mac if first else None,
            state=vm.state,
            ipv4=first.ipv4 if first else None,
            ipv6=first.ipv6 if first else None,
            driver=(vm.applied or {}).get("driver") if vm.state == "running" else None,
            nics=nics,
            host=vm.host.name if vm.host is not None else None,
        )

    def _explanation(
        self, s: Session, vm: VmRow, cache: dict[Any, Any] | None = None
    ) -> Explanation:
        effs = self._resolve_nics(s, vm, cache=cache)
        return Explanation(self._vm_info(vm), effs[primary_nic(vm).name], effs)

    def _running(
        self,
        s: Session,
        session: str | None = None,
        vm: str | None = None,
        *,
        running_only: bool = True,
        hosted: bool | None = None,
    ) -> Iterator[tuple[VmRow, dict[str, Effective]]]:
        """Running VMs (every VM without ``running_only``; of ``session``, and ``vm``;
        ``hosted``: only those placed on hosts, or only the own agent's) with the
        effective profiles of their vNICs, resolved with each policy and profile set
        loaded once."""
        query = select(VmRow).options(*VM_RESOLVE_LOADS)
        if running_only:
            query = query.where(VmRow.state == "running")
        if hosted is not None:
            placed = VmRow.host_id.is_not(None)
            query = query.where(placed if hosted else VmRow.host_id.is_(None))
        if session is not None:
            query = query.where(VmRow.session_id == self._session_row(s, session).id)
        if vm is not None:
            query = query.where(VmRow.name == vm)
        cache: dict[Any, Any] = {}
        for row in s.scalars(query):
            yield row, self._resolve_nics(s, row, cache=cache)

    def _recheck(self, s: Session, vms: Iterable[VmRow], driver: AgentPort | None = None) -> None:
        """Re-resolve every vNIC of ``vms``; refuse if one gets an invalid profile or loses
        its MAC's range, or (with ``driver``) if its VM runs on a driver that cannot
        honour its new profile."""
        errors: list[FieldError] = []
        caps = _capabilities(driver) if driver is not None else {}
        cache: dict[Any, Any] = {}
        resolved: list[tuple[VmRow, dict[str, Effective]]] = []
        for vm in vms:
            effs: dict[str, Effective] = {}
            for nic in vm.nics:
                label = nic_label(vm, nic.name)
                try:
                    eff = self._resolve(s, vm, cache=cache, nic=nic)
                except InvalidInput as exc:
                    errors.extend(
                        FieldError(e.path, f"{e.value} for VM {label}", e.expected)
                        for e in exc.errors
                    )
                    continue
                effs[nic.name] = eff
                kind = (vm.applied or {}).get("driver")
                if vm.state == "running" and kind in caps:
                    try:
                        check_supported(caps[kind], eff.values)
                    except Unsupported as exc:
                        errors.append(FieldError("profile", f"VM {label}", str(exc)))
                if nic.mac is not None and MacAddress(nic.mac.mac) not in eff.profile.mac_range:
                    errors.append(
                        FieldError(
                            "mac_range",
                            f"{eff.profile.mac_range} for VM {label}",
                            f"a range that still holds its MAC {MacAddress(nic.mac.mac)}",
                        )
                    )
            resolved.append((vm, effs))
        if errors:
            raise InvalidInput(errors)
        for vm, effs in resolved:
            self._log_desired(s, vm, effs)

    def _log_desired(self, s: Session, vm: VmRow, effs: Mapping[str, Effective]) -> int | None:
        """In the caller's write transaction: a change of ``vm`` for its host when it runs
        on one and ``effs`` (its vNICs' effective profiles after the write) differ from
        what it runs; the revision, or None when there is nothing to tell."""
        if vm.state != "running" or vm.host_id is None:
            return None
        if not any(nic_differs(vm.applied, name, eff) for name, eff in effs.items()):
            return None
        return changelog.append(s, vm.host_id, vm.session.name, vm.name, self.clock())

    def _log_desired_of(self, s: Session, vm: VmRow) -> int | None:
        """:meth:`_log_desired` after a write that cannot make ``vm`` invalid (an
        adjustment removed); one whose vNIC no longer resolves is left to the next
        live change's re-check, which names the error."""
        try:
            effs = self._resolve_nics(s, vm)
        except InvalidInput:
            return None
        return self._log_desired(s, vm, effs)

    def _launch_request(self, vm: VmRow, effs: Mapping[str, Effective]) -> LaunchRequest:
        """The VM's launch request: every vNIC with its network, MAC, addresses and
        effective profile (``effs``, by vNIC name), eth0 first."""
        nics = []
        for nic in vm.nics:
            if nic.mac is None or nic.host_index is None:  # pragma: no cover - set by add_vm
                raise Conflict(f"vNIC {nic_label(vm, nic.name)} has no MAC or address")
            net = nic.network
            ipv4, ipv6 = nic_row_addresses(net, nic.host_index)
            eff = effs[nic.name]
            nics.append(
                NicRequest(
                    name=nic.name,
                    network=net.name,
                    network_id=net.network_id,
                    mac=MacAddress(nic.mac.mac),
                    ipv4=ipv4,
                    ipv6=ipv6,
                    profile=eff.profile,
                    values=dict(eff.values),
                    revisions=dict(eff.revisions),
                )
            )
        return LaunchRequest(vm.session.name, vm.name, tuple(nics))


def nic_row_addresses(
    net: NetworkRow, host_index: int
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """A stored vNIC's interface addresses: its host index in its network's subnets."""
    return nic_addresses(
        ipaddress.IPv4Network(net.ipv4), ipaddress.IPv6Network(net.ipv6), host_index
    )


def primary_nic(vm: VmRow) -> NicRow:
    """The VM's first vNIC (eth0); every VM has one."""
    if not vm.nics:  # pragma: no cover - add_vm gives every VM its eth0
        raise Conflict(f"VM {vm.session.name}/{vm.name} has no vNIC")
    return vm.nics[0]


def nic_label(vm: VmRow, nic: str) -> str:
    """``session/vm`` for eth0 (as before VMs had several vNICs), ``session/vm/ethN``
    for the others."""
    base = f"{vm.session.name}/{vm.name}"
    return base if nic == PRIMARY_NIC else f"{base}/{nic}"


def applied_state(kind: str, effs: Mapping[str, Effective]) -> dict[str, Any]:
    """What a VM runs, for ``VmRow.applied``: eth0's revisions and values at the top
    (as before VMs had several vNICs) and every vNIC's under ``nics``."""
    first = next(iter(effs.values()))
    return {
        "driver": kind,
        "revisions": dict(first.revisions),
        "values": values_to_document(first.values),
        "nics": {
            name: {"revisions": dict(e.revisions), "values": values_to_document(e.values)}
            for name, e in effs.items()
        },
    }


def nic_changes(
    applied: Mapping[str, Any] | None, nic: str, eff: Effective
) -> dict[str, tuple[Any, Any]] | None:
    """The fields of vNIC ``nic`` whose value ``eff`` changes against what ``applied``
    says it runs, ``path -> (old, new)``; None when nothing differs, not even a
    profile's revision (an empty dict: only revisions differ)."""
    runs = applied_nic(applied, nic)
    fields = field_changes(runs.get("values") or {}, values_to_document(eff.values))
    if fields or dict(runs.get("revisions") or {}) != dict(eff.revisions):
        return fields
    return None


def nic_differs(applied: Mapping[str, Any] | None, nic: str, eff: Effective) -> bool:
    """Whether ``eff`` differs from what ``applied`` says vNIC ``nic`` runs
    (:func:`nic_changes` is not None): a moved revision first, the common case (a
    profile's new revision), told without comparing every field."""
    runs = applied_nic(applied, nic)
    if dict(runs.get("revisions") or {}) != dict(eff.revisions):
        return True
    return bool(field_changes(runs.get("values") or {}, values_to_document(eff.values)))


def applied_nic(applied: Mapping[str, Any] | None, nic: str) -> Mapping[str, Any]:
    """What ``applied`` says vNIC ``nic`` runs (eth0 of a VM launched by the previous
    release: the top-level revisions and values)."""
    applied = applied or {}
    nics = applied.get("nics")
    if isinstance(nics, Mapping) and isinstance(nics.get(nic), Mapping):
        found: Mapping[str, Any] = nics[nic]
        return found
    if nic == PRIMARY_NIC:
        return {"revisions": applied.get("revisions") or {}, "values": applied.get("values") or {}}
    return {}


def _capabilities(driver: AgentPort) -> dict[str, Capabilities]:
    """What each driver kind behind ``driver`` (an agent has several) honours."""
    return {c.kind: c for c in driver.all_capabilities()}
