"""The driver base: each optional capability's default does what the agent did with a driver
that lacked it (one-step launch, rebuild for a change, drift and inventory empty, no exec)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.unit.test_agent_api import request  # one launch request builder
from vnic.agent.core import Agent
from vnic.drivers.base import Driver
from vnic.errors import DataplaneError, Unsupported
from vnic.model.fields import FIELDS
from vnic.model.launch import Capabilities, LaunchRequest


class Minimal(Driver):
    """Only the required methods: it records the calls."""

    kind = "minimal"

    def __init__(self, fail_on: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on = set(fail_on)

    def capabilities(self) -> Capabilities:
        return Capabilities(self.kind, frozenset(FIELDS))

    def launch(self, request: LaunchRequest) -> None:
        self.calls.append(("launch", request.vm))
        if request.vm in self.fail_on:
            raise DataplaneError(f"launch of {request.vm} fails on purpose")

    def destroy(self, session: str, vm: str) -> None:
        self.calls.append(("destroy", vm))

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        self.calls.append(("teardown", session))

    def running(self, session: str) -> list[str]:
        return []


def test_the_required_methods_are_abstract() -> None:
    class Half(Driver):
        kind = "half"

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]


def test_defaults() -> None:
    d = Minimal()
    r = request("a")
    d.launch_begin(r)
    d.launch_finish(r)
    assert d.calls == [("launch", "a")]
    d.calls.clear()
    assert d.reconfigure(r, request("a", "30Mbit")) == [
        "rebuilt lab/a (the minimal driver has no live change)"
    ]
    assert d.calls == [("destroy", "a"), ("launch", "a")]
    assert d.drift(r) == []
    assert d.drift_many([r, request("b")]) == {("lab", "a"): [], ("lab", "b"): []}
    assert d.inventory() == {}
    with pytest.raises(Unsupported, match="cannot run commands"):
        d.exec("lab", "a", ["true"])
    with pytest.raises(Unsupported, match="cannot run commands"):
        d.exec_captured("lab", "a", ["true"], timeout=1, max_output=10)
    with pytest.raises(Unsupported, match="cannot set the link"):
        d.set_link("lab", "a", up=False)


def test_reconfigure_many_gives_each_vm_its_outcome() -> None:
    d = Minimal(fail_on=["b"])
    out = d.reconfigure_many(
        [(request("a"), request("a", "30Mbit")), (request("b"), request("b", "30Mbit"))]
    )
    assert out[("lab", "a")] == ["rebuilt lab/a (the minimal driver has no live change)"]
    assert isinstance(out[("lab", "b")], DataplaneError)


def test_an_agent_rebuilds_through_a_driver_without_live_change(tmp_path: Path) -> None:
    d = Minimal()
    agent = Agent(tmp_path / "agent", {"minimal": d}, default="minimal")
    agent.launch(request("a"))
    assert agent.reconfigure(request("a", "30Mbit")) == [
        "rebuilt lab/a (the minimal driver has no live change)"
    ]
    assert d.calls == [("launch", "a"), ("destroy", "a"), ("launch", "a")]
    assert agent.drift() == {}
