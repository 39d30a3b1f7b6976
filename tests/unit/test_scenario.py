"""Scenarios and traces on a fake clock: parsing and errors, timeline on time, pause/resume/stop,
loop, the cumulative layer, Mahimahi trace parsing and rates, write_trace round trip."""

from __future__ import annotations

from typing import Any

import pytest

from vnic.controller.scenario import parse_scenario
from vnic.controller.scenario_run import ScenarioRun
from vnic.controller.trace import parse_trace, write_trace
from vnic.errors import Conflict, InvalidInput
from vnic.model.fields import OFF
from vnic.model.units import Duration, Probability, Rate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


DEGRADE: dict[str, Any] = {
    "name": "degrade",
    "vms": ["a", "b"],
    "loop": False,
    "steps": [
        {"at": "0s", "profile": "lan"},
        {"at": "30s", "set": {"egress.loss": "5%"}},
        {"at": "60s", "set": {"egress.delay": "300ms", "ingress.delay": "300ms"}},
        {"at": "90s", "clear": True},
    ],
}


def _paths(exc: pytest.ExceptionInfo[InvalidInput]) -> dict[str, str]:
    return {e.path: e.expected for e in exc.value.errors}


# --------------------------------------------------------------------------- parsing


def test_parse_timeline() -> None:
    s = parse_scenario(DEGRADE)
    assert s.name == "degrade" and s.vms == ("a", "b") and s.loop is False
    assert [st.at for st in s.steps] == [0.0, 30.0, 60.0, 90.0]
    assert s.steps[0].profile == "lan"
    assert s.steps[1].values == {"egress.loss": s.steps[1].values["egress.loss"]}
    assert s.steps[2].values == {
        "egress.delay": Duration.parse("300ms"),
        "ingress.delay": Duration.parse("300ms"),
    }
    assert s.steps[3].clear
    assert s.duration == 90.0


def test_round_trip() -> None:
    s = parse_scenario({**DEGRADE, "duration": "2m"})
    doc = s.to_document()
    assert doc["duration"] == "2m"
    assert parse_scenario(doc) == s
    assert s.nic == "eth0" and "nic" not in doc  # eth0 unless named
    on_eth1 = parse_scenario({**DEGRADE, "nic": "eth1"})
    assert on_eth1.nic == "eth1" and on_eth1.to_document()["nic"] == "eth1"
    assert parse_scenario(on_eth1.to_document()) == on_eth1


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        (
            {"steps": [{"at": "0s", "profile": "lan"}, {"at": "0s", "set": {"egress.loss": "1%"}}]},
            "steps[1].at",
            "strictly increase",
        ),
        (
            {
                "steps": [
                    {"at": "10s", "profile": "lan"},
                    {"at": "20s", "profile": "wan"},
                    {"at": "15s", "clear": True},
                ]
            },
            "steps[2].at",
            "after step 1's 20s",
        ),
        ({"steps": [{"at": "soon", "profile": "lan"}]}, "steps[0].at", "time span"),
        ({"steps": [{"profile": "lan"}]}, "steps[0].at", "time"),
        ({"steps": [{"at": "1s"}]}, "steps[0]", "one of profile, set, clear"),
        ({"steps": [{"at": "1s", "set": {"egress.loss": "lots"}}]}, "steps[0].set.egress.loss", ""),
        ({"steps": [{"at": "1s", "clear": True, "profile": "x"}]}, "steps[0].clear", "alone"),
        ({"steps": [{"at": "1s", "wait": True}]}, "steps[0].wait", "one of at"),
        ({"steps": []}, "steps", "non-empty"),
        ({"vms": "a"}, "vms", "list"),
        ({"vms": ["a", "a"]}, "vms[1]", "each VM once"),
        ({"loop": "yes"}, "loop", "true or false"),
        ({"nic": "eth8"}, "nic", "a vNIC name eth0..eth7"),
        ({"nic": "eth*"}, "nic", "a vNIC name eth0..eth7"),
        ({"duration": "60s"}, "duration", "at least the time of the last step (90s)"),
        ({"field": "egress.rate"}, "field", "only with a trace"),
        ({"trace": [1, 2]}, "", "exactly one of steps"),
    ],
)
def test_errors_name_the_path(change: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({**DEGRADE, **change})
    paths = _paths(exc)
    assert path in paths, paths
    assert fragment in paths[path]


def test_loop_needs_a_period() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "x", "loop": True, "steps": [{"at": "0s", "profile": "lan"}]})
    assert "duration" in _paths(exc)


