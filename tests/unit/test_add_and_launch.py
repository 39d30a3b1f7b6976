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


def agent_of(driver: FakeDriver, tmp_path: Path) -> Agent:
    """The in-process agent the service launches through, on ``driver``."""
    return Agent(tmp_path / "agent", {"fake": driver}, default="fake")


def test_launches_a_new_vm_holding_only_around_the_launch(service: Service, tmp_path: Path) -> None:
    service.create_session("lab")
    driver = FakeDriver()
    held: list[str] = []

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        held.append("in")
        assert [v.name for v in service.list_vms("lab")] == ["web"]  # added before the hold
        yield
        held.append("out")

    result = service.add_and_launch(VmRequest("lab", "web"), agent_of(driver, tmp_path), hold=hold)
    assert result.vm.state == "running"
    assert held == ["in", "out"]
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
