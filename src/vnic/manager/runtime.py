"""Runtime adjustments and their audit log: the top layer of resolution, with an expiry.

An adjustment belongs to one VM and one *source* (``user``, ``rule:NAME``,
``feedback``, ``scenario:NAME``); a source's newer adjustment replaces its
older one. Every change of a VM's effective profile made here is written to
the audit log with the fields' old and new values, in the same transaction.
Applying the change to a running VM is the caller's next step
(:meth:`vnic.manager.service.Service.reapply`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vnic.agent.port import AgentPort
from vnic.errors import FieldError, InvalidInput, show_value
from vnic.manager.rows import audit_row, aware, field_changes
from vnic.manager.service import Service
from vnic.model import limits
from vnic.model.launch import PRIMARY_NIC
from vnic.model.limits import check_text
from vnic.model.network import parse_nic_name
from vnic.model.profile import NAME_EXPECTED, parse_name, values_to_document
from vnic.store.models import AdjustmentRow, AuditRow, SessionRow, VmRow

#: Resolution just before a moment.
_TICK = timedelta(microseconds=1)
#: Longest text kept as an adjustment's or audit entry's reason (a person's longer
#: reason is refused by parse_reason; the system's own are cut to it).
REASON_MAX = limits.REASON_MAX


@dataclass(frozen=True)
class AdjustmentInfo:
    session: str
    vm: str
    source: str
    reason: str
    profile: str | None
    values: Mapping[str, Any]
    expires_at: datetime | None
    created_at: datetime
    nic: str = PRIMARY_NIC


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    session: str
    vm: str | None
    source: str
    reason: str
    old: Mapping[str, Any]
    new: Mapping[str, Any]
    #: The vNIC changed when not eth0 (None: eth0, or the whole VM).
    nic: str | None = None


class Runtime:
    """Adjustments and audit over a :class:`Service`'s database and clock."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def adjust(
        self,
        session: str,
        vm: str,
        *,
        source: str,
        reason: str,
        values: Mapping[str, Any] | None = None,
        profile: str | None = None,
        expires_at: datetime | None = None,
        audit: bool = True,
        driver: AgentPort | None = None,
        nic: str = PRIMARY_NIC,
    ) -> dict[str, tuple[Any, Any]]:
        """Set ``source``'s adjustment of the VM's vNIC ``nic`` (typed ``values`` on top of
        ``profile``'s); return the fields of that vNIC whose effective value changed,
        ``path -> (old, new)``.

        Refused, with nothing changed, when the VM would get an invalid effective
        profile, the profile does not exist, or (with ``driver``) the VM runs on a
        driver that cannot honour the result. ``audit=False`` is for a trace
        replay's many small steps (its start and end are audited).
        """
        if not values and not profile:
            raise InvalidInput.one("set", values, "at least one field, or a profile")
        svc = self.service
        with svc.db.transaction() as s:
            row = svc._vm_row(s, session, vm)
            target = svc._nic_row(row, parse_nic_name(nic))
            if profile is not None:
                svc._existing_profile(s, profile, "profile")

            def put() -> None:
                current = next(
                    (a for a in row.adjustments if a.source == source and a.nic == target.name),
                    None,
                )
                if current is None:
                    current = AdjustmentRow(
                        vm_id=row.id, nic=target.name, source=source, created_at=svc.clock()
                    )
                    row.adjustments.append(current)
                current.patch = values_to_document(dict(values or {}))
                current.profile = profile
                current.reason = reason[:REASON_MAX]
                current.expires_at = expires_at

            changed = self._changed(
                s, row, put, target.name, check=lambda: svc._recheck(s, [row], driver)
            )
            if changed and audit:
                s.add(
                    audit_row(
                        svc.clock(), session, vm, source, reason[:REASON_MAX], changed, target.name
                    )
                )
            return changed

    def clear(
        self, session: str, vm: str, source: str, reason: str = "", nic: str = PRIMARY_NIC
    ) -> dict[str, Any]:
        """Remove ``source``'s adjustment of the VM's vNIC ``nic`` (nothing when it has
        none); return the fields whose effective value changed."""
        svc = self.service
        with svc.db.transaction() as s:
            row = svc._vm_row(s, session, vm)
            target = svc._nic_row(row, parse_nic_name(nic))
            current = [a for a in row.adjustments if a.source == source and a.nic == target.name]
            if not current:
                return {}
            changed = self._changed(s, row, lambda: _delete(s, current), target.name)
            if changed:
                why = reason or f"{source}'s adjustment removed"
                s.add(audit_row(svc.clock(), session, vm, source, why, changed, target.name))
            return changed

    def expire(self) -> list[tuple[str, str]]:
        """Delete adjustments whose time is up, auditing what that changed; return the
        VMs affected (their running vNICs need :meth:`Service.reapply`)."""
        svc = self.service
        now = svc.clock()
        affected: list[tuple[str, str]] = []
        with svc.db.transaction() as s:
            due = s.scalars(
                select(AdjustmentRow).where(
                    AdjustmentRow.expires_at.is_not(None), AdjustmentRow.expires_at <= now
                )
            ).all()
            for vm_id, nic in sorted({(a.vm_id, a.nic) for a in due}):
                row = s.get(VmRow, vm_id)
                assert row is not None
                mine = [a for a in due if a.vm_id == vm_id and a.nic == nic]
                # What the vNIC had with them (resolution ignores expired layers by time,
                # so resolve as of just before the earliest expiry).
                earliest = min(aware(a.expires_at) or now for a in mine)
                changed = self._changed(
                    s, row, functools.partial(_delete, s, mine), nic, before_at=earliest - _TICK
                )
                session = row.session.name
                if changed:
                    sources = ", ".join(sorted(a.source for a in mine))
                    s.add(audit_row(now, session, row.name, sources, "expired", changed, nic))
                if (session, row.name) not in affected:
                    affected.append((session, row.name))
        return affected

    def _changed(
        self,
        s: Session,
        row: VmRow,
        change: Callable[[], object],
        nic: str = PRIMARY_NIC,
        *,
        check: Callable[[], None] | None = None,
        before_at: datetime | None = None,
    ) -> dict[str, tuple[Any, Any]]:
        """Make ``change`` to the VM's adjustments; return the fields of vNIC ``nic``
        whose effective value it changed (effective as of ``before_at`` before it).
        ``check`` runs on the changed state first and may refuse it (it is a re-check,
        which also tells the VM's host); without one, the host is told here."""
        svc = self.service
        target = svc._nic_row(row, nic)
        before = values_to_document(svc._resolve(s, row, at=before_at, nic=target).values)
        change()
        s.flush()
        s.expire(row, ["adjustments"])
        if check is not None:
            check()
        else:
            svc._log_desired_of(s, row)
        return field_changes(before, values_to_document(svc._resolve(s, row, nic=target).values))

    def adjustments(self, session: str, vm: str | None = None) -> list[AdjustmentInfo]:
        svc = self.service
        with svc.db.reading() as s:
            srow = svc._session_row(s, session)
            rows = [svc._vm_row(s, session, vm)] if vm else list(srow.vms)
            return [
                AdjustmentInfo(
                    session=session,
                    vm=row.name,
                    source=a.source,
                    reason=a.reason,
                    profile=a.profile,
                    values=dict(a.patch),
                    expires_at=aware(a.expires_at),
                    created_at=aware(a.created_at) or a.created_at,
                    nic=a.nic,
                )
                for row in rows
                for a in row.adjustments
            ]

    def audit(
        self, session: str | None = None, vm: str | None = None, limit: int = 200
    ) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of ``session``, and ``vm``), newest first."""
        if not 1 <= limit <= 10000:
            raise InvalidInput.one("limit", limit, "a number of entries from 1 to 10000")
        with self.service.db.reading() as s:
            query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if session is not None:
                query = query.where(AuditRow.session == session)
            if vm is not None:
                query = query.where(AuditRow.vm == vm)
            return [
                AuditEntry(
                    r.id,
                    aware(r.at) or r.at,
                    r.session,
                    r.vm,
                    r.source,
                    r.reason,
                    dict(r.old),
                    dict(r.new),
                    r.nic,
                )
                for r in s.scalars(query)
            ]

    # ------------------------------------------------------------------ controller settings

    def controller(self, session: str) -> dict[str, Any]:
        """The session's controller document: ``{"rules": [...], "feedback": {...}}``."""
        with self.service.db.reading() as s:
            return dict(self.service._session_row(s, session).controller or {})

    def controllers(self) -> dict[str, dict[str, Any]]:
        """Every session's controller document, for sessions that have one."""
        with self.service.db.reading() as s:
            rows = s.scalars(select(SessionRow).where(SessionRow.controller.is_not(None)))
            return {r.name: dict(r.controller or {}) for r in rows}

    def set_controller(self, session: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the session's rules and feedback limits (validated; canonical form stored).

        A rule's ``network`` must be one of the session's networks (a rule on a network
        removed later matches no vNIC)."""
        canonical = canonical_controller(doc)
        with self.service.db.transaction() as s:
            row = self.service._session_row(s, session)
            networks = [n.name for n in row.networks]
            errors = [
                FieldError(
                    f"rules[{i}].network",
                    show_value(rule["network"]),
                    f"a network of session {session!r}: {', '.join(networks)}",
                )
                for i, rule in enumerate(canonical.get("rules", ()))
                if "network" in rule and rule["network"] not in networks
            ]
            if errors:
                raise InvalidInput(errors)
            row.controller = canonical or None
        return canonical

    def forget(self, session: str) -> None:
        """Drop the audit log of a session (``session delete`` keeps it unless asked)."""
        with self.service.db.transaction() as s:
            s.execute(delete(AuditRow).where(AuditRow.session == session))


def _delete(s: Session, rows: Sequence[AdjustmentRow]) -> None:
    for row in rows:
        s.delete(row)


def canonical_controller(doc: Any) -> dict[str, Any]:
    """Validate a controller document and return its canonical form."""
    from vnic.controller.feedback import parse_feedback_policy
    from vnic.controller.rules import parse_rules

    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise InvalidInput.one("controller", doc, "a mapping with rules and/or feedback")
    unknown = sorted(set(doc) - {"rules", "feedback"})
    if unknown:
        raise InvalidInput.one(f"controller.{unknown[0]}", doc[unknown[0]], "rules or feedback")
    out: dict[str, Any] = {}
    if doc.get("rules"):
        out["rules"] = [r.to_document() for r in parse_rules(doc["rules"], "rules")]
    if doc.get("feedback") is not None:
        out["feedback"] = parse_feedback_policy(doc["feedback"], "feedback").to_document()
    return out


SOURCES_EXPECTED = "user, feedback, rule:NAME or scenario:NAME"
#: Sources only the system writes: the controller's rules, scenarios, and the VMs'
#: feedback. An owner or admin writing one would have the audit log credit the
#: controller (or a VM) with their change.
SYSTEM_KINDS = ("rule", "scenario", "feedback")
#: The sources a person may write an adjustment under (API PUT, ``vnic vm adjust``).
USER_SOURCES = ("user",)


def parse_source(value: Any, path: str = "source") -> str:
    """A source name: ``user``, ``feedback``, or a kind and a name (``rule:boost``)."""
    text = value if isinstance(value, str) else ""
    kind, colon, name = text.partition(":")
    named = kind in ("rule", "scenario")
    if kind not in ("user", *SYSTEM_KINDS) or (named != bool(colon)):
        raise InvalidInput.one(path, value, SOURCES_EXPECTED)
    if named:
        try:
            parse_name(name, path)
        except InvalidInput:
            raise InvalidInput.one(
                path, value, SOURCES_EXPECTED + f" (NAME: {NAME_EXPECTED})"
            ) from None
    return text


def parse_user_source(value: Any, path: str = "source") -> str:
    """A source a person may write under: ``user``. The system's (``rule:*``,
    ``scenario:*``, ``feedback``) are refused, naming the allowed values; clearing one
    by hand stays possible (:meth:`Runtime.clear`, audited as removed by hand)."""
    source = parse_source(value, path)
    if source not in USER_SOURCES:
        raise InvalidInput.one(
            path,
            value,
            f"one of {', '.join(USER_SOURCES)}: rule:NAME, scenario:NAME and feedback are "
            "written only by the controller",
        )
    return source


def parse_reason(value: Any, path: str = "reason") -> str:
    """A reason given by a person: text of at most :data:`REASON_MAX` characters."""
    return check_text(value, path, REASON_MAX)