# --------------------------------------------------------------------------- playing


def test_timeline_on_time() -> None:
    clock = Clock()
    run = ScenarioRun(parse_scenario(DEGRADE), clock)
    assert run.state == "idle" and run.due() == [] and run.next_due_in() is None
    run.start()
    assert run.state == "running"
    first = run.due()
    assert [d.index for d in first] == [0] and first[0].late == 0.0
    assert run.layer().profile == "lan" and dict(run.layer().values) == {}
    assert run.next_due_in() == 30.0
    clock.now += 29.999
    assert run.due() == []
    clock.now += 0.001
    (second,) = run.due()
    assert second.index == 1 and second.late == pytest.approx(0.0, abs=1e-6)
    assert run.layer().profile == "lan"
    assert run.layer().values == {"egress.loss": second.step.values["egress.loss"]}
    clock.now += 30
    run.due()
    assert set(run.layer().values) == {"egress.loss", "egress.delay", "ingress.delay"}
    assert run.position() == pytest.approx(60.0)
    clock.now += 30
    (last,) = run.due()
    assert last.step.clear
    assert run.layer().empty
    assert run.state == "finished"
    assert run.next_due_in() is None
    clock.now += 100
    assert run.position() == 90.0  # frozen at the end


def test_each_step_exactly_once_and_late_steps_reported_in_order() -> None:
    clock = Clock()
    run = ScenarioRun(parse_scenario(DEGRADE), clock)
    run.start()
    clock.now += 75  # the scheduler stalled
    due = run.due()
    assert [d.index for d in due] == [0, 1, 2]
    assert [d.late for d in due] == [75.0, 45.0, 15.0]
    assert run.due() == []
    assert run.layer().profile == "lan"
    assert run.layer().values["egress.delay"] == Duration.parse("300ms")


def test_pause_freezes_the_timeline_and_resume_continues() -> None:
    clock = Clock()
    run = ScenarioRun(parse_scenario(DEGRADE), clock)
    run.start()
    run.due()
    clock.now += 20
    run.pause()
    assert run.state == "paused"
    clock.now += 1000  # a long pause: nothing becomes due
    assert run.position() == 20.0
    assert run.due() == []
    assert run.next_due_in() == 10.0  # as it will be right after resume
    run.pause()  # idempotent
    run.resume()
    assert run.position() == 20.0
    clock.now += 10
    assert [d.index for d in run.due()] == [1]
    assert run.position() == 30.0


def test_stop_ends_the_run_for_good() -> None:
    clock = Clock()
    run = ScenarioRun(parse_scenario(DEGRADE), clock)
    run.start()
    clock.now += 40
    run.due()
    run.stop()
    assert run.state == "stopped"
    clock.now += 100
    assert run.due() == [] and run.next_due_in() is None
    assert run.position() == 40.0
    run.stop()  # idempotent
    with pytest.raises(Conflict):
        run.resume()
    with pytest.raises(Conflict):
        run.start()


def test_pause_before_start_is_a_conflict() -> None:
    run = ScenarioRun(parse_scenario(DEGRADE), Clock())
    with pytest.raises(Conflict):
        run.pause()


def test_finishes_at_the_duration_after_the_last_step() -> None:
    clock = Clock()
    run = ScenarioRun(parse_scenario({**DEGRADE, "duration": "100s"}), clock)
    run.start()
    clock.now += 95
    assert len(run.due()) == 4
    assert run.state == "running"
    assert run.next_due_in() == pytest.approx(5.0)
    clock.now += 5
    assert run.due() == []
    assert run.state == "finished"


