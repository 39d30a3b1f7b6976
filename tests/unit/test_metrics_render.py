"""Prometheus text exposition of vNIC samples: valid format, one HELP/TYPE per family,
escaped labels, every series present."""

from __future__ import annotations

import re

from vnic.agent.metrics import DROP_CAUSES, DirectionSample, VnicSample, render

SERIES = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN)$')


def sample(vm: str, session: str = "lab", **kw: object) -> VnicSample:
    d = DirectionSample(bytes=1000, packets=10, rate_bps=2e7, profile_rate_bps=20_000_000)
    return VnicSample(session, vm, {"campus": 3}, d, DirectionSample(), **kw)  # type: ignore[arg-type]


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, str, float]]]:
    types: dict[str, str] = {}
    series = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            m = SERIES.match(line)
            assert m, f"not a valid series line: {line!r}"
            assert m.group(1) in types, f"series before its TYPE: {line}"
            series.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return types, series


def test_families_typed_once_and_series_valid() -> None:
    types, series = parse(render([sample("a", latency_seconds=0.0021, drift=2), sample("b")]))
    assert types["vnic_bytes_total"] == "counter"
    assert types["vnic_drops_total"] == "counter"
    assert types["vnic_rate_bits_per_second"] == "gauge"
    names = [s[0] for s in series]
    assert names.count("vnic_bytes_total") == 4  # 2 vNICs x 2 directions
    assert names.count("vnic_drops_total") == 4 * len(DROP_CAUSES)
    assert names.count("vnic_rate_bits_per_second") == 2  # only where measured
    assert names.count("vnic_latency_seconds") == 1
    assert ("vnic_drift", '{session="lab",vm="a"}', 2.0) in series
    assert ("vnic_vnics", "", 2.0) in series
    assert ("vnic_profile_revision", '{session="lab",vm="a",profile="campus"}', 3.0) in series


def test_label_values_are_escaped() -> None:
    text = render([sample('we"ird\\vm\nx')])
    parse(text)
    assert 'vm="we\\"ird\\\\vm\\nx"' in text


def test_thousand_vnics_render_every_series() -> None:
    text = render([sample(f"vm{i}", session=f"s{i // 200}") for i in range(1000)])
    _, series = parse(text)
    assert sum(1 for s in series if s[0] == "vnic_bytes_total") == 2000
