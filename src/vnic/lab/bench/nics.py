"""Benchmark: several vNICs per VM (``vnic bench nics``, root).

Two parts, each on this host's netns driver through the in-process agent (the same
port the manager uses), with launch requests built here so that nothing but the data
plane is measured:

* **fidelity**: a VM ``m`` with two vNICs on two networks of one session, each with
  its own profile (``eth0`` 20 Mbit/s each way, ``eth1`` 50 Mbit/s), against an
  unshaped peer with a vNIC on each network. Both vNICs carry a TCP flow at once
  (egress together, then ingress together); each flow's Ethernet frame rate
  (goodput / (1448/1514), as ``vnic bench fidelity``) is compared with its own
  vNIC's rate (target ±2 %). Then with 10 ms of egress delay on ``eth0`` and 25 ms
  on ``eth1``, irtt measures each vNIC's one-way delay, both at once, against a
  baseline measured on the same two paths unimpaired (target: the impairment
  benchmark's, median error within max(100 µs, 2 %)); and TCP runs through rate
  and delay on both at once, reported beside a VM of one vNIC with the same
  profile measured alone (what the delay costs TCP in a short flow is not what a
  second vNIC costs).
* **launch**: one VM with 1 vNIC and one with 4, launched and destroyed ``repeat``
  times each, interleaved (median launch time, ratio; target ≤ 4×); then ``count``
  VMs with 1 vNIC and ``count`` with 2, each batch launched by two threads (total
  time, ratio; target ≤ 2×).

Traffic goes only between the benchmark's own VMs.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vnic.agent.core import Agent, local_agent
from vnic.lab import stats
from vnic.lab.measure import TCP_GOODPUT, Throughput, iperf3, one_way
from vnic.model.launch import DEFAULT_NETWORK, LaunchRequest, NicRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names

MS = 1_000_000
PEER_RATE = "10Gbit"
#: The networks of the benchmark's session: name -> network id (VNI).
NETWORKS = {DEFAULT_NETWORK: 0xB1, "data": 0xB2, "n2": 0xB3, "n3": 0xB4}
#: The measured VM's vNICs: (name, network, rate, egress delay in ms).
MEASURED = (("eth0", DEFAULT_NETWORK, 20, 10), ("eth1", "data", 50, 25))


def nic(
    name: str, network: str, host_index: int, mac: int, assignments: Sequence[str]
) -> NicRequest:
    """One vNIC with the profile ``assignments`` make (``egress.rate=20Mbit``...) over the
    built-in defaults, addressed ``host_index`` in its network's subnets."""
    network_id = NETWORKS[network]
    eff = complete([Layer("vm-patch", "", parse_assignments(list(assignments)))])
    v4, v6 = names.vm_addresses(network_id, host_index)
    return NicRequest(
        name=name,
        network=network,
        network_id=network_id,
        mac=MacAddress(0x02_00_5E_00_00_00 + mac),
        ipv4=v4,
        ipv6=v6,
        profile=build_profile(eff.values),
        values=dict(eff.values),
    )


def _shaped(rate: str, delay_ms: float | None = None) -> list[str]:
    out = [f"egress.rate={rate}", f"ingress.rate={rate}"]
    if delay_ms:
        out.append(f"egress.delay={delay_ms}ms")
    return out


@contextlib.contextmanager
def _agent() -> Iterator[tuple[Agent, str]]:
    """An agent with its own state directory and a fresh session name; the session is torn
    down when the block ends, failed or not."""
    with tempfile.TemporaryDirectory(prefix="vnic-bench-nics-") as tmp:
        agent = local_agent("netns", state_dir=Path(tmp) / "agent")
        session = f"n{uuid.uuid4().hex[:8]}"
        try:
            yield agent, session
        finally:
            agent.teardown_session(session)


def _address(request: LaunchRequest, nic_name: str) -> str:
    return str(request.only(nic_name).ipv4.ip)


