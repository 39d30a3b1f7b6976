"""A session's networks across hosts: VXLAN devices, their FDB, the host's filter (root).

:func:`ensure` makes one session's overlays on this host exactly the ones given
(names, the filter and the wire form: :mod:`vnic.plan.overlay`); :func:`remove` takes
the session's filter out of the host's namespace (its devices go with the session
namespace). Runs in the host's own network namespace, the underlay's: the VXLAN
device is made from here, so its UDP socket lives here, and placed straight into the
session namespace (``IFLA_NET_NS_FD`` on creation: the same as making it here and
moving it, without a moment where its name could meet another session's).

Everything is checked before anything changes: the underlay's family, and every vNIC's
MTU against the underlay's (the device of the route to each peer; the one holding
the local address when there is no peer), so a refusal leaves the host as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import namespaces as nsops
from vnic.dataplane.inventory import is_namespace
from vnic.errors import DataplaneError, InvalidInput
from vnic.plan import names
from vnic.plan import overlay as plan
from vnic.plan.overlay import Address, Overlay
from vnic.settings import Settings

#: The all-zero MAC: the FDB entry that floods (broadcast, multicast, unknown) to a peer.
ZERO_MAC = "00:00:00:00:00:00"
#: The MTU assumed of a vNIC whose network has no vNIC on this host (the default's).
DEFAULT_VNIC_MTU = 1500
TIMEOUT = 30.0


def ensure(
    session: str,
    overlays: Sequence[Overlay],
    underlay: str,
    vnic_mtus: Mapping[str, int],
) -> list[str]:
    """Make ``session``'s overlays here exactly ``overlays`` (``[]``: none); what changed,
    one line each. ``underlay``: this host's underlay address (the devices' ``local``);
    ``vnic_mtus``: the largest vNIC MTU (bytes) of each network on this host.

    InvalidInput (nothing changed) for a peer of another family than the underlay or a
    vNIC MTU the underlay cannot carry; DataplaneError for what the kernel refused.
    Without the session namespace (no VM of the session here) nothing is made and the
    session's filter is removed: the caller keeps ``overlays`` and calls again once a
    VM of the session is launched here."""
    local = _parse_underlay(underlay)
    plan.check_family(overlays, local)
    with IPRoute() as ipr:
        underlay_of = Underlay(ipr)
        mtus = {
            o.network: _check_mtu(o, i, local, vnic_mtus, underlay_of)
            for i, o in enumerate(overlays)
        }
    session_ns = names.session_netns(session)
    with _table_lock():
        mounted = is_namespace(session_ns)
        here = _with_bridge(session_ns, overlays) if mounted else []
        if not here:
            gone = _ensure_devices(session, session_ns, [], local, mtus) if mounted else []
            return gone + _remove(session)
        before = _read_table()
        fresh = before is None or plan.chain_of(session) not in before["chains"]
        # The filter first: no moment where a device takes frames from anyone.
        changes = _ensure_filter(session, here, before)
        try:
            changes += _ensure_devices(session, session_ns, here, local, mtus)
        except BaseException:
            if fresh:
                _remove(session)  # a failed first ensure leaves no filter either
            raise
        return changes


def remove(session: str) -> list[str]:
    """Take ``session``'s chain and sets out of the host's table, and the table when no
    session has one left (idempotent; exactly the session's own names)."""
    with _table_lock():
        return _remove(session)


def sessions() -> set[str]:
    """The sessions with a filter in the host's table (a teardown killed between removing
    the namespace and the filter leaves one: the host's cleanup finds it here)."""
    table = _read_table()
    chains = table["chains"] if table else []
    return {c.removeprefix("ov.") for c in chains if c.startswith("ov.")}


@contextlib.contextmanager
def _table_lock() -> Iterator[None]:
    """One change of the host's table at a time, across this host's processes: the
    table is deleted with its last chain, which must not race another session's ensure.
    ``flock`` on the data plane's run directory itself: no file of its own to leave."""
    directory = Settings.from_env().runtime_dir
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _with_bridge(session_ns: str, overlays: Sequence[Overlay]) -> list[Overlay]:
    """The overlays of networks with a bridge here (a vNIC of the network on this host);
    the others wait, as a session without a namespace does."""
    with nsops.opened(session_ns) as ns:
        return [o for o in overlays if nsops.find_link(ns, names.bridge_of(o.network))]


def _remove(session: str) -> list[str]:
    table = _read_table()
    if table is None:
        return []
    chain = plan.chain_of(session)
    mine = [s for s in table["elements"] if plan.is_set_of(s, session)]
    lines = [f"delete chain inet {plan.TABLE} {chain}"] if chain in table["chains"] else []
    lines += [f"delete set inet {plan.TABLE} {s}" for s in mine]
    if not [c for c in table["chains"] if c != chain]:
        lines = [f"delete table inet {plan.TABLE}"]  # no other session's: all of it is ours
    if lines:
        _nft("\n".join(lines) + "\n", f"removing session {session}'s overlay filter")
    return [f"removed filter {chain}"] if chain in table["chains"] or mine else []


class Underlay:
    """The underlay's MTU towards each peer, read over one netlink socket (a full reconcile
    asks about every peer of every session: no process per peer), each peer once."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr
        self._seen: dict[Address, int] = {}

    def mtu_to(self, peer: Address) -> int:
        """Bytes: the MTU of the device the route to ``peer`` leaves by (the route's own
        when lower)."""
        if peer not in self._seen:
            try:
                (route,) = self.ipr.route("get", dst=str(peer))
            except NetlinkError as exc:
                raise DataplaneError(f"no route to overlay peer {peer}: {exc}") from exc
            mtu = self._link_mtu(route.get_attr("RTA_OIF"))
            metrics = route.get_attr("RTA_METRICS")
            own = metrics.get_attr("RTAX_MTU") if metrics is not None else None
            self._seen[peer] = min(mtu, own) if own else mtu
        return self._seen[peer]

    def mtu_at(self, local: Address) -> int:
        """Bytes: the MTU of the device holding ``local`` (a network with no peer yet)."""
        found = self.ipr.get_addr(address=str(local))
        if not found:
            raise InvalidInput.one("underlay", str(local), "an address of this host")
        return self._link_mtu(found[0]["index"])

    def _link_mtu(self, index: int) -> int:
        (link,) = self.ipr.link("get", index=index)
        return int(link.get_attr("IFLA_MTU"))


def _parse_underlay(underlay: str) -> Address:
    try:
        return ipaddress.ip_address(underlay)
    except ValueError:
        raise InvalidInput.one(
            "underlay", underlay, "this host's underlay IPv4 or IPv6 address"
        ) from None


def _check_mtu(
    o: Overlay, index: int, local: Address, vnic_mtus: Mapping[str, int], underlay: Underlay
) -> int:
    """The MTU the network's VXLAN device gets (the underlay's less the overhead); the
    field-named refusal when the network's vNICs need more."""
    carried = min([underlay.mtu_to(p) for p in o.peers] or [underlay.mtu_at(local)])
    vnic = vnic_mtus.get(o.network, DEFAULT_VNIC_MTU)
    if vnic + plan.overhead(local) > carried:
        raise plan.mtu_error(vnic, carried, local.version, f"overlays[{index}].mtu")
    return carried - plan.overhead(local)


