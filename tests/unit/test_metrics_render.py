"""Prometheus text exposition of vNIC samples, and the pure parts of collecting them:
valid format, one HELP/TYPE per family, escaped labels, every series present,
counters that never go down, drops attributed to the right cause. No root."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from vnic.agent.metrics import (
    DROP_CAUSES,
    FAMILIES,
    DirectionSample,
    LinkCounters,
    VnicSample,
    _Totals,
    direction_reading,
    format_value,
    needs_links,
    render,
)
from vnic.dataplane.tc import ClassCounters
from vnic.lab.bench.metrics import render_benchmark, synthetic_samples
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan.compile import DEFAULT_MINOR, compile_plan
from vnic.plan.model import Devices, Plan

ROOT = Path(__file__).resolve().parents[2]

# The text format 0.0.4, line by line.
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SERIES = re.compile(
    rf"^({NAME})(?:\{{((?:{LABEL},)*{LABEL})?\}})? "
    r"([-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf)|NaN)$"
)
HELP = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")

Series = tuple[str, dict[str, str], float]


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse(text: str) -> tuple[dict[str, str], dict[str, str], list[Series]]:
    """HELP and TYPE by family, and every series; fails on anything the format forbids."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    series: list[Series] = []
    current = None
    for line in text.splitlines():
        if m := HELP.match(line):
            assert m.group(1) not in helps, f"HELP twice for {m.group(1)}"
            helps[m.group(1)] = m.group(2)
        elif m := TYPE.match(line):
            name = m.group(1)
            assert name not in types, f"TYPE twice for {name}"
            assert name in helps, f"TYPE before HELP for {name}"
            types[name] = m.group(2)
            current = name
        else:
            m = SERIES.match(line)
            assert m, f"not a valid series line: {line!r}"
            # Every series of a family follows its TYPE line, none elsewhere.
            assert m.group(1) == current, f"series outside its family: {line}"
            labels = {k: unescape(v) for k, v in re.findall(LABEL, m.group(2) or "")}
            series.append((m.group(1), labels, float(m.group(m.lastindex or 0))))
    return helps, types, series


def sample(vm: str, session: str = "lab", **kw: object) -> VnicSample:
    d = DirectionSample(bytes=1000, packets=10, rate_bps=2e7, profile_rate_bps=20_000_000)
    return VnicSample(session, vm, {"campus": 3}, d, DirectionSample(), **kw)  # type: ignore[arg-type]


def of(series: list[Series], name: str) -> list[Series]:
    return [s for s in series if s[0] == name]


def test_families_typed_once_and_series_valid() -> None:
    _, types, series = parse(render([sample("a", latency_seconds=0.0021, drift=2), sample("b")]))
    assert list(types) == [f.name for f in FAMILIES]  # every family, even without series
    assert types["vnic_bytes_total"] == "counter"
    assert types["vnic_drops_total"] == "counter"
    assert types["vnic_rate_bits_per_second"] == "gauge"
    assert all(name.startswith("vnic_") for name in types)
    assert all(name.endswith("_total") == (kind == "counter") for name, kind in types.items())
    assert len(of(series, "vnic_bytes_total")) == 4  # 2 vNICs x 2 directions
    assert len(of(series, "vnic_drops_total")) == 4 * len(DROP_CAUSES)
    assert len(of(series, "vnic_rate_bits_per_second")) == 2  # only where measured
    assert len(of(series, "vnic_profile_rate_bits_per_second")) == 2  # ingress is unlimited
    assert len(of(series, "vnic_latency_seconds")) == 1
    assert ("vnic_drift", {"session": "lab", "vm": "a", "nic": "eth0"}, 2.0) in series
    assert ("vnic_vnics", {}, 2.0) in series
    vnic = {"session": "lab", "vm": "a", "nic": "eth0"}
    revision = ("vnic_profile_revision", {**vnic, "profile": "campus"}, 3.0)
    assert revision in series
    egress = {**vnic, "direction": "egress"}
    assert ("vnic_bytes_total", egress, 1000.0) in series
    assert ("vnic_drops_total", {**egress, "cause": "emulated_loss"}, 0.0) in series


