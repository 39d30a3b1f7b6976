"""The public JSON shape of every service result, shared by the API and the CLI.

One function per view, so ``vnic ... --json`` and the REST API print the
same object for the same thing, and the remote client can read it back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from vnic.manager.auth import TokenInfo
from vnic.manager.hosts import HostInfo
from vnic.manager.results import (
    ApplyResult,
    Explanation,
    NetworkInfo,
    NicInfo,
    ProfileInfo,
    RevisionInfo,
    SessionInfo,
    VmChange,
    VmInfo,
)


def utc(moment: datetime) -> datetime:
    """Times as UTC with their offset (SQLite hands them back without one)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def profile_json(p: ProfileInfo) -> dict[str, Any]:
    return {
        "name": p.name,
        "revision": p.revision,
        "description": p.description,
        "labels": dict(p.labels),
        "document": dict(p.document),
        "created_at": utc(p.created_at),
        "updated_at": utc(p.updated_at),
        "used_by": list(p.users),
    }


def revision_json(r: RevisionInfo) -> dict[str, Any]:
    return {"revision": r.revision, "created_at": utc(r.created_at), "document": dict(r.document)}


def apply_json(r: ApplyResult) -> dict[str, Any]:
    return {"name": r.name, "action": r.action, "revision": r.revision}


def session_json(s: SessionInfo) -> dict[str, Any]:
    return {
        "name": s.name,
        "network_id": s.network_id,
        "default_profile": s.policy.default_profile,
        "rules": [r.to_document() for r in s.policy.rules],
        "overrides_allowed": s.policy.overrides_allowed,
        "owner": s.owner,
        "vms": list(s.vms),
        "networks": list(s.networks),
        "placement": dict(s.placement) if s.placement else None,
        "created_at": utc(s.created_at),
    }


def network_json(n: NetworkInfo) -> dict[str, Any]:
    return {
        "session": n.session,
        "name": n.name,
        "network_id": n.network_id,
        "ipv4": n.ipv4,
        "ipv6": n.ipv6,
        "default_profile": n.default_profile,
        "nics": list(n.nics),
    }


def nic_json(n: NicInfo) -> dict[str, Any]:
    return {
        "name": n.name,
        "network": n.network,
        "network_id": n.network_id,
        "mac": n.mac,
        "ipv4": n.ipv4,
        "ipv6": n.ipv6,
        "override_profile": n.override_profile,
        "override_patch": n.override_patch,
    }


def vm_json(v: VmInfo) -> dict[str, Any]:
    return {
        "session": v.session,
        "name": v.name,
        "role": v.role,
        "labels": dict(v.labels),
        "needs": list(v.needs),
        "override_profile": v.override_profile,
        "override_patch": v.override_patch,
        "mac": v.mac,
        "ipv4": v.ipv4,
        "ipv6": v.ipv6,
        "state": v.state,
        "driver": v.driver,
        "nics": [nic_json(n) for n in v.nics],
        "host": v.host,
    }


def explain_json(e: Explanation) -> dict[str, Any]:
    """``effective`` is eth0's (as before VMs had several vNICs); ``nics`` has every
    vNIC's, eth0 first, each with its identity."""
    by_name = {n.name: n for n in e.vm.nics}
    return {
        "vm": vm_json(e.vm),
        "effective": e.effective.to_dict(),
        "nics": [
            {
                **(nic_json(by_name[name]) if name in by_name else {"name": name}),
                "effective": eff.to_dict(),
            }
            for name, eff in e.nics.items()
        ],
    }


def change_json(c: VmChange) -> dict[str, Any]:
    return {
        "session": c.session,
        "vm": c.vm,
        "fields": {
            path: {"old": old, "new": new, "source": c.sources.get(path, "")}
            for path, (old, new) in c.fields.items()
        },
        "kernel": list(c.kernel),
        "error": c.error,
        "nic": c.nic,
    }


def change_from_json(d: dict[str, Any]) -> VmChange:
    """The inverse of :func:`change_json` (the remote client reads changes back)."""
    fields = d.get("fields") or {}
    return VmChange(
        session=d["session"],
        vm=d["vm"],
        fields={p: (f.get("old"), f.get("new")) for p, f in fields.items()},
        sources={p: str(f.get("source", "")) for p, f in fields.items()},
        kernel=list(d.get("kernel") or []),
        error=d.get("error"),
        nic=str(d.get("nic") or "eth0"),
    )


def token_json(t: TokenInfo) -> dict[str, Any]:
    return {"name": t.name, "role": t.role, "created_at": utc(t.created_at)}


def encode(value: Any) -> Any:
    """``json.dumps`` default: datetimes as ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def host_json(h: HostInfo) -> dict[str, Any]:
    return {
        "name": h.name,
        "state": h.state,
        "cordoned": h.cordoned,
        "labels": dict(h.labels),
        "underlay": h.underlay,
        "capacity": {"vnics": h.vnics, "cpus": h.cpus},
        "epoch": h.epoch,
        "lease_until": h.lease_until.isoformat() if h.lease_until else None,
        "metrics_url": h.metrics_url,
        "vms": h.vms,
        "vnics_used": h.used,
    }
