"""The service layer: every operation on profiles, sessions and VMs.

The CLI (embedded), the REST API and the UI all call this class, so input is
validated once, here and in :mod:`vnic.model`. Every public method is one
transaction: it either completes or changes nothing. Results are plain
dataclasses, never ORM rows.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from vnic.agent.port import AgentPort
from vnic.errors import (
    Conflict,
    DataplaneError,
    Exhausted,
    FieldError,
    InUse,
    InvalidInput,
    NotFound,
    Unsupported,
    VnicError,
)
from vnic.model.documents import merge_patch
from vnic.model.launch import Capabilities, LaunchRequest, check_supported
from vnic.model.limits import DB_INT_MAX
from vnic.model.profile import (
    DEFAULT_MAC_RANGE,
    FIELDS,
    OFF,
    ProfileSpec,
    document_to_values,
    parse_labels,
    parse_name,
    parse_patch,
    parse_profile_document,
    values_to_document,
)
from vnic.model.resolve import Adjustment, Effective, ProfileRef, resolve
from vnic.model.session import (
    NETWORK_ID_MAX,
    NETWORK_ID_MIN,
    AssignmentRule,
    Policy,
    VmFacts,
    parse_needs,
    parse_network_id,
    parse_role,
    parse_session_name,
    parse_vm_name,
)
from vnic.model.units import MacAddress, MacRange
from vnic.plan.names import vm_addresses
from vnic.store.db import Database
from vnic.store.models import (
    AdjustmentRow,
    AssignmentRuleRow,
    AuditRow,
    MacAllocationRow,
    ProfileRevisionRow,
    ProfileRow,
    SessionRow,
    VmRow,
)

# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    description: str
    labels: Mapping[str, str]
    revision: int
    document: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    users: Sequence[str] = ()


@dataclass(frozen=True)
class RevisionInfo:
    revision: int
    created_at: datetime
    document: Mapping[str, Any]


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_profiles`` did to one profile: created, updated or unchanged."""

    name: str
    action: str
    revision: int


@dataclass(frozen=True)
class SessionInfo:
    name: str
    network_id: int
    policy: Policy
    vms: Sequence[str]
    created_at: datetime
    owner: str | None = None


@dataclass(frozen=True)
class VmInfo:
    session: str
    name: str
    role: str | None
    labels: Mapping[str, str]
    needs: Sequence[str]
    override_profile: str | None
    override_patch: Mapping[str, Any] | None
    mac: str | None
    state: str
    ipv4: str | None = None
    ipv6: str | None = None
    #: The driver a running VM was launched with (netns, qemu); None while defined.
    driver: str | None = None


@dataclass(frozen=True)
class Explanation:
    vm: VmInfo
    effective: Effective


@dataclass(frozen=True)
class VmChange:
    """What a live change did to one running VM.

    ``fields`` maps each changed field path to ``(old, new)`` in document form
    (None = unset); ``sources`` names the layer each new value came from;
    ``kernel`` has one line per kernel object the driver changed; ``error`` is
    set when the driver refused or failed (the VM then runs what it ran before).
    """

    session: str
    vm: str
    fields: Mapping[str, tuple[Any, Any]]
    sources: Mapping[str, str] = field(default_factory=dict)
    kernel: Sequence[str] = ()
    error: str | None = None
    revisions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class VmRequest:
    """A request to add a VM: facts for the rules plus an optional override."""

    session: str
    name: str
    role: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    needs: Sequence[str] = ()
    profile: str | None = None
    patch: Mapping[str, Any] | None = None


# ----------------------------------------------------------------------------- service


def _now() -> datetime:
    return datetime.now(UTC)


class Service:
    """Profiles, sessions and VMs over one :class:`Database`. ``clock`` is injectable."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.clock = clock

    # ------------------------------------------------------------------ profiles

    def apply_profiles(
        self,
        specs: Sequence[ProfileSpec],
        *,
        create_only: bool = False,
        driver: AgentPort | None = None,
    ) -> list[ApplyResult]:
        """Create or update profiles; a profile whose document is unchanged keeps its revision.
        With ``create_only``, a name that exists already is a conflict.

        All or nothing: a bad MAC range, or a change that would leave any VM
        that uses a profile with an invalid effective profile, refuses the lot.
        """
        many = len(specs) > 1

        def where(i: int, path: str) -> str:
            return f"[{i}].{path}" if many else path

        seen: dict[str, int] = {}
        errors: list[FieldError] = []
        for i, spec in enumerate(specs):
            if spec.name in seen:
                errors.append(
                    FieldError(
                        where(i, "name"),
                        repr(spec.name),
                        f"a name not already used by document [{seen[spec.name]}]",
                    )
                )
            seen[spec.name] = i
        if errors:
            raise InvalidInput(errors)
        results: list[ApplyResult] = []
        with self.db.transaction() as s:
            self.db.allocation_lock(s)
            changed: list[str] = []
            for spec in specs:
                result = self._write_profile(s, spec, create_only)
                results.append(result)
                if result.action == "updated":
                    changed.append(spec.name)
            s.flush()
            errors = self._check_mac_ranges(s, specs, where)
            if errors:
                raise InvalidInput(errors)
            self._recheck_vms(s, changed, driver)
        return results

    def _write_profile(self, s: Session, spec: ProfileSpec, create_only: bool) -> ApplyResult:
        doc = spec.to_document()
        mac = spec.values.get("mac_range")
        mac_first, mac_last = (
            (mac.first.value, mac.last.value) if isinstance(mac, MacRange) else (None, None)
        )
        row = s.scalar(select(ProfileRow).where(ProfileRow.name == spec.name))
        now = self.clock()
        if row is None:
            row = ProfileRow(
                name=spec.name,
                description=spec.description,
                labels=dict(spec.labels),
                current_revision=1,
                mac_first=mac_first,
                mac_last=mac_last,
                created_at=now,
                updated_at=now,
            )
            row.revisions.append(ProfileRevisionRow(revision=1, document=doc, created_at=now))
            s.add(row)
            return ApplyResult(spec.name, "created", 1)
        if create_only:
            raise Conflict(f"profile {spec.name!r} already exists; PATCH it to change it")
        if self._current_document(s, row) == doc:
            return ApplyResult(spec.name, "unchanged", row.current_revision)
        row.current_revision += 1
        row.description = spec.description
        row.labels = dict(spec.labels)
        row.mac_first, row.mac_last = mac_first, mac_last
        row.updated_at = now
        s.add(
            ProfileRevisionRow(
                profile_id=row.id, revision=row.current_revision, document=doc, created_at=now
            )
        )
        return ApplyResult(spec.name, "updated", row.current_revision)

    def _check_mac_ranges(
        self, s: Session, specs: Sequence[ProfileSpec], where: Callable[[int, str], str]
    ) -> list[FieldError]:
        errors: list[FieldError] = []
        for i, spec in enumerate(specs):
            mac = spec.values.get("mac_range")
            if not isinstance(mac, MacRange):
                continue
            if mac.overlaps(DEFAULT_MAC_RANGE):
                errors.append(
                    FieldError(
                        where(i, "mac_range"),
                        str(mac),
                        f"a range outside vnic's default pool {DEFAULT_MAC_RANGE}",
                    )
                )
            others = s.scalars(
                select(ProfileRow).where(
                    ProfileRow.name != spec.name,
                    ProfileRow.mac_first.is_not(None),
                    ProfileRow.mac_first <= mac.last.value,
                    ProfileRow.mac_last >= mac.first.value,
                )
            ).all()
            for other in others:
                theirs = MacRange(MacAddress(other.mac_first or 0), MacAddress(other.mac_last or 0))
                errors.append(
                    FieldError(
                        where(i, "mac_range"),
                        str(mac),
                        f"a range that does not overlap profile {other.name!r} ({theirs})",
                    )
                )
        return errors

    def _recheck_vms(self, s: Session, changed: Iterable[str], driver: AgentPort | None) -> None:
        """Re-resolve every VM that uses a changed profile; refuse if one breaks."""
        self._recheck(s, [vm for name in changed for vm in self._vms_using(s, name)], driver)

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

    def _vms_using(self, s: Session, profile: str) -> list[VmRow]:
        row = self._profile_row(s, profile)
        sessions = {
            r.id
            for r in s.scalars(select(SessionRow).where(SessionRow.default_profile_id == row.id))
        }
        sessions |= {
            r.session_id
            for r in s.scalars(
                select(AssignmentRuleRow).where(AssignmentRuleRow.profile_id == row.id)
            )
        }
        loaded = select(VmRow).options(*_VM_RESOLVE_LOADS)
        vms = list(s.scalars(loaded.where(VmRow.session_id.in_(sessions)))) if sessions else []
        vms += [
            v
            for v in s.scalars(loaded.where(VmRow.override_profile_id == row.id))
            if v.session_id not in sessions
        ]
        return vms

    def update_profile(
        self, name: str, patch: Mapping[str, Any], driver: AgentPort | None = None
    ) -> ApplyResult:
        """Merge ``patch`` into the profile's current document (RFC 7386: omitted keys stay,
        ``null`` removes) and store the result as a new revision, with the same checks
        as :meth:`apply_profiles`."""
        if "name" in patch and patch["name"] != name:
            raise InvalidInput.one("name", patch["name"], f"{name!r}: a profile cannot be renamed")
        with self.db.transaction() as s:
            current = dict(self._current_document(s, self._profile_row(s, name)))
        merged = merge_patch(current, dict(patch))
        merged["name"] = name
        return self.apply_profiles([parse_profile_document(merged)], driver=driver)[0]

    def list_profiles(self) -> list[ProfileInfo]:
        """Every profile with its current document and users, in five queries (not 4 per profile)."""
        with self.db.reading() as s:
            rows = s.scalars(select(ProfileRow).order_by(ProfileRow.name)).all()
            docs = {
                r.profile_id: r.document
                for r in s.scalars(
                    select(ProfileRevisionRow)
                    .join(ProfileRow, ProfileRow.id == ProfileRevisionRow.profile_id)
                    .where(ProfileRevisionRow.revision == ProfileRow.current_revision)
                )
            }
            users = self._users_by_profile(s)
            return [
                ProfileInfo(
                    name=r.name,
                    description=r.description,
                    labels=dict(r.labels),
                    revision=r.current_revision,
                    document=docs[r.id],
                    created_at=r.created_at,
                    updated_at=r.updated_at,
                    users=users.get(r.id, []),
                )
                for r in rows
            ]

    def get_profile(self, name: str, revision: int | None = None) -> ProfileInfo:
        if revision is not None and not 1 <= revision <= DB_INT_MAX:
            # SQLite refuses integers past 64 bits with an OverflowError (a 500, a traceback).
            raise InvalidInput.one(
                "revision", revision, f"a revision number from 1 to {DB_INT_MAX}"
            )
        with self.db.reading() as s:
            row = self._profile_row(s, name)
            info = self._profile_info(s, row)
            if revision is None or revision == row.current_revision:
                return info
            rev = self._revision_row(s, row, revision)
            return ProfileInfo(
                name=row.name,
                description=str(rev.document.get("description", "")),
                labels=dict(rev.document.get("labels", {})),
                revision=rev.revision,
                document=rev.document,
                created_at=row.created_at,
                updated_at=rev.created_at,
                users=info.users,
            )

    def history(self, name: str) -> list[RevisionInfo]:
        with self.db.reading() as s:
            row = self._profile_row(s, name)
            return [RevisionInfo(r.revision, r.created_at, r.document) for r in row.revisions]

    def delete_profile(self, name: str) -> None:
        """Delete a profile and all its revisions; refused while anything uses it."""
        with self.db.transaction() as s:
            row = self._profile_row(s, name)
            users = self._users(s, row)
            if users:
                raise InUse("profile", name, users)
            s.delete(row)

    def export_profiles(self, names: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Current documents of ``names`` (all profiles when empty), ready to apply again."""
        with self.db.reading() as s:
            if names:
                rows = [self._profile_row(s, n) for n in names]
            else:
                rows = list(s.scalars(select(ProfileRow).order_by(ProfileRow.name)))
            return [dict(self._current_document(s, r)) for r in rows]

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

    def _profile_info(self, s: Session, row: ProfileRow) -> ProfileInfo:
        return ProfileInfo(
            name=row.name,
            description=row.description,
            labels=dict(row.labels),
            revision=row.current_revision,
            document=self._current_document(s, row),
            created_at=row.created_at,
            updated_at=row.updated_at,
            users=self._users(s, row),
        )

    def _users(self, s: Session, row: ProfileRow) -> list[str]:
        return self._users_by_profile(s, row.id).get(row.id, [])

    @staticmethod
    def _users_by_profile(s: Session, only: int | None = None) -> dict[int, list[str]]:
        """profile id -> what uses it (sorted), for one profile or (``only=None``) all, in
        three queries whatever their number."""
        by_default = select(SessionRow.name, SessionRow.default_profile_id)
        by_rule = select(
            SessionRow.name, AssignmentRuleRow.position, AssignmentRuleRow.profile_id
        ).join(SessionRow, SessionRow.id == AssignmentRuleRow.session_id)
        by_override = select(SessionRow.name, VmRow.name, VmRow.override_profile_id).join(
            SessionRow, SessionRow.id == VmRow.session_id
        )
        if only is not None:
            by_default = by_default.where(SessionRow.default_profile_id == only)
            by_rule = by_rule.where(AssignmentRuleRow.profile_id == only)
            by_override = by_override.where(VmRow.override_profile_id == only)
        users: dict[int, list[str]] = {}
        for name, pid in s.execute(by_default):
            if pid is not None:
                users.setdefault(pid, []).append(f"session {name} (default profile)")
        for name, position, pid in s.execute(by_rule):
            users.setdefault(pid, []).append(f"session {name} (rule #{position + 1})")
        for session, vm, pid in s.execute(by_override):
            if pid is not None:
                users.setdefault(pid, []).append(f"vm {session}/{vm} (override)")
        return {pid: sorted(names) for pid, names in users.items()}

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

    # ------------------------------------------------------------------ sessions

    def create_session(
        self,
        name: str,
        *,
        default_profile: str | None = None,
        rules: Sequence[AssignmentRule] = (),
        network_id: int | None = None,
        overrides_allowed: bool = True,
        owner: str | None = None,
    ) -> SessionInfo:
        name = parse_session_name(name)
        if network_id is not None:
            network_id = parse_network_id(network_id)
        if owner is not None:
            owner = parse_name(owner, "owner")
        with self.db.transaction() as s:
            self.db.allocation_lock(s)
            if s.scalar(select(SessionRow).where(SessionRow.name == name)) is not None:
                raise Conflict(f"session {name!r} already exists")
            default_row = self._existing_profile(s, default_profile, "default_profile")
            rule_rows = self._rule_rows(s, rules)
            if network_id is None:
                network_id = self._free_network_id(s)
            elif (
                s.scalar(select(SessionRow).where(SessionRow.network_id == network_id)) is not None
            ):
                raise Conflict(f"network_id {network_id} is already used by another session")
            row = SessionRow(
                name=name,
                network_id=network_id,
                default_profile_id=default_row.id if default_row else None,
                overrides_allowed=overrides_allowed,
                owner=owner,
                created_at=self.clock(),
            )
            row.rules.extend(rule_rows)
            s.add(row)
            s.flush()
            return self._session_info(row)

    def _existing_profile(self, s: Session, name: str | None, path: str) -> ProfileRow | None:
        """The named profile, or None for no name; a missing one is an input error at ``path``."""
        if name is None:
            return None
        try:
            return self._profile_row(s, parse_name(name, path))
        except NotFound as exc:
            raise InvalidInput.one(path, name, f"an existing profile ({exc})") from None

    def _rule_rows(self, s: Session, rules: Sequence[AssignmentRule]) -> list[AssignmentRuleRow]:
        rows = []
        for i, rule in enumerate(rules):
            profile_row = self._existing_profile(s, rule.profile, f"rules[{i}].profile")
            assert profile_row is not None  # a rule always names a profile
            match = rule.to_document()
            del match["profile"]
            rows.append(AssignmentRuleRow(position=i, profile_id=profile_row.id, match=match))
        return rows

    def update_session(
        self, name: str, changes: Mapping[str, Any], driver: AgentPort | None = None
    ) -> SessionInfo:
        """Change a session's policy or owner; keys absent from ``changes`` stay as they are.

        ``changes`` may hold ``default_profile`` (a name, or None for none),
        ``rules`` (the whole ordered list, replaced), ``overrides_allowed`` and
        ``owner`` (None for none). Refused, with nothing changed, when a VM
        of the session would get an invalid effective profile or lose its MAC's range.
        """
        with self.db.transaction() as s:
            row = self._session_row(s, name)
            if "default_profile" in changes:
                default = self._existing_profile(s, changes["default_profile"], "default_profile")
                row.default_profile_id = default.id if default else None
                row.default_profile = default
            if "rules" in changes:
                row.rules.clear()
                s.flush()  # the old positions must go before the new ones are written
                row.rules.extend(self._rule_rows(s, changes["rules"]))
            if "overrides_allowed" in changes:
                row.overrides_allowed = bool(changes["overrides_allowed"])
            if "owner" in changes:
                owner = changes["owner"]
                row.owner = parse_name(owner, "owner") if owner is not None else None
            s.flush()
            s.expire(row, ["rules", "default_profile"])
            self._recheck(s, row.vms, driver)
            return self._session_info(row)

    def _free_network_id(self, s: Session) -> int:
        used = set(s.scalars(select(SessionRow.network_id)))
        for candidate in range(NETWORK_ID_MIN, NETWORK_ID_MAX + 1):
            if candidate not in used:
                return candidate
        raise Exhausted("no free network id left")  # pragma: no cover - 16 million sessions

    def list_sessions(self) -> list[SessionInfo]:
        with self.db.reading() as s:
            return [
                self._session_info(r)
                for r in s.scalars(select(SessionRow).order_by(SessionRow.name))
            ]

    def get_session(self, name: str) -> SessionInfo:
        with self.db.reading() as s:
            return self._session_info(self._session_row(s, name))

    def delete_session(self, name: str, *, force: bool = False) -> list[str]:
        """Delete a session. With VMs in it, refused unless ``force`` (which removes them)."""
        with self.db.transaction() as s:
            row = self._session_row(s, name)
            vms = [v.name for v in row.vms]
            if vms and not force:
                raise InUse("session", name, [f"vm {name}/{v}" for v in vms])
            s.delete(row)
            return vms

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

    # ------------------------------------------------------------------ VMs

    def add_vm(self, req: VmRequest) -> Explanation:
        """Define a VM in a session: resolve its profile, allocate its MAC.

        Refused (nothing written) when the name is taken, an override is given
        but the session forbids overrides, the effective profile is invalid,
        or the MAC range has no free address.
        """
        name = parse_vm_name(req.name)
        labels = parse_labels(dict(req.labels))
        role = parse_role(req.role)
        needs = parse_needs(list(req.needs))
        patch_values = dict(req.patch) if req.patch else None
        with self.db.transaction() as s:
            self.db.allocation_lock(s)
            session = self._session_row(s, req.session)
            if any(v.name == name for v in session.vms):
                raise Conflict(f"VM {name!r} already exists in session {session.name!r}")
            override_row = None
            if req.profile or patch_values:
                if not session.overrides_allowed:
                    what = "profile" if req.profile else "set"
                    raise InvalidInput.one(
                        what,
                        req.profile or values_to_document(patch_values or {}),
                        f"no override: session {session.name!r} does not allow overrides",
                    )
                if req.profile:
                    try:
                        override_row = self._profile_row(s, parse_name(req.profile, "profile"))
                    except NotFound as exc:
                        raise InvalidInput.one(
                            "profile", req.profile, f"an existing profile ({exc})"
                        ) from None
            vm = VmRow(
                name=name,
                role=role,
                labels=labels,
                needs=list(needs),
                override_profile_id=override_row.id if override_row else None,
                override_patch=values_to_document(patch_values) if patch_values else None,
                state="defined",
                created_at=self.clock(),
            )
            session.vms.append(vm)
            vm.override_profile = override_row
            eff = self._resolve(s, vm)
            vm.mac = MacAllocationRow(
                mac=self._free_mac(s, eff.profile.mac_range).value, allocated_at=self.clock()
            )
            vm.host_index = self._free_host_index(session)
            try:
                s.flush()
            except IntegrityError as exc:  # another writer raced us despite the lock
                raise Conflict(
                    f"could not allocate a MAC for {session.name}/{name}: {exc.orig}"
                ) from None
            return Explanation(self._vm_info(vm), eff)

    def update_vm(
        self,
        session: str,
        name: str,
        changes: Mapping[str, Any],
        driver: AgentPort | None = None,
    ) -> Explanation:
        """Change a VM's facts or override; keys absent from ``changes`` stay as they are.

        Keys: ``role``, ``labels``, ``needs`` (replaced), ``profile`` (override
        profile name, None removes), ``patch`` (merged into the override patch
        as an RFC 7386 merge patch, so ``null`` removes a field from the
        override; None as the whole value removes the override patch). The
        session must allow overrides to set one. The VM keeps its MAC, which
        must stay inside the new effective range. A running VM is not touched
        here: :meth:`update_vm_live` also changes it live.
        """
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            if "role" in changes:
                vm.role = parse_role(changes["role"])
            if "labels" in changes:
                vm.labels = parse_labels(changes["labels"] or {})
            if "needs" in changes:
                vm.needs = list(parse_needs(changes["needs"] or []))
            setting = [k for k in ("profile", "patch") if changes.get(k) is not None]
            if setting and not vm.session.overrides_allowed:
                raise InvalidInput.one(
                    setting[0],
                    changes[setting[0]],
                    f"no override: session {vm.session.name!r} does not allow overrides",
                )
            if "profile" in changes:
                row = self._existing_profile(s, changes["profile"], "profile")
                vm.override_profile_id = row.id if row else None
                vm.override_profile = row
            if "patch" in changes:
                vm.override_patch = self._merged_override(vm.override_patch, changes["patch"])
            s.flush()
            self._recheck(s, [vm], driver)
            return Explanation(self._vm_info(vm), self._resolve(s, vm))

    @staticmethod
    def _merged_override(
        current: Mapping[str, Any] | None, patch: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        if patch is None:
            return None
        if not isinstance(patch, Mapping):
            raise InvalidInput.one("patch", patch, "a mapping of profile fields, or null")
        merged = merge_patch(dict(current or {}), dict(patch))
        errors: list[FieldError] = []
        values = document_to_values(merged, errors)
        if errors:
            raise InvalidInput([e.under("patch") for e in errors])
        return values_to_document(values) or None

    def _free_mac(self, s: Session, pool: MacRange) -> MacAddress:
        taken = s.scalars(
            select(MacAllocationRow.mac)
            .where(
                MacAllocationRow.mac >= pool.first.value, MacAllocationRow.mac <= pool.last.value
            )
            .order_by(MacAllocationRow.mac)
        )
        candidate = pool.first.value
        for mac in taken:
            if mac != candidate:
                break
            candidate += 1
        if candidate > pool.last.value:
            raise Exhausted(f"MAC range {pool} has no free address ({pool.size} allocated)")
        return MacAddress(candidate)

    @staticmethod
    def _free_host_index(session: SessionRow) -> int:
        used = {v.host_index for v in session.vms}
        for index in range(2, 255):
            if index not in used:
                return index
        raise Exhausted(f"session {session.name!r} has no free address (253 VMs at most)")

    # ------------------------------------------------------------------ launch

    def launch_vm(
        self, session: str, name: str, driver: AgentPort, kind: str | None = None
    ) -> Explanation:
        """Resolve the VM's profile, hand the launch request to ``driver``, record what runs.

        ``driver`` is the agent (:class:`~vnic.agent.port.AgentPort`); ``kind`` picks
        one of its drivers (``netns``, ``qemu``); None: the agent's default. The
        driver refuses unsupported fields before touching anything and removes what
        it made if the launch fails; the VM then stays defined (also when recording
        it fails: the VM is removed again).

        From the database read to the database write under the agent's gate, shared
        (:func:`_holding`; this host's agent's is its host lock).
        """
        with _holding(driver):
            with self.db.transaction() as s:
                vm = self._vm_row(s, session, name)
                if vm.state == "running":
                    raise Conflict(f"VM {session}/{name} is already running")
                eff = self._resolve(s, vm)
                request = self._launch_request(vm, eff)
            driver.launch(request, kind)  # an unknown kind is the agent's InvalidInput
            used = kind or driver.kind
            try:
                with self.db.transaction() as s:
                    vm = self._vm_row(s, session, name)
                    vm.state = "running"
                    vm.applied = {
                        "driver": used,
                        "revisions": dict(eff.revisions),
                        "values": values_to_document(eff.values),
                    }
                    return Explanation(self._vm_info(vm), eff)
            except BaseException:
                driver.destroy(session, name)  # not recorded as running: must not run
                raise

    def _launch_request(self, vm: VmRow, eff: Effective) -> LaunchRequest:
        if vm.mac is None or vm.host_index is None:  # pragma: no cover - set by add_vm
            raise Conflict(f"VM {vm.session.name}/{vm.name} has no MAC or address")
        ipv4, ipv6 = vm_addresses(vm.session.network_id, vm.host_index)
        return LaunchRequest(
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

    def reapply(
        self,
        driver: AgentPort,
        *,
        session: str | None = None,
        vm: str | None = None,
        source: str | None = None,
        reason: str = "",
        strict: bool = False,
    ) -> list[VmChange]:
        """Re-resolve running VMs and send each one whose effective profile changed to
        ``driver`` as a live change; record what now runs and audit every change.
        ``driver`` is an agent (:meth:`vnic.agent.core.Agent.reconfigure_many`, or the
        HTTP client of one): it knows what each VM runs, which a driver's own
        live change starts from.

        The scope is every running VM, or those of ``session`` (and ``vm``).
        Only VMs whose effective values or profile revisions differ from what
        they run are touched, and the driver changes only what differs (see
        :meth:`vnic.drivers.netns.NetnsDriver.reconfigure`). A VM whose change
        fails keeps what it ran and carries the error in its :class:`VmChange`
        (or, with ``strict``, the error is raised after the others are done).
        With ``source``, each change is written to the audit log under it and
        ``reason`` (runtime adjustments audit themselves, so they pass none).
        """
        with _holding(driver):
            return self._reapply(driver, session, vm, source, reason, strict)

    def _reapply(
        self,
        driver: AgentPort,
        session: str | None,
        vm: str | None,
        source: str | None,
        reason: str,
        strict: bool,
    ) -> list[VmChange]:
        with self.db.reading() as s:
            pending: list[tuple[Effective, LaunchRequest, dict[str, tuple[Any, Any]]]] = []
            ids: dict[tuple[str, str], int] = {}
            for row, eff in self._running(s, session, vm):
                applied = row.applied or {}
                fields = field_changes(applied.get("values") or {}, values_to_document(eff.values))
                if not fields and dict(applied.get("revisions") or {}) == dict(eff.revisions):
                    continue
                pending.append((eff, self._launch_request(row, eff), fields))
                ids[(row.session.name, row.name)] = row.id
        if not pending:
            return []
        requests = [request for _, request, _ in pending]
        outcomes = driver.reconfigure_many(requests)
        changes: list[VmChange] = []
        now = self.clock()
        with self.db.transaction() as s:
            rows = {r.id: r for r in s.scalars(select(VmRow).where(VmRow.id.in_(ids.values())))}
            for eff, request, fields in pending:
                outcome = outcomes.get((request.session, request.vm))
                error = str(outcome) if isinstance(outcome, BaseException) else None
                kernel = [] if error or not isinstance(outcome, list) else list(outcome)
                sources = {path: str(eff.sources.get(path, "")) for path in fields}
                change = VmChange(
                    request.session, request.vm, fields, sources, kernel, error, eff.revisions
                )
                changes.append(change)
                if error:
                    continue
                current = rows.get(ids[(request.session, request.vm)])
                if current is None:
                    continue  # removed while the change ran
                current.applied = {
                    "driver": (current.applied or {}).get("driver", driver.kind),
                    "revisions": dict(eff.revisions),
                    "values": values_to_document(eff.values),
                }
                if fields and source is not None:
                    s.add(audit_row(now, request.session, request.vm, source, reason, fields))
        failed = [c for c in changes if c.error]
        if strict and failed:
            raise DataplaneError("; ".join(f"{c.session}/{c.vm}: {c.error}" for c in failed))
        return changes

    def running_effective(self, session: str) -> dict[str, Effective]:
        """The effective profile of each running VM of ``session``, by name, in one
        transaction (what the controller compares its samples with)."""
        with self.db.reading() as s:
            return {row.name: eff for row, eff in self._running(s, session)}

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
        query = select(VmRow).options(*_VM_RESOLVE_LOADS)
        if running_only:
            query = query.where(VmRow.state == "running")
        if session is not None:
            query = query.where(VmRow.session_id == self._session_row(s, session).id)
        if vm is not None:
            query = query.where(VmRow.name == vm)
        cache: dict[Any, Any] = {}
        for row in s.scalars(query):
            yield row, self._resolve(s, row, cache=cache)

    def apply_profiles_live(
        self, specs: Sequence[ProfileSpec], driver: AgentPort
    ) -> tuple[list[ApplyResult], list[VmChange]]:
        """:meth:`apply_profiles`, then the new revisions live on every running VM they reach."""
        results = self.apply_profiles(specs, driver=driver)
        updated = [f"{r.name} r{r.revision}" for r in results if r.action == "updated"]
        if not updated:
            return results, []
        reason = "profile " + ", ".join(updated)
        return results, self.reapply(driver, source="user", reason=reason)

    def update_vm_live(
        self, session: str, name: str, changes: Mapping[str, Any], driver: AgentPort
    ) -> tuple[Explanation, list[VmChange]]:
        """:meth:`update_vm`, then the change live on the VM if it runs (errors raised)."""
        # update_vm's explanation is the one after the change: reapply sends what it
        # resolved and changes no record but what runs.
        result = self.update_vm(session, name, changes, driver)
        applied = self.reapply(
            driver, session=session, vm=name, source="user", reason="VM override", strict=True
        )
        return result, applied

    def desired(self) -> list[tuple[str, LaunchRequest]]:
        """``(driver kind, launch request)`` of every VM the database says is running:
        what the agents must run."""
        with self.db.reading() as s:
            out = []
            for vm in s.scalars(select(VmRow).where(VmRow.state == "running")):
                kind = str((vm.applied or {}).get("driver", "netns"))
                out.append((kind, self._launch_request(vm, self._resolve(s, vm))))
            return out

    def mark_stopped(self, session: str, name: str) -> None:
        """Record that a VM no longer runs (its agent lost it and could not restore it)."""
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            vm.state = "defined"
            vm.applied = None

    def launch_many(
        self,
        session: str,
        names: Sequence[str],
        driver_kind: str = "netns",
        workers: int = 2,
        *,
        agents: Callable[[str], AgentPort],
    ) -> list[LaunchOutcome]:
        """Launch ``names`` with ``workers`` processes, each with its own database
        connection and agent, ``agents(driver_kind)``, made in the process after the fork
        (launches are CPU-bound: one process per core; a netlink socket is not to share).

        Every VM is attempted; the outcomes say which launched, in how long,
        and why the others failed.
        """
        if not names:
            return []
        if workers < 1:
            raise InvalidInput.one("workers", workers, "a number of processes of at least 1")
        # The first launch brings the session's network up; after it, launches
        # of different VMs touch disjoint objects and may run side by side.
        outcomes = [_timed_launch(self, agents(driver_kind), session, names[0])]
        rest = [(session, name) for name in names[1:]]
        if rest:
            # Children get their own connections; the parent's pool must not be shared.
            self.db.dispose()
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(
                min(workers, len(rest)),
                initializer=_worker_init,
                initargs=(self.db.url, driver_kind, agents),
            ) as pool:
                outcomes += pool.imap_unordered(_worker_launch, rest)
        return outcomes

    def destroy_vm(self, session: str, name: str, driver: AgentPort) -> None:
        """Stop the VM and remove its network; its definition (and MAC) stays."""
        with _holding(driver):
            with self.db.transaction() as s:
                self._vm_row(s, session, name)
            driver.destroy(session, name)
            with self.db.transaction() as s:
                vm = self._vm_row(s, session, name)
                vm.state = "defined"
                vm.applied = None

    def session_down(self, session: str, driver: AgentPort) -> list[str]:
        """Stop every VM of the session and remove its network. Returns the VMs stopped."""
        with _holding(driver):
            with self.db.transaction() as s:
                names = [v.name for v in self._session_row(s, session).vms]
            running = sorted(set(driver.running(session)) | set(names))
            driver.teardown_session(session, names)
            with self.db.transaction() as s:
                for vm in self._session_row(s, session).vms:
                    vm.state = "defined"
                    vm.applied = None
            return running

    def remove_vm(self, session: str, name: str) -> None:
        with self.db.transaction() as s:
            s.delete(self._vm_row(s, session, name))

    def list_vms(self, session: str) -> list[VmInfo]:
        with self.db.reading() as s:
            return [self._vm_info(v) for v in self._session_row(s, session).vms]

    def get_vm(self, session: str, name: str) -> VmInfo:
        """The VM's record (no resolution: :meth:`explain` adds the effective profile)."""
        with self.db.reading() as s:
            return self._vm_info(self._vm_row(s, session, name))

    def explain(self, session: str, name: str) -> Explanation:
        """The VM's effective profile with the source of every field."""
        with self.db.reading() as s:
            vm = self._vm_row(s, session, name)
            return Explanation(self._vm_info(vm), self._resolve(s, vm))

    def explain_all(self, session: str) -> list[Explanation]:
        """:meth:`explain` for every VM of ``session``, in one transaction (each policy and
        profile set loaded once): the web UI's session table."""
        with self.db.reading() as s:
            found = [
                Explanation(self._vm_info(vm), eff)
                for vm, eff in self._running(s, session, running_only=False)
            ]
        return sorted(found, key=lambda e: e.vm.name)

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
        active = [a for a in vm.adjustments if _unexpired(a, now)]
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
                _aware(a.expires_at),
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


@dataclass(frozen=True)
class LaunchOutcome:
    """One VM of a parallel launch: seconds taken, or the error that stopped it."""

    vm: str
    seconds: float
    error: str | None = None


_worker: dict[str, Any] = {}


def _worker_init(url: str, driver_kind: str, agents: Callable[[str], AgentPort]) -> None:
    _worker["service"] = Service(Database(url, migrate=False))
    _worker["driver"] = agents(driver_kind)


def _worker_launch(task: tuple[str, str]) -> LaunchOutcome:
    session, name = task
    return _timed_launch(_worker["service"], _worker["driver"], session, name)


def _timed_launch(service: Service, driver: AgentPort, session: str, name: str) -> LaunchOutcome:
    start = time.perf_counter()
    try:
        service.launch_vm(session, name, driver)
    except VnicError as exc:
        return LaunchOutcome(name, time.perf_counter() - start, str(exc))
    return LaunchOutcome(name, time.perf_counter() - start)


#: What resolving many VMs reads of each, loaded in one query per relation, not per VM.
_VM_RESOLVE_LOADS = (
    selectinload(VmRow.adjustments),
    selectinload(VmRow.mac),
    selectinload(VmRow.override_profile),
)


def _holding(driver: AgentPort) -> contextlib.AbstractContextManager[None]:
    """``driver``'s gate, shared: this host's agent's host lock, or a remote agent's
    client's lock over this process's threads (:meth:`AgentPort.gate`).

    A use case that reads the database, has the agent act, and writes the
    database holds it throughout: a reconcile (exclusive, in ``vnic serve`` or
    any process on the host) then sees the database and the agent's desired
    state both before or both after, never a launch half-recorded.
    """
    return driver.gate().shared()


def _capabilities(driver: AgentPort) -> dict[str, Capabilities]:
    """What each driver kind behind ``driver`` (an agent has several) honours."""
    return {c.kind: c for c in driver.all_capabilities()}


def flat_document(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical profile document's fields by path (``egress.rate`` -> ``"10Mbit"``)."""
    out: dict[str, Any] = {}
    for path in FIELDS:
        head, _, tail = path.partition(".")
        section = doc.get(head)
        if tail:
            if isinstance(section, Mapping) and tail in section:
                out[path] = section[tail]
        elif section is not None:
            out[path] = section
    return out


def field_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``path -> (old, new)`` for every field whose document value differs (None = unset)."""
    a, b = flat_document(old), flat_document(new)
    return {p: (a.get(p), b.get(p)) for p in FIELDS if a.get(p) != b.get(p)}


def audit_row(
    at: datetime,
    session: str,
    vm: str | None,
    source: str,
    reason: str,
    fields: Mapping[str, tuple[Any, Any]],
) -> AuditRow:
    return AuditRow(
        at=at,
        session=session,
        vm=vm,
        source=source,
        reason=reason,
        old={p: old for p, (old, _) in fields.items()},
        new={p: new for p, (_, new) in fields.items()},
    )


def _unexpired(row: AdjustmentRow, now: datetime) -> bool:
    until = _aware(row.expires_at)
    return until is None or now < until


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


__all__ = [
    "OFF",
    "ApplyResult",
    "Explanation",
    "ProfileInfo",
    "RevisionInfo",
    "Service",
    "SessionInfo",
    "VmChange",
    "VmInfo",
    "VmRequest",
]
