"""The instruments of `vnic bench change` (:mod:`vnic.lab.bench.change`): the API
client it times, the kernel reader of a session's HTB classes, the 10 ms sampler of
a shaper's counters, iperf3 clients, and the summaries of what they measured.
"""

from __future__ import annotations

import bisect
import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_classes_at
from vnic.lab.stats import quantile
from vnic.plan import names

#: The root handle of a direction's HTB qdisc (1:).
HTB_ROOT = 0x10000
#: Seconds of one window of the rates measured under traffic.
WINDOW_S = 0.1


def ms_stats(values: Sequence[float]) -> dict[str, float | int]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {"n": 0}
    return {
        "p50_ms": round(quantile(ms, 0.5), 3),
        "p99_ms": round(quantile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3),
        "n": len(ms),
    }


def bytes_per_s(mbit: float) -> int:
    return round(mbit * 1_000_000) // 8


class Api:
    """The manager's REST API through one client; any error answer raises."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.client.request(method, path, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def settle(self) -> None:
        """After a failed request: the server may have closed the kept-alive connection,
        which the next request would find reset; let a harmless one find it."""
        for _ in range(3):
            try:
                self.client.get("/v1/health")
                return
            except httpx.HTTPError:
                time.sleep(0.1)


class Kernel:
    """Read-back of one session namespace through one netlink socket (one thread's)."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr
        self._index: dict[str, int] = {}

    def _lookup(self, device: str) -> int | None:
        if device not in self._index:
            self._index = {
                str(link.get_attr("IFLA_IFNAME")): int(link["index"])
                for link in self.ipr.get_links()
            }
        return self._index.get(device)

    def rate(self, device: str) -> int | None:
        """Bytes/s of the direction's total class (``1:1``); None while it is missing."""
        index = self._lookup(device)
        if index is None:
            return None
        try:
            state = read_classes_at(self.ipr, index).get(1)
        except NetlinkError:
            state = None
        if state is None:  # the device went away or is being rebuilt: look it up again
            self._index.pop(device, None)
            return None
        return state.rate

    def counters(self, device: str) -> tuple[int, int] | None:
        """(bytes sent, packets dropped) of the device's HTB qdisc; None while it is missing."""
        index = self._lookup(device)
        if index is None:
            return None
        try:
            for q in self.ipr.get_qdiscs(index=index):
                if q["handle"] == HTB_ROOT:
                    stats = q.get_attr("TCA_STATS2")
                    basic = stats.get_attr("TCA_STATS_BASIC")
                    queue = stats.get_attr("TCA_STATS_QUEUE")
                    return int(basic["bytes"]), int(queue["drops"])
        except NetlinkError:
            pass
        self._index.pop(device, None)  # gone, or being rebuilt: look it up again
        return None


@contextmanager
def kernel_of(session: str) -> Iterator[Kernel]:
    with nsops.opened(names.session_netns(session)) as ipr:
        yield Kernel(ipr)


@dataclass
class Sampler:
    """The shaper of ``device`` read every ``every`` seconds by a thread: samples of
    (time, bytes sent, packets dropped, total class rate in bytes/s or 0)."""

    session: str
    device: str
    every: float = 0.01
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, ready: threading.Event) -> None:
        with kernel_of(self.session) as kernel:
            ready.set()
            while not self._stop.is_set():
                before = time.monotonic()
                got = kernel.counters(self.device)
                rate = kernel.rate(self.device)
                after = time.monotonic()
                if got is not None:
                    self.samples.append(((before + after) / 2, *got, rate or 0))
                self._stop.wait(max(0.0, self.every - (after - before)))

    def resets(self) -> int:
        """Times a counter went backwards (the qdisc was rebuilt, not changed)."""
        s = self.samples
        return sum(1 for a, b in itertools.pairwise(s) if b[1] < a[1] or b[2] < a[2])

    def value_at(self, t: float, column: int = 1) -> float | None:
        """A counter at time ``t`` (1: bytes, 2: drops), linear between the two samples
        around it; None outside the sampled span."""
        times = [s[0] for s in self.samples]
        i = bisect.bisect_left(times, t)
        if i == 0 or i >= len(times):
            return None
        (t0, *a), (t1, *b) = self.samples[i - 1], self.samples[i]
        v0, v1 = a[column - 1], b[column - 1]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    def _between(self, start: float, end: float, column: int) -> float | None:
        """How much a counter grew from ``start`` to ``end``; None where it was not
        sampled or went backwards in between (the qdisc was rebuilt)."""
        a, b = self.value_at(start, column), self.value_at(end, column)
        if a is None or b is None:
            return None
        inside = [s[column] for s in self.samples if start - 1 <= s[0] <= end + 1]
        if any(y < x for x, y in itertools.pairwise(inside)):
            return None
        return b - a

    def carried_at(self, after: float, rate: int) -> float | None:
        """The first sample time after ``after`` at which the class carries ``rate`` bytes/s."""
        return next((t for t, _, _, r in self.samples if t > after and r == rate), None)

    def first_increase(self, start: float, end: float, column: int) -> float | None:
        """Milliseconds from ``start`` to the first sample (before ``end``) at which a counter
        is above its value at ``start``; None if it stays."""
        base = self.value_at(start, column)
        for t, *values in self.samples:
            if base is not None and start < t <= end and values[column - 1] > base:
                return round((t - start) * 1000, 1)
        return None

    def rate(self, start: float, end: float) -> float | None:
        """Bit/s sent between ``start`` and ``end``."""
        grew = self._between(start, end, 1)
        return None if grew is None else grew * 8 / (end - start)

    def drops(self, start: float, end: float) -> int | None:
        grew = self._between(start, end, 2)
        return None if grew is None else round(grew)


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def change_mode(changes: Sequence[dict[str, Any]]) -> str:
    """How the agent carried a change: ``live`` or ``rebuild`` (its kernel lines say)."""
    lines = [line for c in changes for line in c.get("kernel", [])]
    return "rebuild" if any(line.startswith("rebuilt") for line in lines) else "live"


