"""The VM definition use cases: add (MAC and address allocated), change facts or
override, remove, read, explain (the effective profile with its sources).

Running VMs are :mod:`vnic.manager.launch`'s and :mod:`vnic.manager.reapply`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, Exhausted, FieldError, InvalidInput, NotFound
from vnic.manager.core import ServiceCore
from vnic.manager.results import Explanation, VmInfo, VmRequest
from vnic.model.documents import merge_patch
from vnic.model.profile import document_to_values, parse_labels, parse_name, values_to_document
from vnic.model.session import parse_needs, parse_role, parse_vm_name
from vnic.model.units import MacAddress, MacRange
from vnic.store.models import MacAllocationRow, SessionRow, VmRow


class Vms(ServiceCore):
    """VM definitions: facts for the rules, an optional override, a MAC, an address."""

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
