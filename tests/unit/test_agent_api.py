"""The agent's own HTTP API through the manager's client: key required, launch / reconfigure /
destroy / sync reach the driver, and errors come back as the same kinds."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vnic.agent.api import agent_key, create_agent_app
from vnic.agent.client import AgentClient, raise_for_body
from vnic.agent.core import Agent
from vnic.agent.port import DesiredVm
from vnic.drivers.fake import FakeDriver
from vnic.errors import Conflict, InvalidInput, Unauthenticated
from vnic.model.launch import LaunchRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress


def request(vm: str, rate: str = "20Mbit") -> LaunchRequest:
    eff = complete([Layer("vm-patch", "", parse_assignments([f"egress.rate={rate}"]))])
    return LaunchRequest.single(
        session="lab",
        network_id=7,
        vm=vm,
        mac=MacAddress.parse("02:00:00:00:00:07"),
        ipv4=ipaddress.IPv4Interface("10.0.7.2/24"),
        ipv6=ipaddress.IPv6Interface("fd76:6e00:7::2/64"),
        profile=build_profile(eff.values),
        values=dict(eff.values),
        revisions={"p": 1},
    )


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[AgentClient, FakeDriver, TestClient]]:
    driver = FakeDriver()
    agent = Agent(tmp_path / "agent", {"fake": driver}, default="fake")
    key = agent_key(tmp_path / "agent.key")
    assert (tmp_path / "agent.key").stat().st_mode & 0o777 == 0o600
    with TestClient(create_agent_app(agent, key), base_url="http://127.0.0.1") as http:
        yield AgentClient("http://127.0.0.1", key, default="fake", http=http), driver, http


def test_key_is_required(remote: tuple[AgentClient, FakeDriver, TestClient]) -> None:
    _, _, http = remote
    assert http.get("/v1/vms", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/v1/health", headers={"Authorization": ""}).status_code == 200
    with TestClient(http.app, base_url="http://127.0.0.1") as other, pytest.raises(Unauthenticated):
        AgentClient("http://127.0.0.1", "wrong", http=other).desired()


def test_launch_reconfigure_destroy_reach_the_driver(
    remote: tuple[AgentClient, FakeDriver, TestClient],
) -> None:
    client, driver, _ = remote
    client.launch(request("a"))
    assert driver.vms[("lab", "a")] == request("a")  # the profile survived the trip
    with pytest.raises(Conflict, match="already running"):
        client.launch(request("a"))
    client.reconfigure(request("a", "5Mbit"))
    assert str(driver.vms[("lab", "a")].profile.egress.rate) == "5Mbit"
    assert client.running("lab") == ["a"]
    assert [d.request.vm for d in client.desired()] == ["a"]
    client.destroy("lab", "a")
    assert driver.vms == {} and client.desired() == []


def test_sync_adopts_the_managers_view(remote: tuple[AgentClient, FakeDriver, TestClient]) -> None:
    client, driver, _ = remote
    client.launch(request("stale"))
    report = client.sync([DesiredVm("fake", request("b"))])
    assert report.removed == ["lab/stale"]
    assert report.reapplied == {"lab/b": ["VM lab/b is not running"]}
    assert set(driver.vms) == {("lab", "b")}


def test_bad_request_names_the_field(remote: tuple[AgentClient, FakeDriver, TestClient]) -> None:
    _, _, http = remote  # carries the agent key (set by the fixture's client)
    body = {
        "driver": "fake",
        "request": {"session": "lab", "vm": "x", "profile": {"egress": {"rate": "fast"}}},
    }
    r = http.post("/v1/vms", json=body)
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "request.profile.egress.rate"
    with pytest.raises(InvalidInput):
        raise_for_body(r)
