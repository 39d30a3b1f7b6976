"""Finding vnic's objects on this host, by name and owner tag: read-only.

A VM of a session may have objects in three places: its own namespace (a
netns VM), links and a guard jump in its session's namespace tagged with its
owner tag (found even when the VM namespace is gone), and processes and run
files of its delay engine. The finders here read each place once, whatever
the number of VMs; the drivers decide whose VMs they are.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from vnic.dataplane import delayd, nft
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_qdiscs
from vnic.errors import DataplaneError
from vnic.model.launch import NIC_NAME, PRIMARY_NIC, unit_vm
from vnic.plan import names

#: Session and VM names (see :mod:`vnic.model.session`); anything else is not vnic's.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_PROBE = re.compile(r"probe-(?:netem-)?\d+")


def is_namespace(name: str) -> bool:
    """Whether /run/netns/NAME is a mounted namespace, not just the file a killed
    :func:`~vnic.dataplane.namespaces.create` made before mounting onto it (entering
    such a file fails, so nothing can be inside)."""
    try:
        return os.stat(os.path.join(nsops.RUN_DIR, name)).st_dev == _nsfs_device()
    except FileNotFoundError:
        return False


def _nsfs_device() -> int:
    """The device of the namespace file system (every namespace file is on it)."""
    return os.stat("/proc/self/ns/net").st_dev


def parse_netns(name: str) -> tuple[str, str | None] | None:
    """``(session, vm)`` of a VM namespace, ``(session, None)`` of a session namespace, else None.

    The capability probe's throwaway namespaces (``vnic.probe-<pid>``,
    ``vnic.probe-netem-<pid>``) share the prefix but are not sessions: they
    belong to the probing process, which removes them itself.
    """
    parts = name.split(".")
    if len(parts) not in (2, 3) or parts[0] != names.PREFIX:
        return None
    if not all(_NAME.fullmatch(p) for p in parts[1:]):
        return None
    if len(parts) == 2 and _PROBE.fullmatch(parts[1]):
        return None
    return (parts[1], parts[2] if len(parts) == 3 else None)


def vm_of_tag(tag: str, session: str) -> str | None:
    """The VM named by owner tag ``tag`` if it is one of ``session``'s VMs (the tag of any of
    its vNICs: ``vnic:<session>/<vm>`` or ``vnic:<session>/<vm>.ethN``), else None."""
    prefix = names.owner_tag(session, "x")[:-1]
    return vm_of_unit(tag[len(prefix) :] if tag.startswith(prefix) else "")


def vm_of_unit(unit: str) -> str | None:
    """The VM of a host-side unit (``vm`` or ``vm.ethN``, see
    :func:`vnic.model.launch.link_unit`), or None if ``unit`` is not one."""
    vm, nic = unit_vm(unit)
    if not _NAME.fullmatch(vm) or not NIC_NAME.fullmatch(nic):
        return None
    if nic == PRIMARY_NIC and "." in unit:
        return None  # eth0's unit is the VM's name alone
    return vm


@dataclass(frozen=True)
class Link:
    """A link of a session namespace: index, alias, whether it is up, its master's name."""

    index: int
    alias: str | None
    up: bool
    master: str | None


def session_links(session_ns: str) -> dict[str, Link]:
    """Every link in ``session_ns`` by name, from one dump.

    ``ip -j`` rather than a pyroute2 dump: iproute2's C decoder is much faster
    than decoding every link in Python, and a session holds up to four links
    per VM.
    """
    proc = nsops.run_inside(
        session_ns, ["ip", "-j", "link", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot list the links of {session_ns}: {proc.stderr.strip()}")
    return {
        str(link["ifname"]): Link(
            index=int(link["ifindex"]),
            alias=str(link["ifalias"]) if "ifalias" in link else None,
            up="UP" in link.get("flags", []),
            master=str(link["master"]) if "master" in link else None,
        )
        for link in json.loads(proc.stdout or "[]")
    }


def _link_tags(session_ns: str) -> list[str]:
    """The aliases of every link in ``session_ns``, from one dump."""
    return [link.alias for link in session_links(session_ns).values() if link.alias is not None]


def vm_namespaces_by_session(only: str | None = None) -> dict[str, set[str]]:
    """The VM namespaces on the host (of session ``only``, or all), by session; a VM
    namespace counts whether or not it is mounted."""
    out: dict[str, set[str]] = {}
    for ns_name in nsops.listing():
        owner = parse_netns(ns_name)
        if owner is None or owner[1] is None or only not in (None, owner[0]):
            continue
        out.setdefault(owner[0], set()).add(owner[1])
    return out


def session_objects(only: str | None = None) -> dict[str, set[str]]:
    """Every session with a namespace or delay engine objects on the host (of ``only``, or
    all), mapped to the VMs with host-side objects in it: links and guard jumps tagged
    with the VM (in a mounted session namespace), the delay engine's processes and run
    files. A session namespace without any maps to an empty set (also a placeholder file
    a killed launch left, which holds nothing).

    Costs one link dump and one nft listing per session namespace and one scan of
    /proc, whatever the number of VMs.
    """
    out: dict[str, set[str]] = {}
    mounted = []
    for ns_name in nsops.listing():
        owner = parse_netns(ns_name)
        if owner is None or owner[1] is not None or only not in (None, owner[0]):
            continue
        out.setdefault(owner[0], set())
        if is_namespace(ns_name):
            mounted.append(owner[0])
    for session in mounted:
        ns_name = names.session_netns(session)
        try:
            tags = [*_link_tags(ns_name), *nft.jump_tags(ns_name)]
        except (OSError, DataplaneError):
            if is_namespace(ns_name):
                raise
            continue  # removed while we looked (a teardown running alongside)
        out[session].update(vm for vm in (vm_of_tag(t, session) for t in tags) if vm)
    engines = delayd.engine_processes().values()  # keyed by unit, as their run files
    for session, units in [*delayd.run_files().items(), *((s, {u}) for s, u in engines)]:
        if only in (None, session):
            vms = {vm_of_unit(u) for u in units}
            out.setdefault(session, set()).update(vm for vm in vms if vm)
    return out


def vm_namespaces() -> list[tuple[str, str]]:
    """(session, vm) of every VM namespace on the host (by its name's shape only)."""
    out = []
    for ns_name in nsops.listing():
        parts = ns_name.split(".")
        if len(parts) == 3 and parts[0] == names.PREFIX:
            out.append((parts[1], parts[2]))
    return out


def netem_devices(session_ns: str) -> set[str]:
    """Devices in ``session_ns`` with a netem qdisc (none when it cannot be read)."""
    if not nsops.exists(session_ns):
        return set()
    try:
        qdiscs = read_qdiscs(session_ns)
    except DataplaneError:
        return set()
    return {dev for dev, found in qdiscs.items() if any(k == "netem" for k, _ in found.values())}