def test_every_family_declares_its_labels() -> None:
    _, _, series = parse(render([sample("a", latency_seconds=0.001)]))
    labels = {f.name: set(f.labels) for f in FAMILIES}
    for name, got, _ in series:
        assert set(got) == labels[name], name


def test_label_values_are_escaped_and_read_back() -> None:
    weird = 'we"ird\\vm\nx'
    text = render([VnicSample("s", weird, {'p"\\\n': 1}, DirectionSample(), DirectionSample())])
    _, _, series = parse(text)
    assert 'vm="we\\"ird\\\\vm\\nx"' in text
    assert {s[1]["vm"] for s in series if "vm" in s[1]} == {weird}
    assert of(series, "vnic_profile_revision")[0][1]["profile"] == 'p"\\\n'


def test_special_values_are_written_as_the_format_spells_them() -> None:
    assert format_value(math.inf) == "+Inf" and format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"
    assert format_value(12) == "12" and float(format_value(0.1 + 0.2)) == 0.1 + 0.2
    _, _, series = parse(
        render([VnicSample("s", "v", {}, DirectionSample(rate_bps=math.inf), DirectionSample())])
    )
    assert of(series, "vnic_rate_bits_per_second")[0][2] == math.inf


def test_extra_lines_come_after_the_vnic_families() -> None:
    extra = ["# HELP vnic_agent_up Whether the agent runs.", "# TYPE vnic_agent_up gauge"]
    text = render([sample("a")], extra_lines=[*extra, "vnic_agent_up 1"])
    _, types, series = parse(text)
    assert list(types)[-1] == "vnic_agent_up"
    assert series[-1] == ("vnic_agent_up", {}, 1.0)


def test_thousand_vnics_render_every_series() -> None:
    samples = synthetic_samples(1000)
    _, _, series = parse(render(samples))
    per_vnic_direction = len(of(series, "vnic_bytes_total"))
    assert per_vnic_direction == 2000
    assert len(of(series, "vnic_packets_total")) == 2000
    assert len(of(series, "vnic_drops_total")) == 2000 * len(DROP_CAUSES)
    assert len(of(series, "vnic_rate_bits_per_second")) == 2000
    assert len(of(series, "vnic_latency_seconds")) == 1000
    assert len(of(series, "vnic_profile_revision")) == 2000  # two profiles each
    assert len(of(series, "vnic_drift")) == 1000
    assert len({(s[1]["session"], s[1]["vm"]) for s in of(series, "vnic_drift")}) == 1000


def test_render_benchmark_reports_times_for_a_thousand_vnics() -> None:
    result = render_benchmark(vnics=1000, repeats=3)
    assert result["vnics"] == 1000 and result["n"] == 3
    assert result["series"] == 1 + 1000 * (2 * (2 + len(DROP_CAUSES) + 2) + 1 + 2 + 1)
    assert 0 < result["p50_ms"] <= result["max_ms"]  # how fast: vnic bench api (metrics_render)


def test_every_metric_and_drop_cause_is_documented() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    missing = [f.name for f in FAMILIES if f"`{f.name}`" not in text]
    missing += [c for c in DROP_CAUSES if f"`{c}`" not in text]
    assert missing == []


# ----------------------------------------------------------------------------- counters


def test_totals_never_go_down_across_a_reset() -> None:
    t = _Totals()
    key = ("s", "v", "egress", "bytes")
    got = [t.total(key, raw) for raw in (0, 100, 250, 30, 80, 80, 5)]
    assert got == [0, 100, 250, 280, 330, 330, 335]
    assert got == sorted(got)


def test_rate_is_bits_per_second_between_two_readings() -> None:
    t = _Totals()
    key = ("s", "v", "egress")
    assert t.rate(key, 10.0, 1_000) is None  # nothing to compare yet
    assert t.rate(key, 12.0, 2_501_000) == 10_000_000.0  # 2.5 MB in 2 s
    assert t.rate(key, 12.0, 2_600_000) is None  # time stood still
    t.forget(lambda session, vm: False)
    assert t.rate(key, 13.0, 0) is None