def fidelity(seconds: float = 3.0) -> dict[str, Any]:
    """Each vNIC of a two-vNIC VM against its own profile, both loaded at once: rates (TCP
    both ways, rate-only profiles), one-way delay (rate and delay profiles), and TCP under
    that delay beside a one-vNIC VM of the same profile measured alone."""
    rows: list[dict[str, Any]] = []
    with _agent() as (agent, session):
        peer = LaunchRequest(
            session,
            "peer",
            (
                nic("eth0", DEFAULT_NETWORK, 2, 1, _shaped(PEER_RATE)),
                nic("eth1", "data", 2, 2, _shaped(PEER_RATE)),
            ),
        )
        agent.launch(peer)

        def measured(rate_of: Any, delay_of: Any) -> LaunchRequest:
            return LaunchRequest(
                session,
                "m",
                tuple(
                    nic(name, net, 3, 3 + i, _shaped(rate_of(rate), delay_of(delay)))
                    for i, (name, net, rate, delay) in enumerate(MEASURED)
                ),
            )

        agent.launch(measured(lambda _r: PEER_RATE, lambda _d: None))
        base = _one_way_both(session, peer)
        agent.destroy(session, "m")
        agent.launch(measured(lambda r: f"{r}Mbit", lambda _d: None))
        for direction, reverse in (("egress", False), ("ingress", True)):
            results = _tcp_both(session, peer, seconds, reverse)
            for (name, net, rate, _delay), got in zip(MEASURED, results, strict=True):
                frames = got.bits_per_second / TCP_GOODPUT
                rows.append(
                    {
                        "kind": "rate",
                        "case": f"{name} ({net}) {direction} tcp, both vNICs loaded",
                        "configured_bps": rate * 1e6,
                        "measured_bps": round(frames),
                        "ratio": round(frames / (rate * 1e6), 4),
                        "pass": abs(frames / (rate * 1e6) - 1) <= 0.02,
                    }
                )
        agent.destroy(session, "m")
        agent.launch(measured(lambda r: f"{r}Mbit", lambda d: d))
        delays = _one_way_both(session, peer)
        for name, net, _rate, delay in MEASURED:
            added = stats.quantile(delays[name], 0.5) - stats.quantile(base[name], 0.5)
            error = added - delay * MS
            rows.append(
                {
                    "kind": "delay",
                    "case": f"{name} ({net}) egress delay {delay}ms, both vNICs probed",
                    "configured_ms": delay,
                    "measured_ms": round(added / MS, 4),
                    "median_error_us": round(error / 1e3, 1),
                    "samples": len(delays[name]),
                    "pass": abs(error) <= max(100_000, 0.02 * delay * MS),
                }
            )
        # TCP through rate and delay: both vNICs at once, then each profile on a VM of one
        # vNIC alone, so what the delay costs TCP is told apart from what a second vNIC does.
        together = _tcp_both(session, peer, seconds, reverse=False)
        agent.destroy(session, "m")
        for i, ((name, net, rate, delay), both) in enumerate(zip(MEASURED, together, strict=True)):
            one = LaunchRequest(
                session,
                f"one{i}",
                (nic("eth0", net, 10 + i, 20 + i, _shaped(f"{rate}Mbit", delay)),),
            )
            agent.launch(one)
            alone = iperf3(session, one.vm, "peer", _address(peer, name), seconds=seconds)
            agent.destroy(session, one.vm)
            ratio_both = both.bits_per_second / TCP_GOODPUT / (rate * 1e6)
            ratio_alone = alone.bits_per_second / TCP_GOODPUT / (rate * 1e6)
            rows.append(
                {
                    "kind": "rate-with-delay",
                    "case": f"{name} ({net}) egress tcp through {delay} ms, both loaded",
                    "configured_bps": rate * 1e6,
                    "measured_bps": round(both.bits_per_second / TCP_GOODPUT),
                    "ratio": round(ratio_both, 4),
                    "one_vnic_alone_ratio": round(ratio_alone, 4),
                    "vs_one_vnic": round(ratio_both / ratio_alone, 4),
                }
            )
    return {
        "benchmark": "nics-fidelity",
        "seconds_per_flow": seconds,
        "session": session,
        "rows": rows,
    }


def _tcp_both(session: str, peer: LaunchRequest, seconds: float, reverse: bool) -> list[Throughput]:
    """A TCP flow over each measured vNIC of ``m`` at once (``reverse``: the peer sends)."""
    with ThreadPoolExecutor(len(MEASURED)) as pool:
        flows = [
            pool.submit(
                iperf3,
                session,
                "m",
                "peer",
                _address(peer, name),
                seconds=seconds,
                reverse=reverse,
                port=5201 + i,
            )
            for i, (name, _net, _rate, _delay) in enumerate(MEASURED)
        ]
        return [f.result() for f in flows]


def _one_way_both(session: str, peer: LaunchRequest) -> dict[str, list[int]]:
    """irtt from ``m`` to the peer over every measured vNIC at once: one-way delays (ns)."""
    with ThreadPoolExecutor(len(MEASURED)) as pool:
        runs = {
            name: pool.submit(one_way, session, "m", "peer", _address(peer, name), duration="3s")
            for name, _net, _rate, _delay in MEASURED
        }
        return {name: run.result().up() for name, run in runs.items()}


def _vm(session: str, vm: str, index: int, count: int) -> LaunchRequest:
    """VM number ``index`` with ``count`` vNICs (eth0 on default, the others on n1..)."""
    nets = list(NETWORKS)
    return LaunchRequest(
        session,
        vm,
        tuple(
            nic(f"eth{n}", nets[n], 2 + index, 0x1000 * (n + 1) + index, _shaped("10Mbit"))
            for n in range(count)
        ),
    )


def launch(repeat: int = 5, count: int = 100, workers: int = 2) -> dict[str, Any]:
    """Launch time of a VM by its number of vNICs (see the module's docstring)."""
    single: dict[int, list[float]] = {1: [], 4: []}
    batches: dict[int, float] = {}
    sessions = []
    with _agent() as (agent, session):
        sessions.append(session)
        for _ in range(repeat):
            for nics in (1, 4):
                request = _vm(session, f"s{nics}", 0, nics)
                start = time.perf_counter()
                agent.launch(request)
                single[nics].append(time.perf_counter() - start)
                agent.destroy(session, request.vm)
    for nics in (1, 2):
        with _agent() as (agent, session):
            sessions.append(session)
            requests = [_vm(session, f"v{i}", i, nics) for i in range(count)]
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                for done in [pool.submit(agent.launch, r) for r in requests]:
                    done.result()
            batches[nics] = time.perf_counter() - start
    one, four = statistics.median(single[1]), statistics.median(single[4])
    return {
        "benchmark": "nics-launch",
        "repeat": repeat,
        "one_vnic_launch_s": round(one, 4),
        "four_vnic_launch_s": round(four, 4),
        "four_over_one": round(four / one, 3),
        "four_over_one_pass": four / one <= 4.0,
        "vms": count,
        "workers": workers,
        "batch_one_vnic_s": round(batches[1], 3),
        "batch_two_vnic_s": round(batches[2], 3),
        "two_over_one": round(batches[2] / batches[1], 3),
        "two_over_one_pass": batches[2] / batches[1] <= 2.0,
        "sessions": sessions,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Both parts; ``quick`` shortens the flows and the batches (a smoke run)."""
    return {
        "benchmark": "nics",
        "fidelity": fidelity(seconds=1.5 if quick else 3.0),
        "launch": launch(repeat=2, count=10) if quick else launch(),
    }
