"""A session's placement policy: where its VMs go among many hosts (pack, spread, labels),
set when the session is created or changed, with field-named errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.errors import Exhausted, InvalidInput
from vnic.manager.results import VmRequest
from vnic.manager.service import Service


def _hosts(service: Service) -> None:
    for name, rack in (("h1", "a"), ("h2", "a"), ("h3", "b")):
        service.add_host(name, {"rack": rack})
        service.register_host(name, underlay=f"10.0.0.{name[1]}", vnics=8, cpus=2)
    service.host_wait = 0.0  # nobody reports here: launches leave their VMs desired


def _launch(service: Service, session: str, names: list[str], tmp_path: Path) -> dict[str, str]:
    agent = Agent(tmp_path / "agent", {"fake": FakeDriver()}, default="fake")
    for name in names:
        service.add_and_launch(VmRequest(session, name), agent)
    return {v.name: str(v.host) for v in service.list_vms(session)}


def test_pack_fills_few_hosts_with_the_labels_asked_for(service: Service, tmp_path: Path) -> None:
    _hosts(service)
    service.create_session("packed", placement={"strategy": "pack", "labels": {"rack": "a"}})
    placed = _launch(service, "packed", ["a", "b", "c"], tmp_path)
    assert set(placed.values()) == {"h1"}  # all on one host of rack a
    assert service.get_session("packed").placement == {"strategy": "pack", "labels": {"rack": "a"}}


def test_spread_uses_every_host_and_a_change_of_policy_applies_to_new_launches(
    service: Service, tmp_path: Path
) -> None:
    _hosts(service)
    service.create_session("wide")
    assert _launch(service, "wide", ["a", "b", "c"], tmp_path) == {"a": "h1", "b": "h2", "c": "h3"}
    service.update_session("wide", {"placement": {"labels": {"rack": "b"}}})
    placed = _launch(service, "wide", ["d"], tmp_path)
    assert placed["d"] == "h3"
    # Only rack c is asked for now: no host has it, and the refusal says why of each.
    service.update_session("wide", {"placement": {"labels": {"rack": "c"}}})
    with pytest.raises(Exhausted, match="h1 lacks label rack=c"):
        _launch(service, "wide", ["e"], tmp_path)
    assert {v.name for v in service.list_vms("wide")} == {"a", "b", "c", "d"}  # e not defined


@pytest.mark.parametrize(
    ("placement", "path"),
    [
        ({"strategy": "wide"}, "placement.strategy"),
        ({"labels": {"Bad Key": "x"}}, "placement.labels.Bad Key"),
        ({"where": "anywhere"}, "placement"),
        ("pack", "placement"),
    ],
)
def test_bad_placement_is_refused_by_field(service: Service, placement: object, path: str) -> None:
    with pytest.raises(InvalidInput) as err:
        service.create_session("s", placement=placement)  # type: ignore[arg-type]
    assert err.value.paths == [path]
    assert service.list_sessions() == []
