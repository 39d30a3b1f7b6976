"""Networks per session and vNICs per VM through the service, on the fake driver: networks
CRUD and every refusal (changing nothing), MACs and addresses per vNIC, resolution per
vNIC (network default < rule matching the network < the vNIC's override < its runtime
adjustments), explain per vNIC, and a live change of one vNIC touching only it. The
kernel side of several vNICs is the data plane's (tests/netns)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.api_fixtures import Api, make_api
from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.errors import Conflict, InUse, InvalidInput, NotFound, Unsupported
from vnic.manager.results import VmRequest
from vnic.manager.runtime import Runtime
from vnic.manager.service import Service
from vnic.model.launch import Capabilities
from vnic.model.network import NicSpec
from vnic.model.profile import parse_assignments, parse_profile_document
from vnic.model.session import AssignmentRule
from vnic.model.units import MacAddress
from vnic.plan.names import session_ipv4, session_ipv6, vm_addresses


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


@pytest.fixture
def svc(api: Api) -> Service:
    service = api.manager.service
    service.apply_profiles(
        [
            parse_profile_document(d)
            for d in (
                {"name": "campus", "egress": {"rate": "20Mbit"}},
                {"name": "fast", "egress": {"rate": "100Mbit"}, "ingress": {"rate": "90Mbit"}},
                {"name": "storage", "egress": {"rate": "40Mbit", "delay": "1ms"}},
                {
                    "name": "own-macs",
                    "egress": {"rate": "7Mbit"},
                    "mac_range": "02:aa:00:00:00:00-02:aa:00:00:00:0f",
                },
            )
        ]
    )
    service.create_session("lab", default_profile="campus")
    return service


def two_nics(svc: Service, vm: str = "a", **eth1: object) -> None:
    svc.add_vm(
        VmRequest("lab", vm, nics=[NicSpec("default"), NicSpec("data", **eth1)])  # type: ignore[arg-type]
    )


def snapshot(svc: Service) -> tuple[object, ...]:
    """What a refusal must leave as it was."""
    return (
        [(n.name, n.network_id, n.ipv4, n.ipv6, tuple(n.nics)) for n in svc.list_networks("lab")],
        [
            (v.name, tuple((n.name, n.network, n.mac, n.ipv4) for n in v.nics))
            for v in svc.list_vms("lab")
        ],
    )


# ----------------------------------------------------------------------------- networks


def test_every_session_has_default_with_its_network_id_and_subnets(svc: Service) -> None:
    session = svc.get_session("lab")
    (net,) = svc.list_networks("lab")
    assert (net.name, net.network_id, session.networks) == (
        "default",
        session.network_id,
        ["default"],
    )
    assert net.ipv4 == str(session_ipv4(session.network_id))
    assert net.ipv6 == str(session_ipv6(session.network_id))
    assert net.default_profile is None  # the session's applies


def test_a_network_gets_a_free_id_and_subnets_derived_from_it_unless_chosen(svc: Service) -> None:
    svc.create_session("other")  # network id 2
    data = svc.add_network("lab", "data")
    assert data.network_id == 3  # 1 and 2 are the sessions'
    assert data.ipv4 == str(session_ipv4(3)) and data.ipv6 == str(session_ipv6(3))
    mgmt = svc.add_network(
        "lab",
        "mgmt",
        network_id=5000,
        ipv4="172.16.8.0/22",
        ipv6="fd00:8::/64",
        default_profile="fast",
    )
    assert (mgmt.network_id, mgmt.ipv4, mgmt.ipv6, mgmt.default_profile) == (
        5000,
        "172.16.8.0/22",
        "fd00:8::/64",
        "fast",
    )
    assert [n.name for n in svc.list_networks("lab")] == ["default", "data", "mgmt"]
    assert svc.get_network("lab", "mgmt").network_id == 5000
    assert svc.create_session("third").network_id == 4  # ids of networks are taken too
    svc.remove_network("lab", "data")
    assert [n.name for n in svc.list_networks("lab")] == ["default", "mgmt"]
    with pytest.raises(NotFound, match="data"):
        svc.get_network("lab", "data")


def test_network_refusals_name_the_field_and_change_nothing(svc: Service) -> None:
    svc.create_session("other")  # network id 2
    svc.add_network("other", "far", network_id=900)
    svc.add_network("lab", "data", ipv4="10.50.0.0/24", ipv6="fd00:50::/64")
    before = snapshot(svc)
    cases = [
        ({"name": "data"}, Conflict, "already exists"),
        ({"name": "Bad_Name"}, InvalidInput, "name"),
        ({"name": "x", "network_id": 900}, InvalidInput, "network other/far"),
        ({"name": "x", "network_id": 2}, InvalidInput, "network other/default"),
        ({"name": "x", "network_id": 0}, InvalidInput, "VXLAN"),
        ({"name": "x", "network_id": 2**24}, InvalidInput, "VXLAN"),
        ({"name": "x", "ipv4": "10.50.0.0/23"}, InvalidInput, "network data has 10.50.0.0/24"),
        ({"name": "x", "ipv6": "fd00:50::/48"}, InvalidInput, "network data has fd00:50::/64"),
        ({"name": "x", "ipv4": "10.60.0.0/30"}, InvalidInput, "/8../24"),
        ({"name": "x", "ipv4": "10.60.0.1/24"}, InvalidInput, "CIDR"),
        ({"name": "x", "default_profile": "nope"}, InvalidInput, "existing profile"),
    ]
    for kwargs, error, text in cases:
        name = kwargs.pop("name")
        with pytest.raises(error, match=text) as info:
            svc.add_network("lab", str(name), **kwargs)  # type: ignore[arg-type]
        if isinstance(info.value, InvalidInput) and kwargs:
            assert info.value.paths == [next(iter(kwargs))]
    # Derived subnets that collide say so and how to choose one.
    with pytest.raises(InvalidInput, match="choose one with ipv4") as info:
        svc.add_network("lab", "x", network_id=65536 + 1)  # 10.0.1.0/24, as lab's default
    assert info.value.paths == ["ipv4"]
    # A session's network id must not be another session's network's either.
    with pytest.raises(Conflict, match="network_id 900 is already used by network other/far"):
        svc.create_session("fourth", network_id=900)
    assert [s.name for s in svc.list_sessions()] == ["lab", "other"]
    assert snapshot(svc) == before


def test_removing_default_or_a_network_in_use_is_refused_naming_the_vnics(svc: Service) -> None:
    svc.add_network("lab", "data")
    two_nics(svc, "a")
    two_nics(svc, "b")
    before = snapshot(svc)
    with pytest.raises(InUse, match="lab/a/eth1, lab/b/eth1"):
        svc.remove_network("lab", "data")
    with pytest.raises(InvalidInput, match="other than default") as info:
        svc.remove_network("lab", "default")
    assert info.value.paths == ["network"]
    assert snapshot(svc) == before
    svc.remove_vm("lab", "a")
    svc.remove_vm("lab", "b")
    svc.remove_network("lab", "data")
    # A session with networks and vNICs still goes as a whole.
    svc.add_network("lab", "data")
    two_nics(svc, "c")
    assert svc.delete_session("lab", force=True) == ["c"]


# ----------------------------------------------------------------------------- vNICs


def test_each_vnic_gets_a_mac_from_its_own_profile_and_an_address_in_its_network(
    svc: Service,
) -> None:
    data = svc.add_network("lab", "data", default_profile="own-macs")
    two_nics(svc, "a")
    two_nics(svc, "b")
    a, b = svc.list_vms("lab")
    assert [(n.name, n.network) for n in a.nics] == [("eth0", "default"), ("eth1", "data")]
    # eth1's MACs come from its own effective profile's range (the network's default).
    own = [MacAddress.parse(n.mac).value for v in (a, b) for n in v.nics if n.network == "data"]
    assert own == [MacAddress.parse("02:aa:00:00:00:00").value + i for i in (0, 1)]
    macs = [n.mac for v in (a, b) for n in v.nics]
    assert len(set(macs)) == 4
    # Addresses: a host index unique within each network, lowest free first.
    net = ipaddress.IPv4Network(data.ipv4)
    assert [n.ipv4 for n in a.nics] == [
        str(vm_addresses(svc.get_session("lab").network_id, 2)[0].ip),
        str(net.network_address + 2),
    ]
    assert b.nics[1].ipv4 == str(net.network_address + 3)
    assert (a.mac, a.ipv4, a.ipv6) == (a.nics[0].mac, a.nics[0].ipv4, a.nics[0].ipv6)
    # Removing a VM frees its vNICs' MACs and addresses for the next.
    svc.remove_vm("lab", "a")
    two_nics(svc, "c")
    c = svc.get_vm("lab", "c")
    assert [n.ipv4 for n in c.nics] == [n.ipv4 for n in a.nics]
    assert c.nics[1].mac == a.nics[1].mac


def test_vnic_refusals_name_the_field_and_write_nothing(svc: Service) -> None:
    svc.create_session("other")
    svc.add_network("other", "elsewhere")
    svc.add_network("lab", "data")
    before = snapshot(svc)
    cases = [
        (
            [NicSpec("default"), NicSpec("elsewhere")],
            "nics[1].network",
            "a network of session 'lab'",
        ),
        ([NicSpec("nope")], "nics[0].network", "default, data"),
        ([NicSpec("default")] * 9, "nics", "at most 8"),
        ([NicSpec("default"), NicSpec("data", profile="nope")], "nics[1].profile", "existing"),
        (
            [NicSpec("default"), NicSpec("data", patch=parse_assignments(["egress.rate=1Mbit"]))],
            None,
            None,
        ),
    ]
    for nics, path, text in cases[:-1]:
        with pytest.raises(InvalidInput, match=text) as info:
            svc.add_vm(VmRequest("lab", "x", nics=nics))
        assert info.value.paths == [path]
    # A VM-wide override and vNICs of their own: one place says what a vNIC gets.
    with pytest.raises(InvalidInput, match="give each vNIC its own") as info:
        svc.add_vm(VmRequest("lab", "x", profile="fast", nics=[NicSpec("default")]))
    assert info.value.paths == ["profile"]
    svc.update_session("lab", {"overrides_allowed": False})
    with pytest.raises(InvalidInput, match="does not allow overrides") as info:
        svc.add_vm(VmRequest("lab", "x", nics=cases[-1][0]))
    assert info.value.paths == ["nics[1].set"]
    assert snapshot(svc) == before


def test_a_driver_taking_fewer_vnics_refuses_the_launch_before_touching_anything(
    svc: Service, tmp_path: Path
) -> None:
    class OneNic(FakeDriver):
        def capabilities(self) -> Capabilities:
            return Capabilities(self.kind, super().capabilities().fields)

    driver = OneNic()
    agent = Agent(tmp_path / "one", {"fake": driver}, default="fake", doctor=dict)
    svc.add_network("lab", "data")
    two_nics(svc, "a")
    with pytest.raises(
        Unsupported, match=r"nics: got 2 vNICs; expected at most 1 on the fake driver"
    ):
        svc.launch_vm("lab", "a", agent)
    assert driver.vms == {} and driver.launches == 0
    assert svc.get_vm("lab", "a").state == "defined"
    svc.add_vm(VmRequest("lab", "b"))
    svc.launch_vm("lab", "b", agent)  # one vNIC: as before
    assert list(driver.vms) == [("lab", "b")]


# ----------------------------------------------------------------------------- resolution


def test_resolution_per_vnic_in_order_and_explain_names_every_layer(api: Api, svc: Service) -> None:
    svc.add_network("lab", "data", default_profile="storage")
    svc.add_network("lab", "mgmt")
    svc.add_vm(
        VmRequest(
            "lab",
            "a",
            nics=[
                NicSpec("default"),
                NicSpec("data"),
                NicSpec("mgmt", patch=parse_assignments(["egress.rate=3Mbit"])),
                NicSpec("mgmt", profile="fast"),
            ],
        )
    )
    e = svc.explain("lab", "a")
    assert list(e.nics) == ["eth0", "eth1", "eth2", "eth3"]
    src = {n: {p: str(s) for p, s in eff.sources.items()} for n, eff in e.nics.items()}
    rate = {n: str(eff.values["egress.rate"]) for n, eff in e.nics.items()}
    assert rate == {"eth0": "20Mbit", "eth1": "40Mbit", "eth2": "3Mbit", "eth3": "100Mbit"}
    assert src["eth0"]["egress.rate"] == "session-default (campus r1)"
    assert src["eth1"]["egress.rate"] == "session-default (network data: storage r1)"
    assert src["eth2"]["egress.rate"] == "vm-patch (override)"
    assert src["eth3"]["egress.rate"] == "vm-profile (fast r1)"
    assert e.effective is e.nics["eth0"]  # the one-vNIC result stays eth0's

    # A rule on the network wins over the network's default, only on that network.
    svc.update_session("lab", {"rules": [AssignmentRule("fast", network="data")]})
    e = svc.explain("lab", "a")
    assert str(e.nics["eth1"].values["egress.rate"]) == "100Mbit"
    assert str(e.nics["eth1"].sources["egress.rate"]).startswith("rule (#1 network=data -> fast")
    assert str(e.nics["eth0"].values["egress.rate"]) == "20Mbit"

    # A runtime adjustment of one vNIC is that vNIC's top layer, and only its.
    runtime = Runtime(svc)
    nine = parse_assignments(["egress.rate=9Mbit"])
    changed = runtime.adjust("lab", "a", source="user", reason="test", values=nine, nic="eth2")
    assert changed["egress.rate"] == ("3Mbit", "9Mbit")
    e = svc.explain("lab", "a")
    assert str(e.nics["eth2"].values["egress.rate"]) == "9Mbit"
    assert e.nics["eth2"].sources["egress.rate"].layer == "runtime"
    assert str(e.nics["eth3"].values["egress.rate"]) == "100Mbit"
    assert [(a.nic, a.source) for a in runtime.adjustments("lab", "a")] == [("eth2", "user")]
    (entry,) = runtime.audit("lab")
    assert (entry.vm, entry.nic) == ("a", "eth2")
    with pytest.raises(NotFound, match="eth5"):
        runtime.adjust("lab", "a", source="user", reason="x", values=nine, nic="eth5")


# ----------------------------------------------------------------------------- running VMs


def test_a_launch_carries_every_vnic_and_a_live_change_of_one_touches_only_it(
    api: Api, svc: Service
) -> None:
    svc.add_network("lab", "data")
    two_nics(svc, "a")
    svc.launch_vm("lab", "a", api.manager.agent)
    request = api.driver.vms[("lab", "a")]
    a = svc.get_vm("lab", "a")
    assert [(n.name, n.network, str(n.mac), str(n.ipv4.ip)) for n in request.nics] == [
        (n.name, n.network, n.mac, n.ipv4) for n in a.nics
    ]
    assert request.nics[1].network_id == svc.get_network("lab", "data").network_id
    before_eth0 = request.nics[0]

    result, changes = svc.update_vm_live(
        "lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}}, api.manager.agent, nic="eth1"
    )
    assert [(c.nic, sorted(c.fields)) for c in changes] == [
        ("eth1", ["egress.queue", "egress.rate"])
    ]
    assert changes[0].kernel and all(k.startswith("eth1: ") for k in changes[0].kernel)
    now = api.driver.vms[("lab", "a")]
    assert str(now.nics[1].profile.egress.rate) == "2Mbit"
    assert now.nics[0] == before_eth0  # eth0 untouched
    assert result.vm.nics[1].override_patch == {"egress": {"rate": "2Mbit"}}
    assert result.vm.override_patch is None  # eth0's
    (entry,) = Runtime(svc).audit("lab")
    assert (entry.nic, entry.reason, entry.new["egress.rate"]) == (
        "eth1",
        "vNIC eth1 override",
        "2Mbit",
    )
    # Nothing left to apply, and a change of the session default reaches both vNICs.
    assert svc.reapply(api.manager.agent, session="lab") == []
    svc.update_session("lab", {"default_profile": "storage"})
    changes = {c.nic: c for c in svc.reapply(api.manager.agent, session="lab")}
    assert sorted(changes) == ["eth0", "eth1"]
    assert "egress.rate" not in changes["eth1"].fields  # eth1's own patch keeps its rate
    assert changes["eth1"].fields["egress.delay"] == (None, "1ms")
    eth0, eth1 = api.driver.vms[("lab", "a")].nics
    assert (str(eth0.profile.egress.rate), str(eth1.profile.egress.rate)) == ("40Mbit", "2Mbit")
    # The desired state of the agents carries both vNICs.
    ((_, desired),) = svc.desired()
    assert [n.name for n in desired.nics] == ["eth0", "eth1"]


def test_profiles_used_by_a_network_or_a_vnic_name_those_uses(svc: Service) -> None:
    svc.add_network("lab", "data", default_profile="own-macs")
    two_nics(svc, "a", profile="storage")
    users = {p.name: list(p.users) for p in svc.list_profiles()}
    assert users["own-macs"] == ["network lab/data (default profile)"]
    assert users["storage"] == ["vm lab/a/eth1 (override)"]
    with pytest.raises(InUse, match="vm lab/a/eth1"):
        svc.delete_profile("storage")
    # storage sets no MAC range, so eth1's comes from its network's default, own-macs; a
    # new revision of own-macs that would take eth1's MAC out of it is refused, naming it.
    eth1_mac = svc.get_vm("lab", "a").nics[1].mac
    assert eth1_mac is not None and eth1_mac.startswith("02:aa:")
    moved = {"name": "own-macs", "egress": {"rate": "7Mbit"}}
    moved["mac_range"] = "02:bb:00:00:00:00-02:bb:00:00:00:0f"
    with pytest.raises(InvalidInput, match=f"lab/a/eth1.*{eth1_mac}"):
        svc.apply_profiles([parse_profile_document(moved)])
    assert svc.get_profile("own-macs").revision == 1
