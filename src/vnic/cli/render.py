"""Tables and lines the ``vnic`` commands print: records of the service, ``doctor``'s
findings, ``top``'s live table. The benchmarks' tables are in :mod:`vnic.cli.render_bench`.

Each function returns a rich table or text lines and prints nothing: the command
decides where they go. Only rich's table is imported at start (typer's help uses it too).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from vnic.manager.auth import TokenInfo
    from vnic.manager.hosts import HostInfo
    from vnic.manager.results import (
        Explanation,
        NetworkInfo,
        ProfileInfo,
        RevisionInfo,
        SessionInfo,
        VmChange,
        VmInfo,
    )


def shown(value: Any) -> str:
    """A field's value for people: ``unset`` for None, compact JSON for mappings and lists."""
    if value is None:
        return "unset"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# ----------------------------------------------------------------------------- records


def profiles_table(infos: Sequence[ProfileInfo]) -> Table:
    table = Table("name", "rev", "description", "labels", "used by")
    for p in infos:
        table.add_row(
            p.name,
            str(p.revision),
            p.description,
            ",".join(f"{k}={v}" for k, v in p.labels.items()),
            str(len(p.users)),
        )
    return table


def history_table(revs: Sequence[RevisionInfo]) -> Table:
    table = Table("rev", "created", "document")
    for r in revs:
        doc = {k: v for k, v in r.document.items() if k != "name"}
        table.add_row(str(r.revision), r.created_at.isoformat(timespec="seconds"), json.dumps(doc))
    return table


def fields_table() -> Table:
    """Every profile field, its unit and what it does."""
    from vnic.model.fields import FIELDS

    table = Table("field", "unit", "meaning")
    for f in FIELDS.values():
        table.add_row(f.path, f.unit, f.doc)
    return table


def sessions_table(infos: Sequence[SessionInfo]) -> Table:
    table = Table("name", "network id", "default profile", "rules", "overrides", "vms")
    for s in infos:
        table.add_row(
            s.name,
            str(s.network_id),
            s.policy.default_profile or "-",
            str(len(s.policy.rules)),
            "allowed" if s.policy.overrides_allowed else "forbidden",
            str(len(s.vms)),
        )
    return table


def session_lines(info: SessionInfo) -> Iterator[str]:
    """A session's header, owner, overrides and rules, one line each."""
    yield f"session {info.name}  network id {info.network_id}"
    yield f"  networks: {', '.join(info.networks)}"
    yield f"  default profile: {info.policy.default_profile or '-'}"
    yield f"  owner: {info.owner or '-'} (besides admins)"
    yield f"  overrides: {'allowed' if info.policy.overrides_allowed else 'forbidden'}"
    if info.placement:
        labels = ",".join(f"{k}={v}" for k, v in (info.placement.get("labels") or {}).items())
        yield f"  placement: {info.placement.get('strategy', 'spread')}" + (
            f" on hosts with {labels}" if labels else ""
        )
    for i, r in enumerate(info.policy.rules):
        yield f"  rule #{i + 1}: {r.describe()} -> {r.profile}"


def _override(profile: str | None, patch: Any) -> str:
    text = profile or ""
    if patch:
        text = (text + " + " if text else "") + "patch"
    return text or "-"


def vms_table(vms: Sequence[VmInfo]) -> Table:
    """One row per VM (mac and override: eth0's) and a ``nics`` column: every vNIC as
    ``NIC@NETWORK``; a ``host`` column once some VM is placed on a host."""
    hosted = any(v.host for v in vms)
    table = Table(
        "vm", "role", "labels", "mac", "override", "nics", "state", *(["host"] if hosted else [])
    )
    for v in vms:
        table.add_row(
            v.name,
            v.role or "-",
            ",".join(f"{k}={val}" for k, val in v.labels.items()),
            v.mac or "-",
            _override(v.override_profile, v.override_patch),
            " ".join(f"{n.name}@{n.network}" for n in v.nics) or "-",
            f"{v.state} ({v.driver})" if v.driver else v.state,
            *([v.host or "-"] if hosted else []),
        )
    return table


def hosts_table(hosts: Sequence[HostInfo]) -> Table:
    """One row per hypervisor host: state, lease, capacity used, labels."""
    table = Table("host", "state", "underlay", "epoch", "vms", "vnics", "cpus", "labels")
    for h in hosts:
        state = h.state + (", cordoned" if h.cordoned else "")
        table.add_row(
            h.name,
            state,
            h.underlay or "-",
            str(h.epoch),
            str(h.vms),
            f"{h.used}/{h.vnics}",
            str(h.cpus),
            ",".join(f"{k}={v}" for k, v in h.labels.items()) or "-",
        )
    return table


