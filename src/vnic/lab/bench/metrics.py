"""How long rendering ``/metrics`` takes for many vNICs. Pure: no root, no kernel.

The agent renders at every scrape, so the render time of a full host bounds
how often Prometheus may scrape it; the target is well under 500 ms for 1000
vNICs.
"""

from __future__ import annotations

import time
from typing import Any

from vnic.agent.metrics import DROP_CAUSES, DirectionSample, VnicSample, render
from vnic.lab.stats import quantile

#: Render time a scrape of 1000 vNICs must stay under, milliseconds.
TARGET_MS = 500


def synthetic_samples(vnics: int) -> list[VnicSample]:
    """``vnics`` samples with every series present and distinct values (200 VMs per session)."""
    out = []
    for i in range(vnics):
        drops = {cause: i * (k + 1) for k, cause in enumerate(DROP_CAUSES)}
        egress = DirectionSample(
            bytes=123_456_789 + i,
            packets=98_765 + i,
            drops=drops,
            rate_bps=19_876_543.21 + i,
            profile_rate_bps=20_000_000,
        )
        ingress = DirectionSample(
            bytes=987_654_321 + i,
            packets=765_432 + i,
            drops=drops,
            rate_bps=49_123_456.78 + i,
            profile_rate_bps=50_000_000,
        )
        out.append(
            VnicSample(
                f"session-{i // 200}",
                f"vm-{i}",
                {"campus": 3, f"override-{i}": 1},
                egress,
                ingress,
                latency_seconds=0.002 + i * 1e-6,
                drift=i % 2,
            )
        )
    return out


def render_benchmark(vnics: int = 1000, repeats: int = 20) -> dict[str, Any]:
    """Render ``vnics`` synthetic samples ``repeats`` times; p50/p99/max in milliseconds.

    Also returns the number of series and bytes of one exposition, so a change
    that drops series shows up next to the time.
    """
    if vnics < 0 or repeats < 1:
        raise ValueError("vnics >= 0 and repeats >= 1 are needed")
    samples = synthetic_samples(vnics)
    times = []
    text = ""
    for _ in range(repeats):
        start = time.perf_counter()
        text = render(samples)
        times.append((time.perf_counter() - start) * 1000)
    ms = sorted(times)
    return {
        "vnics": vnics,
        "series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "bytes": len(text.encode()),
        "p50_ms": round(quantile(ms, 0.5), 2),
        "p99_ms": round(quantile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2),
        "n": len(ms),
        "target_ms": TARGET_MS,
    }
