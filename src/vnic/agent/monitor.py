"""The agent's monitoring: counters on demand, latency and drift in the background.

Counters are cheap (a few dumps per session namespace) and are read at every
scrape. The active latency probe (every ``latency_interval`` seconds, default
10) and the drift check (a read-back of every vNIC, every ``drift_interval``
seconds, default 60) cost more: background threads refresh them and scrapes
report the last values. With repair on (:mod:`vnic.agent.repair`, what
``vnic serve`` and ``vnic agent`` do), the drift check runs every repair
interval instead (default 2 s) and each drifted VM is rebuilt within the
repair bounds; ``vnic_drift`` then shows what is left after the repairs.
A read of every VM costs about 20 ms a VM on this 2-core machine, so the
pause between two rounds also grows with it: the loop spends at most
:data:`DUTY` of its time reading (20 VMs: a round every ~3.5 s).

Everything is per vNIC: a VM with several has a sample, a latency and a drift
count per vNIC (:data:`vnic.agent.metrics.NicKey`). The drivers report a VM's
drift as one list; a difference is the vNIC's it names first (``eth1: ...``,
see :func:`drift_by_nic`), and differences naming no vNIC are ``eth0``'s, which
also carries what is per VM (its TCP settings come from ``eth0``'s profile).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from vnic.agent.latency import LatencyProbe, Target
from vnic.agent.metrics import Collector, CountingDriver, NicKey, VnicSample, render
from vnic.agent.port import DesiredVm, RepairEvent, VmKey
from vnic.agent.repair import Repairer
from vnic.drivers.base import Driver
from vnic.drivers.registry import HOST_DRIVERS
from vnic.model.launch import NIC_NAME, LaunchRequest

log = logging.getLogger("vnic.agent")

#: Seconds between two latency rounds, and between two drift checks.
LATENCY_INTERVAL = 10.0
DRIFT_INTERVAL = 60.0
#: Most of its time the drift loop may spend reading drift, with repair on.
DUTY = 0.1


class Monitored(Protocol):
    """What the monitor needs of its agent (:class:`vnic.agent.core.Agent` is one; this
    module does not import it, which would make an import circle)."""

    @property
    def drivers(self) -> Mapping[str, Driver]:
        """The agent's drivers by kind."""

    @property
    def repairer(self) -> Repairer | None:
        """Its drift repair (None: drift is only counted)."""

    def mine(self) -> list[DesiredVm]:
        """The desired VMs of the drivers the agent has loaded."""

    def drift(self, only: Collection[VmKey] | None = None) -> dict[str, list[str]]:
        """Differences from the kernel of each desired VM (of ``only``), by ``session/vm``."""


