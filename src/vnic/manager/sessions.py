"""The session use cases: create (a free network id), change the policy, read, delete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, Exhausted, InUse
from vnic.manager.core import ServiceCore
from vnic.manager.results import SessionInfo
from vnic.model.launch import DEFAULT_NETWORK
from vnic.model.placement import parse_constraint
from vnic.model.profile import parse_name
from vnic.model.session import (
    NETWORK_ID_MAX,
    NETWORK_ID_MIN,
    AssignmentRule,
    parse_network_id,
    parse_session_name,
)
from vnic.plan.names import session_ipv4, session_ipv6
from vnic.store.models import AssignmentRuleRow, NetworkRow, SessionRow


def default_network(network_id: int, created_at: Any) -> NetworkRow:
    """A session's network ``default``: the session's network id and the subnets
    derived from it (as before sessions had several networks)."""
    return NetworkRow(
        name=DEFAULT_NETWORK,
        network_id=network_id,
        ipv4=str(session_ipv4(network_id)),
        ipv6=str(session_ipv6(network_id)),
        created_at=created_at,
    )


class Sessions(ServiceCore):
    """Sessions: a network id and a policy (default profile, rules, overrides)."""

    def create_session(
        self,
        name: str,
        *,
        default_profile: str | None = None,
        rules: Sequence[AssignmentRule] = (),
        network_id: int | None = None,
        overrides_allowed: bool = True,
        owner: str | None = None,
        placement: Mapping[str, Any] | None = None,
    ) -> SessionInfo:
        """Create a session; ``placement`` (``{"strategy": "spread"|"pack", "labels":
        {...}}``, :mod:`vnic.model.placement`) says where its VMs go among many hosts."""
        name = parse_session_name(name)
        where = parse_constraint(placement).to_dict() if placement is not None else None
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
            else:
                owner_of = self._network_id_owner(s, network_id)
                if owner_of is not None:
                    raise Conflict(f"network_id {network_id} is already used by {owner_of}")
            row = SessionRow(
                name=name,
                network_id=network_id,
                default_profile_id=default_row.id if default_row else None,
                overrides_allowed=overrides_allowed,
                owner=owner,
                placement=where,
                created_at=self.clock(),
            )
            row.rules.extend(rule_rows)
            row.networks.append(default_network(network_id, self.clock()))
            s.add(row)
            s.flush()
            return self._session_info(row)

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
            if "placement" in changes:
                where = changes["placement"]
                row.placement = parse_constraint(where).to_dict() if where is not None else None
            s.flush()
            s.expire(row, ["rules", "default_profile"])
            self._recheck(s, row.vms, driver)
            return self._session_info(row)

    @staticmethod
    def _free_network_id(s: Session) -> int:
        """The lowest network id no session and no network uses."""
        used = set(s.scalars(select(SessionRow.network_id)))
        used |= set(s.scalars(select(NetworkRow.network_id)))
        for candidate in range(NETWORK_ID_MIN, NETWORK_ID_MAX + 1):
            if candidate not in used:
                return candidate
        raise Exhausted("no free network id left")  # pragma: no cover - 16 million networks

    @staticmethod
    def _network_id_owner(s: Session, network_id: int) -> str | None:
        """Who uses ``network_id`` (``network SESSION/NAME`` or ``session NAME``), if anyone."""
        net = s.scalar(select(NetworkRow).where(NetworkRow.network_id == network_id))
        if net is not None:
            return f"network {net.session.name}/{net.name}"
        name = s.scalar(select(SessionRow.name).where(SessionRow.network_id == network_id))
        return f"session {name}" if name is not None else None

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