def test_loop_repeats_with_the_period_and_starts_each_cycle_afresh() -> None:
    clock = Clock()
    doc = {
        "name": "blink",
        "loop": True,
        "duration": "10s",
        "steps": [
            {"at": "1s", "set": {"egress.loss": "50%"}},
            {"at": "5s", "set": {"egress.delay": "10ms"}},
        ],
    }
    run = ScenarioRun(parse_scenario(doc), clock)
    run.start()
    assert run.next_due_in() == 1.0
    clock.now += 5
    assert [d.index for d in run.due()] == [0, 1]
    assert set(run.layer().values) == {"egress.loss", "egress.delay"}
    assert run.next_due_in() == 6.0  # 11 s: cycle 1, step 0
    clock.now += 6
    (d,) = run.due()
    assert (d.cycle, d.index, d.due_at) == (1, 0, 11.0)
    assert set(run.layer().values) == {"egress.loss"}  # delay came from the previous cycle
    clock.now += 30  # stalled over three cycles: every step, in order
    due = run.due()
    assert [(x.cycle, x.index) for x in due] == [(1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]
    assert run.state == "running"


def test_set_off_and_profile_reset_in_the_layer() -> None:
    clock = Clock()
    doc = {
        "name": "x",
        "steps": [
            {"at": "0s", "set": {"egress.rate": "10mbit", "egress.loss": "1%"}},
            {"at": "1s", "set": {"egress.loss": "off"}},
            {"at": "2s", "profile": "wan", "set": {"egress.delay": "5ms"}},
        ],
    }
    run = ScenarioRun(parse_scenario(doc), clock)
    run.start()
    clock.now += 1
    run.due()
    assert run.layer().values == {"egress.rate": Rate(10_000_000), "egress.loss": OFF}
    clock.now += 1
    run.due()
    assert run.layer().profile == "wan"
    assert run.layer().values == {"egress.delay": Duration.parse("5ms")}


# --------------------------------------------------------------------------- traces


def test_trace_parse_and_period() -> None:
    t = parse_trace("1\n1\n2\n\n5\n")
    assert t.timestamps_ms == (1, 1, 2, 5)
    assert t.period_ms == 5 and t.period == 0.005


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("1\n2\nx\n", "trace line 3", "'x'"),
        ("5\n3\n", "trace line 2", "'3'"),
        ("1\n-2\n", "trace line 2", "'-2'"),
        ("1\n2.5\n", "trace line 2", "'2.5'"),
    ],
)
def test_trace_errors_name_the_line(text: str, path: str, value: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_trace(text)
    (err,) = exc.value.errors
    assert err.path == path and err.value == value
    assert err.expected.startswith("a non-decreasing integer of milliseconds")


def test_trace_needs_a_period() -> None:
    with pytest.raises(InvalidInput):
        parse_trace("")
    with pytest.raises(InvalidInput) as exc:
        parse_trace("0\n0\n")
    assert "above 0" in str(exc.value)


def test_trace_rates_constant_link() -> None:
    # one packet per ms is 12 Mbit/s, written as netem-trace does: 1, 2, ..., 1000
    t = parse_trace("".join(f"{i}\n" for i in range(1, 1001)))
    assert t.rates(0.1) == [12_000_000] * 10
    assert t.rate_at(0.35) == 12_000_000
    assert t.rate_at(1.35) == 12_000_000  # loops


def test_trace_rates_per_window_and_loop_position() -> None:
    # 10 packets in the first 100 ms, 1 in the second
    stamps = [10 * i for i in range(1, 11)] + [200]
    t = parse_trace(stamps)
    assert t.rates(0.1) == [1_200_000, 120_000]
    assert t.rate_at(0.05) == 1_200_000
    assert t.rate_at(0.15) == 120_000
    assert t.rate_at(0.25) == 1_200_000  # 250 ms is 50 ms into the second cycle


def test_write_trace_round_trip() -> None:
    rates = [12_000_000, 0, 1_200_000, 24_000_000, 120_000]
    text = write_trace(rates, 0.1)
    t = parse_trace(text)
    assert t.period_ms == 500
    assert t.rates(0.1) == rates
    assert write_trace([12_000_000] * 1, 0.005) == "1\n2\n3\n4\n5\n"


def test_write_trace_needs_a_packet_in_the_last_window() -> None:
    with pytest.raises(ValueError):
        write_trace([12_000_000, 0], 0.1)


def test_trace_scenario_becomes_rate_steps() -> None:
    text = write_trace([1_200_000, 1_200_000, 2_400_000, 0, 120_000], 0.1)
    s = parse_scenario({"name": "lte", "trace": text, "fields": ["egress.rate", "ingress.rate"]})
    assert s.duration == 0.5
    assert [st.at for st in s.steps] == [0.0, 0.2, 0.3, 0.4]  # equal windows merged
    assert s.steps[0].values == {
        "egress.rate": Rate(1_200_000),
        "ingress.rate": Rate(1_200_000),
    }
    assert s.steps[2].values["egress.rate"] == Rate(1)  # no opportunities: the smallest rate
    assert parse_scenario(s.to_document()) == s


def test_trace_scenario_plays_and_loops() -> None:
    clock = Clock()
    stamps = [int(x) for x in write_trace([120_000, 240_000], 0.1).split()]
    s = parse_scenario(
        {"name": "t", "trace": stamps, "field": "egress.rate", "window": "100ms", "loop": True}
    )
    run = ScenarioRun(s, clock)
    run.start()
    run.due()
    assert run.layer().values == {"egress.rate": Rate(120_000)}
    assert run.next_due_in() == pytest.approx(0.1)
    clock.now += 0.1
    run.due()
    assert run.layer().values == {"egress.rate": Rate(240_000)}
    clock.now += 0.1
    (d,) = run.due()
    assert d.cycle == 1 and run.layer().values == {"egress.rate": Rate(120_000)}


def test_trace_scenario_errors() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "trace": [1, 3, 2], "field": "egress.delay"})
    paths = _paths(exc)
    assert "field" in paths and "trace[2]" in paths
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "trace": [5], "field": "egress.rate", "window": "1.5ms"})
    assert "window" in _paths(exc)
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "trace": "cellular.trace", "field": "egress.rate"})
    assert "reads no files" in _paths(exc)["trace"]


