"""The VM definition use cases: add (MAC and address allocated), change facts or
override, remove, read, explain (the effective profile with its sources).

Running VMs are :mod:`vnic.manager.launch`'s and :mod:`vnic.manager.reapply`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, Exhausted, FieldError, InvalidInput
from vnic.manager import changelog
from vnic.manager.core import ServiceCore
from vnic.manager.results import Explanation, VmInfo, VmRequest
from vnic.model.documents import merge_patch
from vnic.model.launch import DEFAULT_NETWORK, PRIMARY_NIC
from vnic.model.network import (
    HOST_INDEX_MAX,
    HOST_INDEX_MIN,
    NicSpec,
    check_nic_specs,
    nic_name,
    parse_nic_name,
)
from vnic.model.profile import document_to_values, parse_labels, values_to_document
from vnic.model.session import parse_needs, parse_role, parse_vm_name
from vnic.model.units import MacAddress, MacRange
from vnic.store.models import MacAllocationRow, NetworkRow, NicRow, ProfileRow, SessionRow, VmRow


class Vms(ServiceCore):
    """VM definitions: facts for the rules, an optional override, a MAC, an address."""

    def add_vm(self, req: VmRequest) -> Explanation:
        """Define a VM in a session: resolve every vNIC's profile, allocate each one a MAC
        (from its own effective profile's range) and an address (in its network).

        Without ``req.nics``: ``eth0`` on ``default`` with ``req.profile``/``req.patch``
        as its override. Refused (nothing written) when the name is taken, a vNIC names
        a network the session lacks, there are more than :data:`MAX_NICS` vNICs, an
        override is given but the session forbids overrides, an effective profile is
        invalid, or a MAC range or network has no free address.
        """
        name = parse_vm_name(req.name)
        labels = parse_labels(dict(req.labels))
        role = parse_role(req.role)
        needs = parse_needs(list(req.needs))
        specs = self._nic_specs(req)
        with self.db.transaction() as s:
            self.db.allocation_lock(s)
            session = self._session_row(s, req.session)
            if any(v.name == name for v in session.vms):
                raise Conflict(f"VM {name!r} already exists in session {session.name!r}")
            networks = {n.name: n for n in session.networks}
            # Every lookup first: a vNIC row tied to its network before the VM is in the
            # session would be flushed half-made by the next query.
            found: list[tuple[NetworkRow, ProfileRow | None]] = []
            for i, spec in enumerate(specs):
                where = f"nics[{i}]" if req.nics else ""
                net = networks.get(spec.network)
                if net is None:
                    raise InvalidInput.one(
                        f"{where}.network" if where else "network",
                        spec.network,
                        f"a network of session {session.name!r} ({', '.join(networks)})",
                    )
                found.append((net, self._nic_override(s, session, spec, where)))
            nics: list[NicRow] = []
            for i, (spec, (net, override_row)) in enumerate(zip(specs, found, strict=True)):
                nic = NicRow(
                    name=nic_name(i),
                    position=i,
                    override_profile_id=override_row.id if override_row else None,
                    override_patch=values_to_document(dict(spec.patch)) if spec.patch else None,
                )
                nic.network = net
                nic.override_profile = override_row
                nics.append(nic)
            vm = VmRow(
                name=name,
                role=role,
                labels=labels,
                needs=list(needs),
                state="defined",
                created_at=self.clock(),
            )
            session.vms.append(vm)
            vm.nics.extend(nics)
            effs = self._resolve_nics(s, vm)
            taken: set[int] = set()
            for nic in nics:
                mac = self._free_mac(s, effs[nic.name].profile.mac_range, taken)
                taken.add(mac.value)
                nic.mac = MacAllocationRow(mac=mac.value, allocated_at=self.clock())
                nic.host_index = self._free_host_index(s, nic.network, vm)
            try:
                s.flush()
            except IntegrityError as exc:  # another writer raced us despite the lock
                raise Conflict(
                    f"could not allocate a MAC for {session.name}/{name}: {exc.orig}"
                ) from None
            return Explanation(self._vm_info(vm), effs[PRIMARY_NIC], effs)

    @staticmethod
    def _nic_specs(req: VmRequest) -> list[NicSpec]:
        if not req.nics:
            patch = dict(req.patch) if req.patch else None
            return [NicSpec(DEFAULT_NETWORK, req.profile, patch)]
        if req.profile or req.patch:
            raise InvalidInput.one(
                "profile" if req.profile else "set",
                req.profile or values_to_document(dict(req.patch or {})),
                "no VM-wide override with nics: give each vNIC its own (profile=, set=)",
            )
        check_nic_specs(list(req.nics))
        return list(req.nics)

    def _nic_override(
        self, s: Session, session: SessionRow, spec: NicSpec, where: str
    ) -> ProfileRow | None:
        """The override profile of a vNIC to add; refused where the session forbids
        overrides. ``where``: the field prefix of the vNIC (empty for the VM-wide form)."""
        prefix = f"{where}." if where else ""
        if (spec.profile or spec.patch) and not session.overrides_allowed:
            what = "profile" if spec.profile else "set"
            raise InvalidInput.one(
                prefix + what,
                spec.profile or values_to_document(dict(spec.patch or {})),
                f"no override: session {session.name!r} does not allow overrides",
            )
        return self._existing_profile(s, spec.profile, prefix + "profile")

    def update_vm(
        self,
        session: str,
        name: str,
        changes: Mapping[str, Any],
        driver: AgentPort | None = None,
        nic: str = PRIMARY_NIC,
    ) -> Explanation:
        """Change a VM's facts or one vNIC's override; keys absent from ``changes`` stay
        as they are.

        Keys: ``role``, ``labels``, ``needs`` (replaced; the VM's), ``profile``
        (override profile name of vNIC ``nic``, None removes), ``patch`` (merged into
        that vNIC's override patch as an RFC 7386 merge patch, so ``null`` removes a
        field from the override; None as the whole value removes the override patch).
        The session must allow overrides to set one. Every vNIC keeps its MAC, which
        must stay inside its new effective range. A running VM is not touched
        here: :meth:`update_vm_live` also changes it live.
        """
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            target = self._nic_row(vm, parse_nic_name(nic))
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
                target.override_profile_id = row.id if row else None
                target.override_profile = row
            if "patch" in changes:
                target.override_patch = self._merged_override(
                    target.override_patch, changes["patch"]
                )
            s.flush()
            self._recheck(s, [vm], driver)
            return self._explanation(s, vm)

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

    def _free_mac(self, s: Session, pool: MacRange, pending: Collection[int] = ()) -> MacAddress:
        """The lowest MAC of ``pool`` no vNIC holds (``pending``: taken by this add).

        Found by the database (the first allocated MAC whose successor is free), not by
        reading every allocated MAC of the pool: with 20 000 vNICs that read was 20 000
        rows for each new vNIC."""
        candidate = pool.first.value
        while candidate <= pool.last.value:
            candidate = _lowest_free(s, candidate, pool.last.value)
            if candidate <= pool.last.value and candidate not in pending:
                return MacAddress(candidate)
            candidate += 1
        raise Exhausted(f"MAC range {pool} has no free address ({pool.size} allocated)")

    @staticmethod
    def _free_host_index(s: Session, network: NetworkRow, vm: VmRow) -> int:
        """The lowest host index (2..254) no vNIC on ``network`` holds (``vm``'s vNICs
        being added included)."""
        used = {n.host_index for n in network.nics} | {
            n.host_index for n in vm.nics if n.network is network
        }
        for index in range(HOST_INDEX_MIN, HOST_INDEX_MAX + 1):
            if index not in used:
                return index
        raise Exhausted(
            f"network {network.session.name}/{network.name} has no free address (253 vNICs at most)"
        )

    def remove_vm(self, session: str, name: str) -> None:
        """Remove the VM's definition (a VM still running on a host: its host is told,
        in the same transaction)."""
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            changelog.append_removal(s, vm, self.clock())
            s.delete(vm)

    def list_vms(self, session: str) -> list[VmInfo]:
        with self.db.reading() as s:
            return [self._vm_info(v) for v in self._session_row(s, session).vms]

    def get_vm(self, session: str, name: str) -> VmInfo:
        """The VM's record (no resolution: :meth:`explain` adds the effective profile)."""
        with self.db.reading() as s:
            return self._vm_info(self._vm_row(s, session, name))

    def explain(self, session: str, name: str) -> Explanation:
        """Every vNIC's effective profile with the source of every field."""
        with self.db.reading() as s:
            return self._explanation(s, self._vm_row(s, session, name))

    def explain_all(self, session: str) -> list[Explanation]:
        """:meth:`explain` for every VM of ``session``, in one transaction (each policy and
        profile set loaded once): the web UI's session table."""
        with self.db.reading() as s:
            found = [
                Explanation(self._vm_info(vm), effs[PRIMARY_NIC], effs)
                for vm, effs in self._running(s, session, running_only=False)
            ]
        return sorted(found, key=lambda e: e.vm.name)


def _lowest_free(s: Session, start: int, last: int) -> int:
    """The lowest MAC from ``start`` that no row holds; ``last + 1`` when none to ``last``."""
    taken = select(MacAllocationRow.mac).where(MacAllocationRow.mac == start)
    if s.scalar(taken) is None:
        return start
    after = aliased(MacAllocationRow)
    gap = s.scalar(
        select(func.min(MacAllocationRow.mac + 1)).where(
            MacAllocationRow.mac >= start,
            MacAllocationRow.mac <= last,
            ~exists().where(after.mac == MacAllocationRow.mac + 1),
        )
    )
    return int(gap) if gap is not None else last + 1
