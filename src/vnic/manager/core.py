"""What every part of the service shares: rows by name, resolution, re-checks.

:class:`ServiceCore` holds the database and the clock; each aggregate's use cases
are a subclass of it (:mod:`~vnic.manager.profiles`, :mod:`~vnic.manager.sessions`,
:mod:`~vnic.manager.vms`, :mod:`~vnic.manager.launch`, :mod:`~vnic.manager.reapply`)
and :class:`vnic.manager.service.Service` composes them. Here: finding profile,
session and VM rows (a missing one is :class:`~vnic.errors.NotFound`), resolving a
VM's effective profile, re-checking VMs after a change of what they resolve from,
a VM's launch request, and the agent's host lock around a use case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, FieldError, InvalidInput, NotFound, Unsupported
from vnic.manager.results import SessionInfo, VmInfo
from vnic.manager.rows import VM_RESOLVE_LOADS, aware, unexpired
from vnic.model.launch import Capabilities, LaunchRequest, check_supported
from vnic.model.profile import document_to_values, parse_name, parse_patch
from vnic.model.resolve import Adjustment, Effective, ProfileRef, resolve
from vnic.model.session import AssignmentRule, Policy, VmFacts
from vnic.model.units import MacAddress
from vnic.plan.names import vm_addresses
from vnic.store.db import Database
from vnic.store.models import ProfileRevisionRow, ProfileRow, SessionRow, VmRow


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
    ) -> Effective:
        """The VM's effective profile now (or ``at``: which adjustments count).

        ``cache``: shared by the calls of one transaction that resolve many VMs, so
        each session's policy and each set of profiles is loaded once.
        """
        session = vm.session
        cache = {} if cache is None else cache
        policy = cache.get(("policy", session.id))
        if policy is None:
            policy = cache[("policy", session.id)] = self._policy(session)
        now = at or self.clock()
        active = [a for a in vm.adjustments if unexpired(a, now)]
        wanted = {
            *policy.profile_names(),
            *([vm.override_profile.name] if vm.override_profile else []),
            *(a.profile for a in active if a.profile),
        }
        key = ("refs", frozenset(wanted))
        refs = cache.get(key)
        if refs is None:
            refs = cache[key] = self._refs(s, wanted)
        patch = parse_patch(vm.override_patch) if vm.override_patch else None
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
        return resolve(
            vm=VmFacts(vm.name, vm.role, dict(vm.labels), tuple(vm.needs)),
            policy=policy,
            profiles=refs,
            vm_profile=vm.override_profile.name if vm.override_profile else None,
            vm_patch=patch,
            adjustments=adjustments,
            now=now,
        )

    @staticmethod
    def _vm_info(vm: VmRow) -> VmInfo:
        addresses = vm_addresses(vm.session.network_id, vm.host_index) if vm.host_index else None
        return VmInfo(
            session=vm.session.name,
            name=vm.name,
            role=vm.role,
            labels=dict(vm.labels),
            needs=list(vm.needs),
            override_profile=vm.override_profile.name if vm.override_profile else None,
            override_patch=vm.override_patch,
            mac=str(MacAddress(vm.mac.mac)) if vm.mac else None,
            state=vm.state,
            ipv4=str(addresses[0].ip) if addresses else None,
            ipv6=str(addresses[1].ip) if addresses else None,
            driver=(vm.applied or {}).get("driver") if vm.state == "running" else None,
        )

    def _running(
        self,
        s: Session,
        session: str | None = None,
        vm: str | None = None,
        *,
        running_only: bool = True,
    ) -> Iterator[tuple[VmRow, Effective]]:
        """Running VMs (every VM without ``running_only``; of ``session``, and ``vm``) with
        their effective profiles, resolved with each policy and profile set loaded once."""
        query = select(VmRow).options(*VM_RESOLVE_LOADS)
        if running_only:
            query = query.where(VmRow.state == "running")
        if session is not None:
            query = query.where(VmRow.session_id == self._session_row(s, session).id)
        if vm is not None:
            query = query.where(VmRow.name == vm)
        cache: dict[Any, Any] = {}
        for row in s.scalars(query):
            yield row, self._resolve(s, row, cache=cache)

    def _recheck(self, s: Session, vms: Iterable[VmRow], driver: AgentPort | None = None) -> None:
        """Re-resolve ``vms``; refuse if one gets an invalid profile or loses its MAC's range,
        or (with ``driver``) if one runs on a driver that cannot honour its new profile."""
        errors: list[FieldError] = []
        caps = _capabilities(driver) if driver is not None else {}
        cache: dict[Any, Any] = {}
        for vm in vms:
            label = f"{vm.session.name}/{vm.name}"
            try:
                eff = self._resolve(s, vm, cache=cache)
            except InvalidInput as exc:
                errors.extend(
                    FieldError(e.path, f"{e.value} for VM {label}", e.expected) for e in exc.errors
                )
                continue
            kind = (vm.applied or {}).get("driver")
            if vm.state == "running" and kind in caps:
                try:
                    check_supported(caps[kind], eff.values)
                except Unsupported as exc:
                    errors.append(FieldError("profile", f"VM {label}", str(exc)))
            if vm.mac is not None and MacAddress(vm.mac.mac) not in eff.profile.mac_range:
                errors.append(
                    FieldError(
                        "mac_range",
                        f"{eff.profile.mac_range} for VM {label}",
                        f"a range that still holds its MAC {MacAddress(vm.mac.mac)}",
                    )
                )
        if errors:
            raise InvalidInput(errors)

    def _launch_request(self, vm: VmRow, eff: Effective) -> LaunchRequest:
        if vm.mac is None or vm.host_index is None:  # pragma: no cover - set by add_vm
            raise Conflict(f"VM {vm.session.name}/{vm.name} has no MAC or address")
        ipv4, ipv6 = vm_addresses(vm.session.network_id, vm.host_index)
        return LaunchRequest.single(
            session=vm.session.name,
            network_id=vm.session.network_id,
            vm=vm.name,
            mac=MacAddress(vm.mac.mac),
            ipv4=ipv4,
            ipv6=ipv6,
            profile=eff.profile,
            values=dict(eff.values),
            revisions=dict(eff.revisions),
        )


def _capabilities(driver: AgentPort) -> dict[str, Capabilities]:
    """What each driver kind behind ``driver`` (an agent has several) honours."""
    return {c.kind: c for c in driver.all_capabilities()}
