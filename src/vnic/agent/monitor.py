"""The agent's monitoring: counters on demand, drift and latency in the background.

Counters are cheap (one qdisc dump per session namespace) and are read at
every scrape. Drift (a read-back of every vNIC) and the active latency probe
cost more, so a background thread refreshes them every ``interval`` seconds
(default 10) and scrapes report the last values.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vnic.agent.metrics import Collector, VnicSample, render

if TYPE_CHECKING:
    from vnic.agent.core import Agent

#: Seconds between two drift checks and latency rounds.
DEFAULT_INTERVAL = 10.0


class Monitor:
    def __init__(self, agent: Agent, interval: float = DEFAULT_INTERVAL) -> None:
        self.agent = agent
        self.interval = interval
        self.drift: dict[tuple[str, str], int] = {}
        self.latency: dict[tuple[str, str], float | None] = {}
        self._collectors: dict[str, Collector] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _collector(self, kind: str) -> Collector | None:
        driver = self.agent.drivers.get(kind)
        if driver is None or kind != "netns":
            return None  # only the netns driver has kernel counters to read
        if kind not in self._collectors:
            self._collectors[kind] = Collector(driver)
        return self._collectors[kind]

    def samples(self, session: str | None = None) -> list[VnicSample]:
        """One sample per desired vNIC (of ``session``, or all), with fresh counters."""
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
                out += collector.collect(requests, drift=self.drift, latency=self.latency)
            return out

    def metrics_text(self) -> str:
        return render(self.samples())

    def stats(self, session: str) -> list[dict[str, Any]]:
        return [dataclasses.asdict(s) for s in self.samples(session)]

    def refresh(self) -> None:
        """One round of the slow checks: drift of every vNIC, latency to every VM."""
        drift = self.agent.drift()
        self.drift = {
            (vm.request.session, vm.request.vm): len(
                drift.get(f"{vm.request.session}/{vm.request.vm}", [])
            )
            for vm in self.agent.mine()
        }
        self.latency = self._measure_latency()

    def _measure_latency(self) -> dict[tuple[str, str], float | None]:
        if "netns" not in self.agent.drivers:
            return {}
        from vnic.dataplane.latency import Target, measure

        targets = [
            Target(
                vm.request.session, vm.request.vm, vm.request.network_id, str(vm.request.ipv4.ip)
            )
            for vm in self.agent.mine()
            if vm.driver == "netns"
        ]
        return measure(targets)

    def start(self, on_error: Callable[[Exception], None] | None = None) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:  # a failed round must not end monitoring
                    if on_error is not None:
                        on_error(exc)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="vnic-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None