class Monitor:
    def __init__(
        self,
        agent: Monitored,
        latency_interval: float = LATENCY_INTERVAL,
        drift_interval: float = DRIFT_INTERVAL,
    ) -> None:
        self.agent = agent
        self.latency_interval = latency_interval
        self.drift_interval = drift_interval
        #: differences left on each desired vNIC at the last drift check
        self.drift: dict[NicKey, int] = {}
        #: Seconds the last round's drift read took (repairs not included).
        self.read_seconds = 0.0
        self.probe = LatencyProbe()
        self._collectors: dict[str, Collector] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _collector(self, kind: str) -> Collector | None:
        driver = self.agent.drivers.get(kind)
        if driver is None or not isinstance(driver, CountingDriver):
            return None  # a driver without kernel counters (fake) has nothing to read
        if kind not in self._collectors:
            self._collectors[kind] = Collector(driver)
        return self._collectors[kind]

    def samples(self, session: str | None = None) -> list[VnicSample]:
        """One sample per desired vNIC (of ``session``, or all), with fresh counters."""
        latency = self.probe.latest()
        with self._lock:  # rates are deltas since the previous read: one reader at a time
            out: list[VnicSample] = []
            for kind in sorted(self.agent.drivers):
                collector = self._collector(kind)
                if collector is None:
                    continue
                requests = [
                    vm.request
                    for vm in self.agent.mine()
                    if vm.driver == kind and (session is None or vm.request.session == session)
                ]
                out += collector.collect(requests, drift=self.drift, latency=latency)
            return out

    def metrics_text(self) -> str:
        repairer = self.agent.repairer
        extra = repairer.metrics_lines() if repairer is not None else []
        return render(self.samples(), extra_lines=extra)

    def stats(self, session: str) -> list[dict[str, Any]]:
        """The session's samples as JSON, one document per VM (see :func:`stats_by_vm`)."""
        return stats_by_vm(self.samples(session))

    def refresh_drift(self) -> None:
        """Read every desired vNIC back and count its differences from the request."""
        self._count(self.agent.drift())

    def check(self) -> list[RepairEvent]:
        """One round: read the drift, repair what the agent's repairer allows (if it has
        one), count what is left; return the repairs made."""
        started = time.monotonic()
        found = self.agent.drift()
        self.read_seconds = time.monotonic() - started
        events: list[RepairEvent] = []
        repairer = self.agent.repairer
        if repairer is not None and found:
            events = repairer.run(found)
            if events:
                found = self.agent.drift()
        self._count(found)
        return events

    def pause(self, spent: float) -> float:
        """Seconds to wait after a round of :meth:`check` whose drift read took ``spent``
        seconds: the repair interval, longer when reading takes more than :data:`DUTY`
        of the time; the drift interval with repair off."""
        repairer = self.agent.repairer
        if repairer is None:
            return self.drift_interval
        return max(repairer.interval, spent * (1 - DUTY) / DUTY)

    def _count(self, found: dict[str, list[str]]) -> None:
        counts: dict[NicKey, int] = {}
        for vm in self.agent.mine():
            r = vm.request
            for nic, n in drift_by_nic(r, found.get(f"{r.session}/{r.vm}", [])).items():
                counts[(r.session, r.vm, nic)] = n
        self.drift = counts

    def _targets(self) -> list[Target]:
        return [
            Target(vm.request.session, vm.request.vm, n.ipv4, n.name, n.network)
            for vm in self.agent.mine()
            if vm.driver in HOST_DRIVERS
            for n in vm.request.nics
        ]

    def start(self) -> None:
        """Probe latency and check drift in the background until :meth:`stop`."""
        if self._thread is not None:
            return
        if any(kind in self.agent.drivers for kind in HOST_DRIVERS):
            self.probe.start(self._targets, self.latency_interval, on_error=_log("latency"))

        def loop() -> None:
            report = _log("drift check")
            while not self._stop.is_set():
                self.read_seconds = 0.0
                try:
                    self.check()
                except Exception as exc:  # a failed round must not end monitoring
                    report(exc)
                self._stop.wait(self.pause(self.read_seconds))

        self._thread = threading.Thread(target=loop, name="vnic-drift", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.probe.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


def drift_by_nic(request: LaunchRequest, differences: Iterable[str]) -> dict[str, int]:
    """How many of a VM's ``differences`` belong to each of its vNICs (every vNIC listed,
    0 included). A difference is the vNIC's it starts with (``eth1: ...`` or ``eth1 ...``,
    a vNIC of this VM); the others, naming none, are the first vNIC's (``eth0``: a VM
    of one vNIC, or what is per VM, like its TCP settings)."""
    counts = dict.fromkeys((n.name for n in request.nics), 0)
    first = request.nic
    for line in differences:
        head = line.split(":", 1)[0].split(" ", 1)[0]
        counts[head if head in counts and NIC_NAME.fullmatch(head) else first] += 1
    return counts


def stats_by_vm(samples: Sequence[VnicSample]) -> list[dict[str, Any]]:
    """The JSON of ``samples``, one document per VM in the order met: the first vNIC's
    sample (``eth0``: the keys readers of one-vNIC VMs know, ``nic`` and ``network``
    added), and ``nics``, every vNIC's sample in order (the first included)."""
    by_vm: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in samples:
        by_vm.setdefault((s.session, s.vm), []).append(dataclasses.asdict(s))
    return [{**nics[0], "nics": nics} for nics in by_vm.values()]


def _log(what: str) -> Callable[[Exception], None]:
    def report(exc: Exception) -> None:
        log.warning("%s failed: %s", what, exc)

    return report
