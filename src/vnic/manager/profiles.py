"""The profile use cases: apply (create or update, all or nothing), patch, read,
export and delete; every stored document is a numbered revision."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, FieldError, InUse, InvalidInput
from vnic.manager.core import ServiceCore
from vnic.manager.results import ApplyResult, ProfileInfo, RevisionInfo
from vnic.manager.rows import VM_RESOLVE_LOADS
from vnic.model.documents import merge_patch
from vnic.model.fields import DEFAULT_MAC_RANGE
from vnic.model.launch import PRIMARY_NIC
from vnic.model.limits import DB_INT_MAX
from vnic.model.profile import ProfileSpec, parse_profile_document
from vnic.model.units import MacAddress, MacRange
from vnic.store.models import (
    AdjustmentRow,
    AssignmentRuleRow,
    NetworkRow,
    NicRow,
    ProfileRevisionRow,
    ProfileRow,
    SessionRow,
    VmRow,
)


class Profiles(ServiceCore):
    """Profiles and their revisions."""

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
        sessions |= set(
            s.scalars(select(NetworkRow.session_id).where(NetworkRow.default_profile_id == row.id))
        )
        loaded = select(VmRow).options(*VM_RESOLVE_LOADS)
        vms = list(s.scalars(loaded.where(VmRow.session_id.in_(sessions)))) if sessions else []
        # VMs outside those sessions that name it in a vNIC's override or an adjustment.
        overriding = select(NicRow.vm_id).where(NicRow.override_profile_id == row.id)
        adjusted = select(AdjustmentRow.vm_id).where(AdjustmentRow.profile == profile)
        vms += [
            v
            for v in s.scalars(loaded.where(VmRow.id.in_(overriding) | VmRow.id.in_(adjusted)))
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
        four queries whatever their number."""
        by_default = select(SessionRow.name, SessionRow.default_profile_id)
        by_rule = select(
            SessionRow.name, AssignmentRuleRow.position, AssignmentRuleRow.profile_id
        ).join(SessionRow, SessionRow.id == AssignmentRuleRow.session_id)
        by_override = (
            select(SessionRow.name, VmRow.name, NicRow.name, NicRow.override_profile_id)
            .join(VmRow, VmRow.id == NicRow.vm_id)
            .join(SessionRow, SessionRow.id == VmRow.session_id)
        )
        by_network = select(SessionRow.name, NetworkRow.name, NetworkRow.default_profile_id).join(
            SessionRow, SessionRow.id == NetworkRow.session_id
        )
        if only is not None:
            by_default = by_default.where(SessionRow.default_profile_id == only)
            by_rule = by_rule.where(AssignmentRuleRow.profile_id == only)
            by_override = by_override.where(NicRow.override_profile_id == only)
            by_network = by_network.where(NetworkRow.default_profile_id == only)
        users: dict[int, list[str]] = {}
        for name, pid in s.execute(by_default):
            if pid is not None:
                users.setdefault(pid, []).append(f"session {name} (default profile)")
        for name, position, pid in s.execute(by_rule):
            users.setdefault(pid, []).append(f"session {name} (rule #{position + 1})")
        for session, vm, nic, pid in s.execute(by_override):
            if pid is not None:
                label = f"{session}/{vm}" if nic == PRIMARY_NIC else f"{session}/{vm}/{nic}"
                users.setdefault(pid, []).append(f"vm {label} (override)")
        for session, network, pid in s.execute(by_network):
            if pid is not None:
                users.setdefault(pid, []).append(f"network {session}/{network} (default profile)")
        return {pid: sorted(names) for pid, names in users.items()}
