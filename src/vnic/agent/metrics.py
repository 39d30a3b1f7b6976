"""Per-vNIC metrics: samples read from the kernel, rendered as Prometheus text.

The pure part (:class:`DirectionSample`, :class:`VnicSample`, :func:`render`,
:func:`direction_reading`) knows nothing of the kernel; :class:`Collector`
fills samples from what the data plane counts. Per direction (the VM's: egress
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

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vnic.dataplane import delayd, nft, tc
from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.compile import guard_chain
from vnic.plan.model import Plan

DIRECTIONS = ("egress", "ingress")

#: Why packets of a vNIC were dropped on the host side (values of the ``cause`` label):
#:
#: - ``rate_limit``: the shaper's queue was full. The FIFO leaf under an HTB
#:   class (sized from the bandwidth-delay product and the profile's ``queue``)
#:   refused the packet because more was offered than the profile's rate
#:   drains. Under netem without loss, netem's drops (its queue is then the
#:   shaper's queue).
#: - ``queue_overflow``: a delay line was full: the delay engine's held bytes
#:   reached its limit, it could not take a frame in (its receive ring
#:   overflowed), or it could not hand a frame to an unshaped device; with
#:   netem at the root of an unshaped direction without loss, netem's drops.
#: - ``emulated_loss``: the profile's loss model (random or Gilbert-Elliott)
#:   dropped the packet on purpose. Under netem, every drop of a netem qdisc
#:   whose direction has loss: netem counts its losses and its overflows in one
#:   counter.
#: - ``anti_spoofing``: frames from the VM whose source MAC, ARP sender or IP
#:   source is not the VM's own, dropped by the nftables guard (egress only).
DROP_CAUSES = ("rate_limit", "queue_overflow", "emulated_loss", "anti_spoofing")

Key = tuple[str, str]


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
    #: round trip VM <-> session switch, seconds (None: no answer or not measured yet)
    latency_seconds: float | None = None
    #: differences between desired and read-back kernel state (0 = as planned)
    drift: int = 0

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


_VM = ("session", "vm")
_DIR = ("session", "vm", "direction")

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
        "Round trip in seconds of the active probe between the VM and its session switch.",
        _VM,
    ),
    Family(
        "vnic_profile_revision",
        "gauge",
        "Revision of each profile the vNIC runs.",
        (*_VM, "profile"),
    ),
    Family(
        "vnic_drift",
        "gauge",
        "Differences between the desired and the read-back kernel state of the vNIC.",
        _VM,
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
        base = f'session="{escape_label(s.session)}",vm="{escape_label(s.vm)}"'
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


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LinkCounters:
    """One device's link counters (``ip -s link``): bytes and packets each way."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@dataclass(frozen=True)
class Reading:
    """The raw kernel totals of one direction of one vNIC, as read this time."""

    bytes: int
    packets: int
    drops: Mapping[str, int]


def direction_reading(
    plan: Plan,
    direction: str,
    counters: Mapping[tuple[str, int], tc.ClassCounters],
    engine: Mapping[str, int] | None,
    links: Mapping[str, LinkCounters],
    guard_drops: int,
) -> Reading:
    """What one direction of a vNIC counted, from the readings of its session. Pure.

    ``counters``: (device, HTB class minor) -> the leaf qdisc's counters (FIFO
    or netem); ``engine``: the delay engine's counters of this direction (None
    without an engine); ``links``: link counters by device name (only needed
    for directions nothing shapes); ``guard_drops``: the VM's anti-spoofing
    drops (counted on egress only).
    """
    dplan = plan.egress if direction == "egress" else plan.ingress
    drops = dict.fromkeys(DROP_CAUSES, 0)
    nbytes = packets = 0
    counted = False
    for leaf in dplan.leaves:
        c = counters.get((leaf.device, leaf.class_minor))
        if c is not None:
            nbytes += c.bytes
            packets += c.packets
            drops["rate_limit"] += c.drops
        counted = True
    for q in dplan.netem:
        # netem replaces the FIFO leaf (or sits at the root of an unshaped
        # direction): it is the last queue, so its counters are the delivered ones.
        c = counters.get((q.device, q.parent_minor))
        if c is not None:
            nbytes += c.bytes
            packets += c.packets
            if q.impairment.loss:
                cause = "emulated_loss"  # netem counts losses and overflows together
            elif q.parent_minor:
                cause = "rate_limit"
            else:
                cause = "queue_overflow"
            drops[cause] += c.drops
        counted = True
    if engine is not None:
        drops["emulated_loss"] += engine.get("dropped_loss", 0)
        drops["queue_overflow"] += engine.get("dropped_overflow", 0) + engine.get("socket_drops", 0)
        if not dplan.leaves:
            # A failed send into a shaped device is the leaf's own drop, already
            # counted as rate_limit; only an unshaped device's refusal is new.
            drops["queue_overflow"] += engine.get("dropped_send", 0)
        if not counted:
            nbytes, packets = engine.get("tx_bytes", 0), engine.get("tx_frames", 0)
            counted = True
    if not counted:
        link = links.get(plan.devices.port)
        if link is not None:
            # The port's receive side is what the VM sent; its transmit side what it got.
            if direction == "egress":
                nbytes, packets = link.rx_bytes, link.rx_packets
            else:
                nbytes, packets = link.tx_bytes, link.tx_packets
    if direction == "egress":
        drops["anti_spoofing"] = guard_drops
    return Reading(nbytes, packets, drops)


