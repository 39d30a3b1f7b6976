"""Per-vNIC metrics: samples read from the kernel, rendered as Prometheus text.

The pure part (:class:`VnicSample`, :func:`render`) knows nothing of the
kernel; :class:`Collector` fills samples from what the data plane counts:

- bytes and packets: the HTB leaf queues of the direction's device (every
  packet that left the shaper toward its destination);
- drops, by cause:
  ``rate_limit`` - packets the rate limiter's queue (the HTB leaf FIFO,
  sized to the bandwidth-delay product) had no room for: the offered load
  exceeded the profile's rate for longer than the queue absorbs;
  ``queue_overflow`` - packets the delay line had no room for (netem's or
  the delay engine's ``limit``), and frames the engine could not hand to a
  full shaper queue;
  ``emulated_loss`` - packets the profile's loss model dropped on purpose;
  ``anti_spoofing`` - frames from the VM with a source MAC or IP that is not
  its own, dropped by the nftables guard (egress only);
- rate: bytes between two collections, as bit/s;
- latency and drift: measured elsewhere (the monitor), passed in.

Directions are the VM's: egress = sent by the VM, ingress = received by it.
See ``docs/metrics.md`` for every metric.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vnic.dataplane import delayd, names, nft, tc
from vnic.dataplane import namespaces as nsops
from vnic.drivers.base import LaunchRequest
from vnic.plan.compile import guard_chain
from vnic.plan.model import Plan

DIRECTIONS = ("egress", "ingress")
DROP_CAUSES = ("rate_limit", "queue_overflow", "emulated_loss", "anti_spoofing")


@dataclass(frozen=True)
class DirectionSample:
    """One direction of one vNIC. Counters are totals since the vNIC was built."""

    bytes: int = 0
    packets: int = 0
    #: cause -> packets dropped (keys: DROP_CAUSES)
    drops: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_CAUSES, 0))
    #: measured between the last two collections, bit/s (None on the first)
    rate_bps: float | None = None
    #: the profile's rate, bit/s (None = unlimited)
    profile_rate_bps: int | None = None


@dataclass(frozen=True)
class VnicSample:
    session: str
    vm: str
    #: profile name -> revision the vNIC runs
    revisions: Mapping[str, int]
    egress: DirectionSample
    ingress: DirectionSample
    #: round trip VM <-> session switch, seconds (None: no answer or not measured yet)
    latency_seconds: float | None = None
    #: differences between desired and read-back kernel state
    drift: int = 0

    def direction(self, name: str) -> DirectionSample:
        return self.egress if name == "egress" else self.ingress


# ----------------------------------------------------------------------------- rendering

_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("vnic_vnics", "gauge", "vNICs this agent runs."),
    ("vnic_bytes_total", "counter", "Bytes through the vNIC's shaper, by direction."),
    ("vnic_packets_total", "counter", "Packets through the vNIC's shaper, by direction."),
    ("vnic_drops_total", "counter", "Packets dropped, by direction and cause."),
    ("vnic_rate_bits_per_second", "gauge", "Measured rate between the last two scrapes."),
    ("vnic_profile_rate_bits_per_second", "gauge", "The profile's rate (absent: unlimited)."),
    ("vnic_latency_seconds", "gauge", "Round trip of the active probe, VM to session switch."),
    ("vnic_profile_revision", "gauge", "Revision of each profile the vNIC runs."),
    ("vnic_drift", "gauge", "Differences between desired and read-back kernel state."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(samples: Iterable[VnicSample]) -> str:
    """Prometheus text exposition (format 0.0.4) of ``samples``: HELP and TYPE once per
    family, then every series of it."""
    samples = list(samples)
    lines: dict[str, list[str]] = {name: [] for name, _, _ in _FAMILIES}
    lines["vnic_vnics"].append(f"vnic_vnics {len(samples)}")
    for s in samples:
        base = f'session="{_escape(s.session)}",vm="{_escape(s.vm)}"'
        for d in DIRECTIONS:
            ds = s.direction(d)
            lab = f'{base},direction="{d}"'
            lines["vnic_bytes_total"].append(f"vnic_bytes_total{{{lab}}} {ds.bytes}")
            lines["vnic_packets_total"].append(f"vnic_packets_total{{{lab}}} {ds.packets}")
            drops = lines["vnic_drops_total"]
            for cause in DROP_CAUSES:
                drops.append(f'vnic_drops_total{{{lab},cause="{cause}"}} {ds.drops.get(cause, 0)}')
            if ds.rate_bps is not None:
                lines["vnic_rate_bits_per_second"].append(
                    f"vnic_rate_bits_per_second{{{lab}}} {_num(ds.rate_bps)}"
                )
            if ds.profile_rate_bps is not None:
                lines["vnic_profile_rate_bits_per_second"].append(
                    f"vnic_profile_rate_bits_per_second{{{lab}}} {ds.profile_rate_bps}"
                )
        if s.latency_seconds is not None:
            lines["vnic_latency_seconds"].append(
                f"vnic_latency_seconds{{{base}}} {_num(s.latency_seconds)}"
            )
        for profile, revision in sorted(s.revisions.items()):
            lines["vnic_profile_revision"].append(
                f'vnic_profile_revision{{{base},profile="{_escape(profile)}"}} {revision}'
            )
        lines["vnic_drift"].append(f"vnic_drift{{{base}}} {s.drift}")
    out: list[str] = []
    for name, kind, text in _FAMILIES:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines[name])
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- collecting

Key = tuple[str, str]


class Collector:
    """Reads counters of many vNICs: one qdisc dump and one nft dump per session namespace.

    Keeps the previous reading of each vNIC to turn byte counters into rates;
    ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, driver: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.driver = driver
        self.clock = clock
        self._plans: dict[Key, tuple[LaunchRequest, Plan]] = {}
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def _plan(self, request: LaunchRequest) -> Plan:
        key = (request.session, request.vm)
        cached = self._plans.get(key)
        if cached is None or cached[0] != request:
            plan: Plan = self.driver.plan_for(request)
            self._plans[key] = (request, plan)
            return plan
        return cached[1]

    def collect(
        self,
        requests: Sequence[LaunchRequest],
        *,
        drift: Mapping[Key, int] | None = None,
        latency: Mapping[Key, float | None] | None = None,
    ) -> list[VnicSample]:
        """A sample per request whose session namespace exists (others are skipped)."""
        drift = drift or {}
        latency = latency or {}
        by_session: dict[str, list[LaunchRequest]] = {}
        for r in requests:
            by_session.setdefault(r.session, []).append(r)
        now = self.clock()
        out: list[VnicSample] = []
        for session, reqs in sorted(by_session.items()):
            session_ns = names.session_netns(session)
            if not nsops.exists(session_ns):
                continue
            counters = tc.read_class_counters(session_ns)
            guards = guard_drops_by_vm(_guard_drops(session_ns), [r.vm for r in reqs])
            for r in reqs:
                plan = self._plan(r)
                engine = delayd.read_stats(r.session, r.vm) if plan.engine is not None else None
                dirs = {}
                for d in DIRECTIONS:
                    dirs[d] = self._direction(plan, d, counters, engine, guards, r, now)
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

    def _direction(
        self,
        plan: Plan,
        direction: str,
        counters: Mapping[tuple[str, int], tc.ClassCounters],
        engine: delayd.EngineStats | None,
        guards: Mapping[str, int],
        request: LaunchRequest,
        now: float,
    ) -> DirectionSample:
        dplan = plan.egress if direction == "egress" else plan.ingress
        nbytes = packets = rate_drops = netem_drops = 0
        for leaf in dplan.leaves:
            c = counters.get((leaf.device, leaf.class_minor))
            if c is not None:
                nbytes += c.bytes
                packets += c.packets
                rate_drops += c.drops
        for q in dplan.netem:
            c = counters.get((q.device, q.parent_minor))
            if c is not None:
                netem_drops += c.drops
                if not dplan.leaves:  # netem at the root: it is the only counter
                    nbytes += c.bytes
                    packets += c.packets
        drops = dict.fromkeys(DROP_CAUSES, 0)
        drops["rate_limit"] = rate_drops
        if engine is not None:
            e = engine.directions.get(direction, {})
            drops["emulated_loss"] = e.get("dropped_loss", 0)
            drops["queue_overflow"] = e.get("dropped_overflow", 0) + e.get("dropped_send", 0)
            if not dplan.leaves:  # no shaper: the engine's own counters are the vNIC's
                nbytes, packets = e.get("tx_bytes", 0), e.get("tx_frames", 0)
        else:
            # netem counts its emulated losses and its own overflows together.
            drops["emulated_loss"] = netem_drops
        if direction == "egress":
            drops["anti_spoofing"] = guards.get(request.vm, 0)
        rate = None
        key = (request.session, request.vm, direction)
        last = self._last.get(key)
        if last is not None and now > last[0] and nbytes >= last[1]:
            rate = (nbytes - last[1]) * 8 / (now - last[0])
        self._last[key] = (now, nbytes)
        profile_rate = request.profile.direction(direction).rate
        return DirectionSample(
            bytes=nbytes,
            packets=packets,
            drops=drops,
            rate_bps=rate,
            profile_rate_bps=int(profile_rate.value) if profile_rate is not None else None,
        )


def _guard_drops(session_ns: str) -> dict[str, int]:
    """Anti-spoofing drops per VM of a session, from one ``nft -j list table`` (by VM tag)."""
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-j", "list", "table", "bridge", nft.TABLE],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return {}
    chains: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("comment") not in nft.DROP_REASONS:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                chains[rule["chain"]] = chains.get(rule["chain"], 0) + int(
                    expr["counter"]["packets"]
                )
    return chains


def guard_drops_by_vm(chains: Mapping[str, int], vms: Iterable[str]) -> dict[str, int]:
    out = {}
    for vm in vms:
        links = names.VmLinks.of(vm)
        out[vm] = chains.get(guard_chain(links.port), 0) + chains.get(
            guard_chain(links.relay_port), 0
        )
    return out