def plan(engine: str | None = None, **doc: object) -> Plan:
    spec = parse_profile_document({"name": "t", **doc})
    profile = complete([Layer("session-default", "t", spec.values)]).profile
    devices = Devices("vh1", "vi1", "vx1", "vy1") if engine == "delayd" else Devices("vh1", "vi1")
    return compile_plan(profile, devices, engine=engine)


def c(nbytes: int, packets: int, drops: int = 0) -> ClassCounters:
    return ClassCounters(bytes=nbytes, packets=packets, drops=drops, overlimits=0)


def test_shaped_direction_counts_its_leaves_and_their_drops_as_rate_limit() -> None:
    p = plan(egress={"rate": "20Mbit"}, ingress={"rate": "50Mbit"})
    counters = {("vi1", DEFAULT_MINOR): c(5000, 5, 7), ("vh1", DEFAULT_MINOR): c(900, 3)}
    egress = direction_reading(p, "egress", counters, None, {}, guard_drops=4)
    assert (egress.bytes, egress.packets) == (5000, 5)
    assert egress.drops == {
        "rate_limit": 7,
        "queue_overflow": 0,
        "emulated_loss": 0,
        "anti_spoofing": 4,
    }
    ingress = direction_reading(p, "ingress", counters, None, {}, guard_drops=4)
    assert (ingress.bytes, ingress.packets, ingress.drops["anti_spoofing"]) == (900, 3, 0)
    assert not needs_links(p)


def test_unshaped_direction_falls_back_to_the_port_link_counters() -> None:
    p = plan(egress={"rate": "20Mbit"})
    assert needs_links(p)
    links = {"vh1": LinkCounters(rx_bytes=111, rx_packets=1, tx_bytes=222, tx_packets=2)}
    ingress = direction_reading(p, "ingress", {}, None, links, 0)
    assert (ingress.bytes, ingress.packets) == (222, 2)  # the port transmits toward the VM


def test_engine_drops_split_into_loss_and_overflow() -> None:
    p = plan("delayd", egress={"rate": "20Mbit", "loss": "10%"})
    engine = {
        "tx_bytes": 10,
        "tx_frames": 1,
        "dropped_loss": 50,
        "dropped_overflow": 3,
        "socket_drops": 2,
        "dropped_send": 9,
    }
    counters = {("vx1", DEFAULT_MINOR): c(4000, 4, 9)}
    egress = direction_reading(p, "egress", counters, engine, {}, 0)
    assert (egress.bytes, egress.packets) == (4000, 4)  # what left the shaper
    # The 9 refused sends are the leaf's 9 drops: counted once, as rate_limit.
    assert egress.drops == {
        "rate_limit": 9,
        "queue_overflow": 5,
        "emulated_loss": 50,
        "anti_spoofing": 0,
    }
    ingress = direction_reading(p, "ingress", {}, engine, {}, 0)
    assert (ingress.bytes, ingress.packets) == (10, 1)  # unshaped: the engine's sent frames
    assert ingress.drops["queue_overflow"] == 3 + 2 + 9


def test_netem_drops_follow_what_the_direction_asks_for() -> None:
    lossy = plan("netem", egress={"rate": "20Mbit", "loss": "10%"})
    delayed = plan("netem", egress={"rate": "20Mbit", "delay": "10ms"}, ingress={"delay": "5ms"})
    assert lossy.egress.netem and not lossy.egress.leaves
    counters = {("vi1", DEFAULT_MINOR): c(800, 8, 6), ("vh1", 0): c(70, 7, 2)}
    assert direction_reading(lossy, "egress", counters, None, {}, 0).drops["emulated_loss"] == 6
    shaped = direction_reading(delayed, "egress", counters, None, {}, 0)
    assert (shaped.bytes, shaped.drops["rate_limit"], shaped.drops["emulated_loss"]) == (800, 6, 0)
    root = direction_reading(delayed, "ingress", counters, None, {}, 0)
    assert (root.packets, root.drops["queue_overflow"]) == (7, 2)


def test_a_collector_refuses_a_driver_without_counters() -> None:
    from vnic.agent.metrics import Collector

    with pytest.raises(TypeError, match="no kernel counters"):
        Collector(object())