def test_trace_file_read_through_the_callers_reader() -> None:
    files = {"up.trace": "1\n2\n3\n"}
    s = parse_scenario(
        {"name": "t", "trace": "up.trace", "field": "egress.rate"}, read_file=files.__getitem__
    )
    assert s.trace is not None and s.trace.timestamps_ms == (1, 2, 3)
    files["bad.trace"] = "1\nz\n"
    with pytest.raises(InvalidInput) as exc:
        parse_scenario(
            {"name": "t", "trace": "bad.trace", "field": "egress.rate"},
            read_file=files.__getitem__,
        )
    assert exc.value.paths == ["trace bad.trace line 2"]


def test_probability_values_in_steps_are_typed() -> None:
    s = parse_scenario(DEGRADE)
    loss = s.steps[1].values["egress.loss"]
    assert loss.mean == Probability.parse("5%")


def test_a_scenario_changes_a_vm_at_most_every_20ms() -> None:
    """An owner's 1 ms trace on three VMs kept 85 % of a core busy: windows, step gaps
    and loop periods have a floor, refused by name."""
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "trace": [5], "field": "egress.rate", "window": "1ms"})
    assert "at least 20ms" in _paths(exc)["window"]
    assert parse_scenario(
        {"name": "t", "trace": [5], "field": "egress.rate", "window": "20ms"}
    ).window == pytest.approx(0.02)
    steps = [{"at": "0s", "set": {"egress.rate": "1Mbit"}}, {"at": "5ms", "clear": True}]
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "steps": steps})
    assert "20ms" in _paths(exc)["steps[1].at"]
    with pytest.raises(InvalidInput) as exc:
        parse_scenario({"name": "t", "loop": True, "duration": "1ms", "steps": steps[:1]})
    assert "at least 20ms" in _paths(exc)["duration"]