def nics_table(vm: VmInfo) -> Table:
    """A VM's vNICs: network, MAC, addresses, override."""
    table = Table("nic", "network", "network id", "mac", "ipv4", "ipv6", "override")
    for n in vm.nics:
        table.add_row(
            n.name,
            n.network,
            str(n.network_id),
            n.mac or "-",
            n.ipv4 or "-",
            n.ipv6 or "-",
            _override(n.override_profile, n.override_patch),
        )
    return table


def networks_table(infos: Sequence[NetworkInfo]) -> Table:
    table = Table("network", "network id", "ipv4", "ipv6", "default profile", "vnics")
    for n in infos:
        table.add_row(
            n.name,
            str(n.network_id),
            n.ipv4,
            n.ipv6,
            n.default_profile or "(session's)",
            " ".join(n.nics) or "-",
        )
    return table


def nic_explanation_table(e: Explanation, nic: str, *, all_fields: bool = False) -> Table:
    """The effective profile of vNIC ``nic`` of ``e``: every field, its value and layer
    (fields nobody set left out unless ``all_fields``)."""
    eff = e.nics[nic]
    info = next((n for n in e.vm.nics if n.name == nic), None)
    revs = ", ".join(f"{n} r{r}" for n, r in sorted(eff.revisions.items())) or "built-in only"
    where = f"network {info.network}  mac {info.mac}  {info.ipv4}" if info else ""
    title = f"{e.vm.session}/{e.vm.name}/{nic}  {where}  profiles: {revs}"
    table = Table("field", "value", "source", title=title, title_justify="left")
    for path, value, source in eff.rows():
        if value == "-" and not all_fields and source.layer == "unset":
            continue
        table.add_row(path, value, str(source))
    return table


def change_lines(changes: Sequence[VmChange]) -> Iterator[str]:
    """One line per changed field of each running VM, then what the kernel got."""
    for c in changes:
        label = f"vm {c.session}/{c.vm}" + ("" if c.nic == "eth0" else f"/{c.nic}")
        if c.error:
            yield f"{label}: NOT changed: {c.error}"
            continue
        for path, (old, new) in c.fields.items():
            why = c.sources.get(path, "")
            yield f"{label}: {path} {shown(old)} -> {shown(new)}" + (f"  ({why})" if why else "")
        for line in c.kernel:
            yield f"  kernel: {line}"


def tokens_table(infos: Sequence[TokenInfo]) -> Table:
    """Tokens: name, role, creation time (secrets are never stored)."""
    table = Table("name", "role", "created")
    for t in infos:
        table.add_row(t.name, t.role, t.created_at.isoformat(timespec="seconds"))
    return table


def audit_table(entries: Sequence[Mapping[str, Any]]) -> Table:
    """Audit log entries as the API shows them (``at`` an ISO time or a datetime)."""
    table = Table("at", "vm", "source", "reason", "changes")
    for e in entries:
        changes = "; ".join(
            f"{p} {shown(e['old'].get(p))} -> {shown(e['new'].get(p))}" for p in e["new"]
        )
        at = e["at"] if isinstance(e["at"], str) else e["at"].isoformat()
        table.add_row(at[:23], f"{e['session']}/{e['vm']}", e["source"], e["reason"], changes)
    return table


def scenario_line(s: Mapping[str, Any]) -> str:
    slip = f", slip p99 {s['slip_p99_ms']} ms" if s.get("slip_p99_ms") is not None else ""
    error = f", error: {s['error']}" if s.get("error") else ""
    return (
        f"scenario {s['name']} ({s['session']}): {s['state']} at {s['position_s']} s, "
        f"{s['steps_applied']} steps applied{slip}{error}"
    )


# ----------------------------------------------------------------------------- top


def _rate(bps: float | None) -> str:
    """A rate for people: 3 significant digits, decimal units (0 and tiny rates included)."""
    if bps is None:
        return "-"
    for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g}{unit}"
    return f"{bps:.0f}bit"


def _drops(d: Mapping[str, Any]) -> str:
    parts = [f"{cause.replace('_', ' ')} {n}" for cause, n in d["drops"].items() if n]
    return ", ".join(parts) or "0"