def _ensure_filter(
    session: str, overlays: Sequence[Overlay], before: dict[str, Any] | None
) -> list[str]:
    """The session's chain and sets exactly as ``overlays`` need (``before``: the table as
    it was); what changed."""
    _nft(plan.filter_script(session, overlays), f"session {session}'s overlay filter")
    had = before["elements"] if before else {}
    stale = plan.stale_sets(session, list(had), overlays)
    if stale:
        script = "".join(f"delete set inet {plan.TABLE} {s}\n" for s in stale)
        _nft(script, f"session {session}'s old overlay sets")
    chain = plan.chain_of(session)
    changes = [] if before and chain in before["chains"] else [f"made filter {chain}"]
    for o in overlays:
        for family in (4, 6):
            name = plan.set_of(session, o.vni, family)
            want = {str(p) for p in o.peers if p.version == family}
            old = had.get(name, set())
            if want != old:
                changes.append(f"filter {name}: +{len(want - old)} -{len(old - want)}")
    changes += [f"removed filter set {s}" for s in stale]
    return changes


def _ensure_devices(
    session: str,
    session_ns: str,
    overlays: Sequence[Overlay],
    local: Address,
    mtus: Mapping[str, int],
) -> list[str]:
    """The session's overlay devices exactly ``overlays``, each with its FDB; what changed.
    A device made here is deleted again when a later step fails (nothing half-built)."""
    changes: list[str] = []
    made: list[str] = []
    try:
        with nsops.opened(session_ns) as ns:
            changes += _drop_others(ns, session, overlays, local)
            for o in overlays:
                if nsops.find_link(ns, o.device) is None:
                    _create(o, session_ns, local)
                    made.append(o.device)
                    changes.append(f"made {o.device} (network {o.network}, vni {o.vni})")
                ns.link(
                    "set",
                    index=nsops.link_index(ns, o.device),
                    ifalias=plan.alias_of(session, o.network),
                    mtu=mtus[o.network],
                    master=nsops.link_index(ns, names.bridge_of(o.network)),
                    state="up",
                )
        for o in overlays:
            changes += _ensure_fdb(session_ns, o)
    except BaseException as exc:
        with nsops.opened(session_ns) as ns:
            for name in made:
                index = nsops.find_link(ns, name)
                if index is not None:
                    ns.link("del", index=index)
        if isinstance(exc, NetlinkError):
            raise DataplaneError(f"cannot make session {session}'s overlay devices: {exc}") from exc
        raise
    return changes


def _drop_others(ns: Any, session: str, overlays: Sequence[Overlay], local: Address) -> list[str]:
    """Delete the session's overlay devices ``overlays`` does not want as they are: tagged
    with another network, or with one of its names but not its VNI, port or address
    (also untagged: an ensure killed between making and tagging it)."""
    wanted = {o.device: o for o in overlays}
    changes = []
    for link in ns.get_links():
        name = link.get_attr("IFLA_IFNAME")
        alias = link.get_attr("IFLA_IFALIAS") or None
        network = plan.network_of_alias(alias, session)
        if network is None and not (alias is None and name in wanted):
            continue  # not an overlay device of this session
        o = wanted.get(name)
        if o is None or network not in (None, o.network) or not _same(link, o, local):
            ns.link("del", index=link["index"])
            changes.append(f"removed {name} ({network or 'untagged'})")
    return changes


def _same(link: Any, o: Overlay, local: Address) -> bool:
    """Whether an existing device is the one ``o`` needs (VNI, port, local address)."""
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if data is None:
        return False
    key = "IFLA_VXLAN_LOCAL" if local.version == 4 else "IFLA_VXLAN_LOCAL6"
    return (
        data.get_attr("IFLA_VXLAN_ID") == o.vni
        and data.get_attr("IFLA_VXLAN_PORT") == plan.VXLAN_PORT
        and str(data.get_attr(key)) == str(local)
    )


def _create(o: Overlay, session_ns: str, local: Address) -> None:
    """The device, made from the host's namespace (its socket's) into the session's."""
    spec: dict[str, Any] = {
        "ifname": o.device,
        "kind": "vxlan",
        "vxlan_id": o.vni,
        "vxlan_port": plan.VXLAN_PORT,
        "vxlan_learning": 0,
        "net_ns_fd": session_ns,
    }
    spec["vxlan_local" if local.version == 4 else "vxlan_local6"] = str(local)
    with IPRoute() as ipr:
        ipr.link("add", **spec)


def _ensure_fdb(session_ns: str, o: Overlay) -> list[str]:
    """The device's FDB: a zero entry per peer and a static entry per remote MAC, exactly."""
    dev = o.device
    proc = nsops.run_inside(
        session_ns,
        ["bridge", "-j", "fdb", "show", "dev", dev],
        capture_output=True,
        timeout=TIMEOUT,
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot read the FDB of {dev}: {proc.stderr.strip()}")
    have = {(e["mac"], e["dst"]) for e in json.loads(proc.stdout or "[]") if "dst" in e}
    want = {(ZERO_MAC, str(p)) for p in o.peers} | {(str(m), str(p)) for m, p in o.macs}
    batch = [f"fdb del {m} dev {dev} dst {d}" for m, d in sorted(have - want)]
    batch += [f"fdb append {m} dev {dev} dst {d} self permanent" for m, d in sorted(want - have)]
    if not batch:
        return []
    done = nsops.run_inside(
        session_ns,
        ["bridge", "-batch", "-"],
        input="\n".join(batch) + "\n",
        capture_output=True,
        timeout=TIMEOUT,
    )
    if done.returncode != 0:
        raise DataplaneError(f"cannot set the FDB of {dev}: {done.stderr.strip()}")
    return [f"fdb {dev}: +{len(want - have)} -{len(have - want)}"]


def _read_table() -> dict[str, Any] | None:
    """The host's overlay table: ``chains`` (names) and ``elements`` (each set's, by name);
    None if the table is not there."""
    proc = subprocess.run(
        ["nft", "-j", "list", "table", "inet", plan.TABLE],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if proc.returncode != 0:
        if "No such file" in proc.stderr:
            return None
        raise DataplaneError(f"cannot read table inet {plan.TABLE}: {proc.stderr.strip()}")
    items = json.loads(proc.stdout).get("nftables", [])
    return {
        "chains": [i["chain"]["name"] for i in items if "chain" in i],
        "elements": {
            i["set"]["name"]: {str(e) for e in i["set"].get("elem", [])}
            for i in items
            if "set" in i
        },
    }


def _nft(script: str, what: str) -> None:
    proc = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=TIMEOUT
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot apply {what}: {proc.stderr.strip()}")