def needs_links(plan: Plan) -> bool:
    """Whether a direction of ``plan`` is counted by link counters (nothing shapes it)."""
    return plan.engine is None and not (plan.egress.shaped and plan.ingress.shaped)


def read_link_counters(session_ns: str) -> dict[str, LinkCounters]:
    """Link counters of every device in the namespace, from one ``ip -s -j link show``."""
    proc = nsops.run_inside(
        session_ns, ["ip", "-s", "-j", "link", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot read link counters in {session_ns}: {proc.stderr.strip()}")
    out = {}
    for link in json.loads(proc.stdout or "[]"):
        stats = link.get("stats64") or link.get("stats") or {}
        rx, tx = stats.get("rx", {}), stats.get("tx", {})
        out[str(link.get("ifname"))] = LinkCounters(
            int(rx.get("bytes", 0)),
            int(rx.get("packets", 0)),
            int(tx.get("bytes", 0)),
            int(tx.get("packets", 0)),
        )
    return out


def read_guard_drops(session_ns: str) -> dict[str, int]:
    """Anti-spoofing drops per guard chain of a session, from one ``nft -j list table``."""
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-j", "list", "table", "bridge", nft.TABLE],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return {}  # no VM of the session has a guard yet: nothing dropped
    chains: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("comment") not in nft.DROP_REASONS:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                chain = str(rule["chain"])
                chains[chain] = chains.get(chain, 0) + int(expr["counter"]["packets"])
    return chains


def guard_drops_by_vm(chains: Mapping[str, int], vms: Iterable[str]) -> dict[str, int]:
    """Each VM's anti-spoofing drops: its guard is on the port or on the relay's bridge end."""
    out = {}
    for vm in vms:
        links = names.VmLinks.of(vm)
        out[vm] = chains.get(guard_chain(links.port), 0) + chains.get(
            guard_chain(links.relay_port), 0
        )
    return out


# ----------------------------------------------------------------------------- collecting


@runtime_checkable
class CountingDriver(Protocol):
    """What the collector needs of a driver (:class:`vnic.drivers.netns.NetnsDriver`)."""

    def plan_for(self, request: LaunchRequest) -> Plan: ...

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None: ...


class _Totals:
    """Kernel totals made monotone, and rates from them. Pure; the clock is passed in.

    A kernel counter that goes down was reset (its queue was rebuilt): the last
    total is carried on as an offset, so what is reported never decreases.
    """

    def __init__(self) -> None:
        #: (session, vm, direction, counter) -> (last raw value, offset)
        self._raw: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        #: (session, vm, direction) -> (time, reported bytes) of the last collection
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
        """Drop the state of vNICs for which ``keep(session, vm)`` is false."""
        self._raw = {k: v for k, v in self._raw.items() if keep(k[0], k[1])}
        self._last = {k: v for k, v in self._last.items() if keep(k[0], k[1])}


class Collector:
    """Reads the counters of many vNICs: per session namespace one qdisc dump, one
    nftables dump and (only if a VM has an unshaped direction) one link dump.

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
        self._plans: dict[Key, tuple[LaunchRequest, Plan]] = {}
        self._totals = _Totals()

    def plan(self, request: LaunchRequest) -> Plan:
        """The request's plan, compiled once per distinct request."""
        key = (request.session, request.vm)
        cached = self._plans.get(key)
        if cached is not None and (cached[0] is request or cached[0] == request):
            return cached[1]
        plan = self.driver.plan_for(request)
        self._plans[key] = (request, plan)
        return plan

    def collect(
        self,
        requests: Sequence[LaunchRequest],
        *,
        drift: Mapping[Key, int] | None = None,
        latency: Mapping[Key, float | None] | None = None,
    ) -> list[VnicSample]:
        """A sample per request whose session namespace exists, in session then request order.

        VMs of a session whose namespace is gone get no sample (their vNIC no
        longer exists, and zeros would read as a counter reset); a VM whose own
        namespace or engine is gone reports its last totals. ``drift`` and
        ``latency`` (seconds) are keyed by (session, vm); missing = 0 / None.
        """
        drift = drift or {}
        latency = latency or {}
        by_session: dict[str, list[LaunchRequest]] = {}
        for r in requests:
            by_session.setdefault(r.session, []).append(r)
        present = set(nsops.listing())
        out: list[VnicSample] = []
        for session, reqs in sorted(by_session.items()):
            session_ns = names.session_netns(session)
            if session_ns not in present:
                continue
            now = self.clock()
            try:
                samples = self._session(session_ns, reqs, drift, latency, now)
            except DataplaneError:
                continue  # the namespace went away while it was read
            out += samples
        # Forget the vNICs of these sessions that were not asked for (destroyed);
        # other sessions' state stays, since a caller may collect one session only.
        wanted = {(r.session, r.vm) for r in requests}
        if any(k[0] in by_session and k not in wanted for k in self._plans):
            self._totals.forget(lambda s, vm: s not in by_session or (s, vm) in wanted)
            self._plans = {
                k: v for k, v in self._plans.items() if k[0] not in by_session or k in wanted
            }
        return out

    def _session(
        self,
        session_ns: str,
        reqs: Sequence[LaunchRequest],
        drift: Mapping[Key, int],
        latency: Mapping[Key, float | None],
        now: float,
    ) -> list[VnicSample]:
        plans = [self.plan(r) for r in reqs]
        counters = tc.read_class_counters(session_ns)
        guards = guard_drops_by_vm(read_guard_drops(session_ns), [r.vm for r in reqs])
        links = read_link_counters(session_ns) if any(map(needs_links, plans)) else {}
        out = []
        for r, plan in zip(reqs, plans, strict=True):
            engine = self._engine(r) if plan.engine is not None else None
            dirs = {}
            for d in DIRECTIONS:
                raw = direction_reading(
                    plan,
                    d,
                    counters,
                    engine.directions.get(d, {}) if engine is not None else None,
                    links,
                    guards.get(r.vm, 0),
                )
                dirs[d] = self._sample(r, d, raw, now)
            key = (r.session, r.vm)
            out.append(
                VnicSample(
                    session=r.session,
                    vm=r.vm,
                    revisions=dict(r.revisions),
                    egress=dirs["egress"],
                    ingress=dirs["ingress"],
                    latency_seconds=latency.get(key),
                    drift=drift.get(key, 0),
                )
            )
        return out

    def _engine(self, request: LaunchRequest) -> delayd.EngineStats | None:
        try:
            return self.driver.engine_stats(request.session, request.vm)
        except (OSError, ValueError):
            return None  # the engine stopped while its counters were read

    def _sample(
        self, r: LaunchRequest, direction: str, raw: Reading, now: float
    ) -> DirectionSample:
        t = self._totals
        nbytes = t.total((r.session, r.vm, direction, "bytes"), raw.bytes)
        packets = t.total((r.session, r.vm, direction, "packets"), raw.packets)
        drops = {c: t.total((r.session, r.vm, direction, c), raw.drops[c]) for c in DROP_CAUSES}
        rate = r.profile.direction(direction).rate
        return DirectionSample(
            bytes=nbytes,
            packets=packets,
            drops=drops,
            rate_bps=t.rate((r.session, r.vm, direction), now, nbytes),
            profile_rate_bps=int(rate.value) if rate is not None else None,
        )