def top_nics(stats: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every vNIC's sample of ``stats`` (the agent's documents, one per VM: each lists
    its vNICs under ``nics``; a document without, from an agent of the previous
    release, is its VM's one vNIC ``eth0``), by VM, then in the VM's vNIC order."""
    out: list[Mapping[str, Any]] = []
    for s in sorted(stats, key=lambda s: str(s["vm"])):
        out += s.get("nics") or [s]
    return out


def top_table(session: str, stats: list[dict[str, Any]]) -> Table:
    """``vnic top``'s table: one row per vNIC (``vm/nic``, its network), the rate measured
    and the profile's each way, drops by cause each way; titled with the time."""
    t = Table(
        "vm/nic",
        "network",
        "out now",
        "out profile",
        "in now",
        "in profile",
        "out drops",
        "in drops",
        "rtt",
        "rev",
        "drift",
        title=f"session {session} — {time.strftime('%H:%M:%S')}",
        title_justify="left",
    )
    for s in top_nics(stats):
        e, i = s["egress"], s["ingress"]
        rtt = s["latency_seconds"]
        t.add_row(
            f"{s['vm']}/{s.get('nic', 'eth0')}",
            str(s.get("network", "default")),
            _rate(e["rate_bps"]),
            _rate(e["profile_rate_bps"]) if e["profile_rate_bps"] else "unlimited",
            _rate(i["rate_bps"]),
            _rate(i["profile_rate_bps"]) if i["profile_rate_bps"] else "unlimited",
            _drops(e),
            _drops(i),
            f"{rtt * 1000:.2f} ms" if rtt is not None else "-",
            ",".join(f"{p} r{r}" for p, r in sorted(s["revisions"].items())),
            str(s["drift"]),
        )
    return t


# ----------------------------------------------------------------------------- doctor


def kernel_table(found_by_group: Mapping[str, Any]) -> Table:
    """What the kernel probe found (``doctor``'s ``kernel``): per group, what is available
    and what is missing; the congestion control algorithms and how each is chosen."""
    table = Table("kind", "available", "missing")
    congestion_control: Mapping[str, str] = found_by_group.get("congestion_control", {})
    for group, found in found_by_group.items():
        if group == "congestion_control" or not isinstance(found, Mapping):
            continue
        table.add_row(
            group,
            " ".join(k for k, v in found.items() if v) or "-",
            " ".join(k for k, v in found.items() if not v) or "-",
        )
    cc = ", ".join(f"{k} (by {v})" for k, v in congestion_control.items())
    table.add_row("tcp congestion control", cc, "-")
    return table


def driver_fields_table(capabilities: Sequence[Mapping[str, Any]]) -> Table:
    """Per driver (``doctor``'s ``drivers``: each a capabilities document, ``kind``,
    ``fields``, ``missing``): the fields it honours here, and those it cannot with what
    they need."""
    fields = Table("driver", "honours", "cannot honour here (needs)", title_justify="left")
    for driver_caps in capabilities:
        fields.add_row(
            str(driver_caps["kind"]),
            "\n".join(sorted(driver_caps["fields"])),
            "\n".join(f"{k}: {v}" for k, v in sorted(driver_caps["missing"].items())),
            end_section=True,
        )
    return fields


def qemu_table(report: Mapping[str, Any]) -> Table:
    """What the qemu driver needs here (``doctor``'s qemu report) and what was found."""
    table = Table("qemu driver needs", "here", "detail")
    accel = report["accelerator"]
    table.add_row("accelerator", accel["name"] or "undecided", accel["why"])
    binary = report["binary"]
    if binary["path"] is None:
        table.add_row("qemu-system-x86_64", "missing", "run scripts/install.sh")
    else:
        table.add_row("qemu-system-x86_64", binary["path"], binary["version"] or "-")
    image = report["image"]
    if image["directory"] is not None:
        info = image["info"]
        built = f"kernel {info.get('kernel', '?')}, built {info.get('built', '?')}"
        table.add_row("guest image", "built", f"{image['directory']}\n{built}")
    elif image["given"] is not None:
        table.add_row(
            "guest image", "missing", f"VNIC_VM_IMAGE={image['given']} has no vmlinuz or initrd.img"
        )
    else:
        table.add_row(
            "guest image",
            "not built",
            f"none for this build script in {image['cache']}: the first qemu launch "
            "builds it (seconds), or run scripts/install.sh",
        )
    return table


def vnic_engines_table(in_use: Sequence[Mapping[str, Any]]) -> Table:
    """The vNICs running here and their delay engine, with its counters if it has any."""
    vnics = Table("session", "vm", "engine", "detail")
    for row in in_use:
        detail = str(row.get("why") or "")
        counters = row.get("counters")
        if isinstance(counters, dict):
            detail += "\n" + (
                "; ".join(
                    f"{d}: held {c['held_frames']}, lost {c['dropped_loss']}, "
                    f"overflow {c['dropped_overflow']}, late {c['late']}"
                    for d, c in counters.items()
                )
                + f"; pid {row['pid']}, cpu {row['cpu_seconds']:.2f} s"
            )
        vnics.add_row(str(row["session"]), str(row["vm"]), str(row["engine"]), str(detail))
    return vnics
