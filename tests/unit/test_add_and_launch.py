"""Service.add_and_launch: the one place where a failed launch of a new VM defines nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.errors import DataplaneError
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.launch import LaunchRequest


def agent_of(driver: FakeDriver, tmp_path: Path) -> Agent:
    """The in-process agent the service launches through, on ``driver``."""
    return Agent(tmp_path / "agent", {"fake": driver}, default="fake")


class CountingGate:
    """A gate that counts its shared holders (a launch must run inside it)."""

    def __init__(self) -> None:
        self.holders = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[object]:
        assert self.holders == 0
        yield None


class GateCheckingDriver(FakeDriver):
    """Records, at each launch, how many hold the gate."""

    def __init__(self, gate: CountingGate) -> None:
        super().__init__()
        self.gate = gate
        self.held_at_launch: list[int] = []

    def launch(self, request: LaunchRequest) -> None:
        self.held_at_launch.append(self.gate.holders)
        super().launch(request)


def test_launches_a_new_vm_under_the_agents_gate(service: Service, tmp_path: Path) -> None:
    """The launch holds the agent's gate itself (no caller needs to): a reconcile then
    never sees a VM the agent runs that the database does not yet call running."""
    service.create_session("lab")
    gate = CountingGate()
    driver = GateCheckingDriver(gate)
    agent = agent_of(driver, tmp_path)
    agent.gate = lambda: gate  # type: ignore[method-assign]
    result = service.add_and_launch(VmRequest("lab", "web"), agent)
    assert result.vm.state == "running"
    assert driver.held_at_launch == [1] and gate.holders == 0
    assert ("lab", "web") in driver.vms
    assert service.get_vm("lab", "web").state == "running"


def test_a_failed_launch_removes_the_new_vm_and_frees_its_mac(
    service: Service, tmp_path: Path
) -> None:
    service.create_session("lab")
    driver = FakeDriver(fail_on=["doomed"])
    agent = agent_of(driver, tmp_path)
    with pytest.raises(DataplaneError):
        service.add_and_launch(VmRequest("lab", "doomed"), agent)
    assert service.list_vms("lab") == []
    assert driver.vms == {}
    # The MAC went back to the pool: the next VM gets the one "doomed" had.
    first = service.add_vm(VmRequest("lab", "other")).vm.mac
    service.remove_vm("lab", "other")
    with pytest.raises(DataplaneError):
        service.add_and_launch(VmRequest("lab", "doomed"), agent)
    assert service.add_vm(VmRequest("lab", "again")).vm.mac == first
