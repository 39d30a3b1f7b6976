"""Helpers on store rows shared by the service's parts and the runtime adjustments.

The eager loads of a VM's relations, profile documents flattened and compared
field by field, audit rows, and the UTC reading of stored times.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import selectinload

from vnic.model.fields import FIELDS
from vnic.store.models import AdjustmentRow, AuditRow, NicRow, VmRow

#: What resolving many VMs reads of each, loaded in one query per relation, not per VM.
VM_RESOLVE_LOADS = (
    selectinload(VmRow.adjustments),
    selectinload(VmRow.nics).selectinload(NicRow.mac),
    selectinload(VmRow.nics).selectinload(NicRow.override_profile),
    selectinload(VmRow.nics).selectinload(NicRow.network),
)


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
    nic: str | None = None,
) -> AuditRow:
    """An audit entry; ``nic`` is recorded when it is not eth0 (None: eth0 or the VM)."""
    return AuditRow(
        at=at,
        session=session,
        vm=vm,
        nic=nic if nic and nic != "eth0" else None,
        source=source,
        reason=reason,
        old={p: old for p, (old, _) in fields.items()},
        new={p: new for p, (_, new) in fields.items()},
    )


def unexpired(row: AdjustmentRow, now: datetime) -> bool:
    until = aware(row.expires_at)
    return until is None or now < until


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment
