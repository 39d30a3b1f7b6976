"""Per-vNIC metrics: samples read from the kernel, rendered as Prometheus text.

The pure part (:class:`DirectionSample`, :class:`VnicSample`, :func:`render`, and
:func:`vnic.agent.counters.direction_reading`) knows nothing of the kernel;
:class:`Collector` fills samples from what the data plane counts. A VM has one
sample per vNIC (``eth0`` first), each read from that vNIC's own host-side objects:
those of its one-vNIC slice (:meth:`LaunchRequest.per_nic`), named from the slice's
unit (the VM's name for ``eth0``, so a VM with one vNIC reads what it always read).
Per direction (the VM's: egress
= sent by the VM, ingress = received by it):

- bytes and packets (Ethernet frames, header included, as HTB counts them):
  the FIFO leaves under the direction's HTB classes, i.e. what left the
  shaper toward its destination. Where netem is the leaf, netem's counters;
  where the delay engine carries an unshaped direction, the engine's sent
  frames; where nothing shapes the direction, the host-side port's link
  counters (its receive side for egress, its transmit side for ingress);
- drops, by cause (see :data:`DROP_CAUSES` and ``docs/metrics.md``);
- rate: bytes between the last two collections, as bit/s;
- latency and drift: measured elsewhere (the latency probe, the drift
  read-back), passed in.

Counters only grow: a queue rebuilt by a profile change starts its kernel
counters at zero again, and the collector then carries the previous total on
(see :class:`_Totals`), so Prometheus never sees a reset while the agent runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vnic.agent import counters as kernel
from vnic.agent.counters import (
    DROP_CAUSES,
    LinkCounters,
    Reading,
    direction_reading,
    needs_links,
)
from vnic.dataplane import delayd, tc
from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.model.launch import DEFAULT_NETWORK, PRIMARY_NIC, LaunchRequest
from vnic.plan import names
from vnic.plan.model import Plan

__all__ = [
    "DROP_CAUSES",
    "FAMILIES",
    "Collector",
    "CountingDriver",
    "DirectionSample",
    "LinkCounters",
    "NicKey",
    "Reading",
    "VnicSample",
    "direction_reading",
    "needs_links",
    "render",
]

DIRECTIONS = ("egress", "ingress")

#: A vNIC: (session, VM, vNIC name), e.g. ``("lab", "a", "eth1")``.
NicKey = tuple[str, str, str]


@dataclass(frozen=True)
class DirectionSample:
    """One direction of one vNIC. Counters are totals since the agent first saw the vNIC."""

    #: Ethernet frame bytes delivered (header included)
    bytes: int = 0
    #: frames delivered
    packets: int = 0
    #: cause -> packets dropped (keys: :data:`DROP_CAUSES`)
    drops: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_CAUSES, 0))
    #: measured between the last two collections, bit/s (None on the first)
    rate_bps: float | None = None
    #: the profile's rate, bit/s (None = unlimited)
    profile_rate_bps: int | None = None


@dataclass(frozen=True)
class VnicSample:
    """Everything the agent reports about one vNIC at one collection."""

    session: str
    vm: str
    #: profile name -> revision the vNIC runs
    revisions: Mapping[str, int]
    egress: DirectionSample
    ingress: DirectionSample
    #: round trip vNIC <-> its network's switch, seconds (None: no answer or not measured yet)
    latency_seconds: float | None = None
    #: differences between desired and read-back kernel state of this vNIC (0 = as planned)
    drift: int = 0
    #: the vNIC's name in the VM (``eth0``, ``eth1``...)
    nic: str = PRIMARY_NIC
    #: the session's network the vNIC is on
    network: str = DEFAULT_NETWORK

    def direction(self, name: str) -> DirectionSample:
        return self.egress if name == "egress" else self.ingress


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Family:
    """One metric family: its name, Prometheus type and HELP text (which states the unit)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]


_NIC = ("session", "vm", "nic")
_DIR = ("session", "vm", "nic", "direction")

#: Every family the agent exposes, in output order (docs/metrics.md documents each).
FAMILIES: tuple[Family, ...] = (
    Family("vnic_vnics", "gauge", "vNICs this agent reports.", ()),
    Family(
        "vnic_bytes_total",
        "counter",
        "Ethernet frame bytes the vNIC delivered, by direction (VM's view).",
        _DIR,
    ),
    Family("vnic_packets_total", "counter", "Frames the vNIC delivered, by direction.", _DIR),
    Family(
        "vnic_drops_total",
        "counter",
        "Packets dropped on the host side, by direction and cause.",
        (*_DIR, "cause"),
    ),
    Family(
        "vnic_rate_bits_per_second",
        "gauge",
        "Measured rate in bit/s between the agent's last two collections.",
        _DIR,
    ),
    Family(
        "vnic_profile_rate_bits_per_second",
        "gauge",
        "The profile's rate in bit/s (absent: unlimited).",
        _DIR,
    ),
    Family(
        "vnic_latency_seconds",
        "gauge",
        "Round trip in seconds of the active probe between the vNIC and its network's switch.",
        _NIC,
    ),
    Family(
        "vnic_profile_revision",
        "gauge",
        "Revision of each profile the vNIC runs.",
        (*_NIC, "profile"),
    ),
    Family(
        "vnic_drift",
        "gauge",
        "Differences between the desired and the read-back kernel state of the vNIC.",
        _NIC,
    ),
)


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def format_value(value: float) -> str:
    """A sample value in the text format (integers exact, floats round-trip, +Inf/-Inf/NaN)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(samples: Iterable[VnicSample], *, extra_lines: Iterable[str] = ()) -> str:
    """Prometheus text exposition (format 0.0.4) of ``samples``.

    HELP and TYPE once per family, then every series of it; families with no
    series still get their HELP and TYPE. ``extra_lines`` (complete lines of
    the same format, their own HELP/TYPE included, no newline) are appended
    as given: the agent's own metrics.
    """
    samples = list(samples)
    # One list per family, filled in a single pass; label prefixes are built once
    # per vNIC and direction (the hot path: ~20 series per vNIC).
    vnics = [f"vnic_vnics {len(samples)}"]
    nbytes: list[str] = []
    packets: list[str] = []
    drops: list[str] = []
    rates: list[str] = []
    profile_rates: list[str] = []
    latency: list[str] = []
    revisions: list[str] = []
    drift: list[str] = []
    for s in samples:
        base = (
            f'session="{escape_label(s.session)}",vm="{escape_label(s.vm)}"'
            f',nic="{escape_label(s.nic)}"'
        )
        for d, ds in (("egress", s.egress), ("ingress", s.ingress)):
            lab = f'{{{base},direction="{d}"'
            nbytes.append(f"vnic_bytes_total{lab}}} {ds.bytes}")
            packets.append(f"vnic_packets_total{lab}}} {ds.packets}")
            counts = ds.drops
            for cause in DROP_CAUSES:
                drops.append(f'vnic_drops_total{lab},cause="{cause}"}} {counts.get(cause, 0)}')
            if ds.rate_bps is not None:
                rates.append(f"vnic_rate_bits_per_second{lab}}} {format_value(ds.rate_bps)}")
            if ds.profile_rate_bps is not None:
                profile_rates.append(
                    f"vnic_profile_rate_bits_per_second{lab}}} {ds.profile_rate_bps}"
                )
        if s.latency_seconds is not None:
            latency.append(f"vnic_latency_seconds{{{base}}} {format_value(s.latency_seconds)}")
        for profile, revision in sorted(s.revisions.items()):
            revisions.append(
                f'vnic_profile_revision{{{base},profile="{escape_label(profile)}"}} {revision}'
            )
        drift.append(f"vnic_drift{{{base}}} {s.drift}")
    series = dict(
        zip(
            [f.name for f in FAMILIES],
            [vnics, nbytes, packets, drops, rates, profile_rates, latency, revisions, drift],
            strict=True,
        )
    )
    out: list[str] = []
    for f in FAMILIES:
        out.append(f"# HELP {f.name} {f.help}")
        out.append(f"# TYPE {f.name} {f.kind}")
        out.extend(series[f.name])
    out.extend(extra_lines)
    out.append("")  # the format ends every line, the last one included, with \n
    return "\n".join(out)


# ----------------------------------------------------------------------------- collecting


@runtime_checkable
class CountingDriver(Protocol):
    """What the collector needs of a driver (:class:`vnic.drivers.netns.NetnsDriver`).

    Both take one vNIC: ``plan_for`` its one-vNIC slice (whose devices are named from
    the slice's unit), ``engine_stats`` its unit (the VM's name for ``eth0``)."""

    def plan_for(self, request: LaunchRequest) -> Plan: ...

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None: ...


class _Totals:
    """Kernel totals made monotone, and rates from them. Pure; the clock is passed in.

    A kernel counter that goes down was reset (its queue was rebuilt): the last
    total is carried on as an offset, so what is reported never decreases. Keys
    start with (session, unit): one vNIC.
    """

    def __init__(self) -> None:
        #: (session, unit, direction, counter) -> (last raw value, offset)
        self._raw: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        #: (session, unit, direction) -> (time, reported bytes) of the last collection
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def total(self, key: tuple[str, str, str, str], raw: int) -> int:
        last, offset = self._raw.get(key, (0, 0))
        if raw < last:
            offset += last
        self._raw[key] = (raw, offset)
        return raw + offset

    def rate(self, key: tuple[str, str, str], now: float, nbytes: int) -> float | None:
        """bit/s since the previous call for ``key`` (None on the first, or if time stood still)."""
        last = self._last.get(key)
        self._last[key] = (now, nbytes)
        if last is None or now <= last[0]:
            return None
        return (nbytes - last[1]) * 8 / (now - last[0])

    def forget(self, keep: Callable[[str, str], bool]) -> None:
        """Drop the state of vNICs for which ``keep(session, unit)`` is false."""
        self._raw = {k: v for k, v in self._raw.items() if keep(k[0], k[1])}
        self._last = {k: v for k, v in self._last.items() if keep(k[0], k[1])}


class Collector:
    """Reads the counters of many vNICs: per session namespace one qdisc dump, one
    nftables dump and (only if a vNIC has an unshaped direction) one link dump.

    Keeps the previous reading of each vNIC to turn byte counters into rates and
    to carry totals over counter resets; ``clock`` (monotonic seconds) is
    injectable for tests. Not thread-safe: one caller at a time (the agent's
    monitor serialises scrapes), because every call moves the rate window.
    """

    def __init__(self, driver: object, clock: Callable[[], float] = time.monotonic) -> None:
        # Typed loosely so any registered driver can be offered; only those that
        # plan vNICs and count them on this host can be collected from.
        if not isinstance(driver, CountingDriver):
            raise TypeError(
                f"the {type(driver).__name__} has no kernel counters to collect"
                " (needs plan_for and engine_stats)"
            )
        self.driver: CountingDriver = driver
        self.clock = clock
        #: (session, unit) -> (the vNIC's one-vNIC slice, its plan)
        self._plans: dict[tuple[str, str], tuple[LaunchRequest, Plan]] = {}
        self._totals = _Totals()

    def plan(self, nic: LaunchRequest) -> Plan:
        """The plan of a one-vNIC slice, compiled once per distinct slice."""
        key = (nic.session, nic.unit)
        cached = self._plans.get(key)
        if cached is not None and (cached[0] is nic or cached[0] == nic):
            return cached[1]
        plan = self.driver.plan_for(nic)
        self._plans[key] = (nic, plan)
        return plan

    def collect(
        self,
        requests: Sequence[LaunchRequest],
        *,
        drift: Mapping[NicKey, int] | None = None,
        latency: Mapping[NicKey, float | None] | None = None,
    ) -> list[VnicSample]:
        """A sample per vNIC of each request whose session namespace exists, in session,
        then request, then vNIC order.

        VMs of a session whose namespace is gone get no sample (their vNICs no
        longer exist, and zeros would read as a counter reset); a vNIC whose VM
        namespace or engine is gone reports its last totals, and one whose objects
        were never built (absent from every dump) reports zeros. ``drift`` and
        ``latency`` (seconds) are keyed by (session, vm, nic); missing = 0 / None.
        """
        drift = drift or {}
        latency = latency or {}
        by_session: dict[str, list[LaunchRequest]] = {}
        for r in requests:
            # A one-vNIC request is its own slice: kept as is, the plan cache hits by identity.
            by_session.setdefault(r.session, []).extend(r.per_nic() if len(r.nics) > 1 else (r,))
        present = set(nsops.listing())
        out: list[VnicSample] = []
        for session, nics in sorted(by_session.items()):
            session_ns = names.session_netns(session)
            if session_ns not in present:
                continue
            now = self.clock()
            try:
                samples = self._session(session_ns, nics, drift, latency, now)
            except DataplaneError:
                continue  # the namespace went away while it was read
            out += samples
        # Forget the vNICs of these sessions that were not asked for (destroyed);
        # other sessions' state stays, since a caller may collect one session only.
        wanted = {(n.session, n.unit) for nics in by_session.values() for n in nics}
        if any(k[0] in by_session and k not in wanted for k in self._plans):
            self._totals.forget(lambda s, unit: s not in by_session or (s, unit) in wanted)
            self._plans = {
                k: v for k, v in self._plans.items() if k[0] not in by_session or k in wanted
            }
        return out

    def _session(
        self,
        session_ns: str,
        nics: Sequence[LaunchRequest],
        drift: Mapping[NicKey, int],
        latency: Mapping[NicKey, float | None],
        now: float,
    ) -> list[VnicSample]:
        """Samples of ``nics`` (one-vNIC slices of the session's VMs) from one set of dumps."""
        plans = [self.plan(n) for n in nics]
        counters = tc.read_class_counters(session_ns)
        guards = kernel.guard_drops_by_unit(
            kernel.read_guard_drops(session_ns), [n.unit for n in nics]
        )
        links = kernel.read_link_counters(session_ns) if any(map(needs_links, plans)) else {}
        out = []
        for n, plan in zip(nics, plans, strict=True):
            # A driver that plans every vNIC on the VM's own links (one that builds eth0
            # only) would have this vNIC read eth0's objects: it has none of its own.
            own = plan.devices.port == names.VmLinks.of(n.unit).port
            engine = self._engine(n) if own and plan.engine is not None else None
            dirs = {}
            for d in DIRECTIONS:
                raw = (
                    direction_reading(
                        plan,
                        d,
                        counters,
                        engine.directions.get(d, {}) if engine is not None else None,
                        links,
                        guards.get(n.unit, 0),
                    )
                    if own
                    else Reading(0, 0, dict.fromkeys(DROP_CAUSES, 0))
                )
                dirs[d] = self._sample(n, d, raw, now)
            key = (n.session, n.vm, n.nic)
            out.append(
                VnicSample(
                    session=n.session,
                    vm=n.vm,
                    revisions=dict(n.revisions),
                    egress=dirs["egress"],
                    ingress=dirs["ingress"],
                    latency_seconds=latency.get(key),
                    drift=drift.get(key, 0),
                    nic=n.nic,
                    network=n.network,
                )
            )
        return out

    def _engine(self, nic: LaunchRequest) -> delayd.EngineStats | None:
        try:
            return self.driver.engine_stats(nic.session, nic.unit)
        except (OSError, ValueError):
            return None  # the engine stopped while its counters were read

    def _sample(
        self, n: LaunchRequest, direction: str, raw: Reading, now: float
    ) -> DirectionSample:
        t = self._totals
        unit = n.unit
        nbytes = t.total((n.session, unit, direction, "bytes"), raw.bytes)
        packets = t.total((n.session, unit, direction, "packets"), raw.packets)
        drops = {c: t.total((n.session, unit, direction, c), raw.drops[c]) for c in DROP_CAUSES}
        rate = n.profile.direction(direction).rate
        return DirectionSample(
            bytes=nbytes,
            packets=packets,
            drops=drops,
            rate_bps=t.rate((n.session, unit, direction), now, nbytes),
            profile_rate_bps=int(rate.value) if rate is not None else None,
        )