def launch(api: Api, session: str, vm: str, profile: str | None = None) -> str:
    body: dict[str, Any] = {"name": vm, "launch": True}
    if profile:
        body["profile"] = profile
    doc = api.call("POST", f"/v1/sessions/{session}/vms", body)
    return str(doc["vm"]["ipv4"])


def iperf_client(session: str, vm: str, argv: Sequence[str]) -> subprocess.Popen[str]:
    return nsops.popen(
        names.vm_netns(session, vm),
        ["iperf3", *argv, "-J"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, Any]]:
    """Exit status and JSON report of an iperf3 client (killed after ``timeout``)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    try:
        data: dict[str, Any] = json.loads(out or "{}")
    except json.JSONDecodeError:
        data = {"error": f"unreadable iperf3 output: {out[:200]!r}"}
    return int(proc.returncode or 0), data


def windows(sampler: Sampler, start: float, count: int) -> list[float | None]:
    return [sampler.rate(start + k * WINDOW_S, start + (k + 1) * WINDOW_S) for k in range(count)]


def converged(sampler: Sampler, changed_at: float, target_bps: float, until: float) -> float | None:
    """Seconds from ``changed_at`` to the end of the first 100 ms window (windows placed
    every 100 ms from the change) whose rate is within ±10 % of ``target_bps``."""
    k = 0
    while changed_at + (k + 1) * WINDOW_S <= until:
        end = changed_at + (k + 1) * WINDOW_S
        rate = sampler.rate(end - WINDOW_S, end)
        if rate is not None and abs(rate / target_bps - 1) <= 0.10:
            return round(end - changed_at, 3)
        k += 1
    return None


def after_ms(start: float, moment: float | None) -> float | None:
    """Milliseconds from ``start`` to ``moment`` (None: it never came)."""
    return None if moment is None else round((moment - start) * 1000, 1)


def rounded(value: float | None) -> int | None:
    return None if value is None else round(value)
