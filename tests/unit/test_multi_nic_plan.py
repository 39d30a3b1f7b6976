"""Pure parts of several vNICs per VM: each vNIC's plan from its one-vNIC slice (names,
tag, seed and bridge of its unit; the VM's TCP settings from eth0 only), how many
vNICs each driver takes, units back to VMs, and a live change that would change the
vNICs themselves refused before anything is touched."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest

from vnic.dataplane.inventory import vm_of_tag, vm_of_unit
from vnic.drivers import live, planning
from vnic.drivers.netns import NetnsDriver
from vnic.drivers.netns_vm import NetnsVm
from vnic.drivers.qemu import QemuDriver
from vnic.drivers.qemu_guest import spec_for
from vnic.errors import Conflict, Unsupported
from vnic.model.launch import LaunchRequest, NicRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.plan.guest import RunFiles, kernel_command_line, qemu_argv

TCP = ["egress.rate=10Mbit", "tcp.congestion_control=reno", "tcp.sack=false"]


def nic(name: str, network: str, network_id: int, sets: list[str]) -> NicRequest:
    eff = complete([Layer("vm-patch", "", parse_assignments(sets))])
    ipv4, ipv6 = names.vm_addresses(network_id, 2)
    mac = MacAddress.parse(f"02:00:00:00:{network_id:02x}:02")
    return NicRequest(
        name, network, network_id, mac, ipv4, ipv6, build_profile(eff.values), dict(eff.values)
    )


def two(session: str = "s") -> LaunchRequest:
    return LaunchRequest(
        session, "a", (nic("eth0", "default", 1, TCP), nic("eth1", "data", 2, TCP))
    )


def test_each_vnic_is_planned_under_its_unit_on_its_networks_bridge() -> None:
    eth0, eth1 = (planning.plan_for(one) for one in two().per_nic())
    links0, links1 = names.VmLinks.of("a"), names.VmLinks.of("a.eth1")
    assert (eth0.devices.port, eth0.devices.ifb, eth0.devices.bridge) == (
        links0.port,
        links0.ifb,
        "vbr0",
    )
    assert (eth1.devices.port, eth1.devices.ifb) == (links1.port, links1.ifb)
    assert eth1.devices.bridge == names.bridge_of("data") != "vbr0"
    assert eth0.guard is not None and eth1.guard is not None
    assert eth0.guard.identity.tag == "vnic:s/a"
    assert eth1.guard.identity.tag == "vnic:s/a.eth1"
    assert eth1.guard.identity.mac == str(two().nics[1].mac)
    assert planning.default_seed("s", "a") != planning.default_seed("s", "a.eth1")


def test_tcp_settings_are_the_vms_from_eth0_only() -> None:
    eth0, eth1 = planning.plans_for(two())
    assert eth0.congestion_control == "reno" and eth0.sysctls
    assert eth1.congestion_control is None and eth1.sysctls == ()


def test_a_one_vnic_request_is_planned_as_before() -> None:
    one = two().only("eth0")
    plan = planning.plan_for(one)
    assert plan == planning.plan_for(two())  # the first vNIC's, named by the VM alone
    assert plan.devices.port == "vh" + hashlib.sha1(b"a").hexdigest()[:10]


def test_how_many_vnics_each_driver_takes() -> None:
    netns = planning.capabilities("netns", None)
    assert netns.max_nics == 8 and "eth0..eth7" in netns.max_nics_why
    qemu = QemuDriver().capabilities()
    assert qemu.max_nics == 8 and "virtio NIC on a tap of its own" in qemu.max_nics_why
    assert qemu.to_dict()["max_nics"] == 8


def test_a_vm_with_too_many_vnics_is_refused_before_anything_is_touched() -> None:
    # Refused by the count, before the image, the run directory or any namespace.
    nine = LaunchRequest("s", "a", tuple(nic(f"eth{i}", "default", 1, TCP) for i in range(9)))
    for driver in (QemuDriver(), NetnsDriver()):
        with pytest.raises(Unsupported, match=rf"nics.*9 vNICs.*at most 8 on the {driver.kind}"):
            driver.launch_begin(nine)


def test_a_two_nic_guest_gets_a_virtio_nic_per_vnic_on_its_tap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VNIC_QEMU_ACCEL", "tcg")  # no trial boot: this test runs nothing
    request = two()
    spec = spec_for(request, planning.plans_for(request))
    eth1 = request.nics[1]
    tap1 = names.VmLinks.of("a.eth1").port
    assert spec.tap == names.VmLinks.of("a").port
    line = kernel_command_line(spec)
    assert f"vnic.nic=eth1,{eth1.mac},{eth1.ipv4},{eth1.ipv6}" in line.split()
    argv = qemu_argv(spec, Path("k"), Path("i"), RunFiles(Path("/r")))
    assert f"tap,id=net1,ifname={tap1},script=no,downscript=no" in argv
    assert f"virtio-net-pci,id=nic1,netdev=net1,mac={eth1.mac}" in argv
    # eth0's NIC first: the guest names its NICs in that order.
    assert argv.index(f"virtio-net-pci,id=nic0,netdev=net0,mac={request.mac}") < argv.index(
        f"virtio-net-pci,id=nic1,netdev=net1,mac={eth1.mac}"
    )


def test_units_map_back_to_their_vm() -> None:
    assert names.vm_units("a") == ("a", *(f"a.eth{i}" for i in range(1, 8)))
    assert vm_of_tag("vnic:s/a", "s") == "a"
    assert vm_of_tag("vnic:s/a.eth1", "s") == "a"
    assert vm_of_tag("vnic:t/a.eth1", "s") is None
    for bad in ("a.eth0", "a.eth8", "a.x", "a.eth1.eth2", "A", ""):
        assert vm_of_unit(bad) is None, bad


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: replace(r, nics=r.nics[:1]), r"nics: eth0 asked .* runs with eth0, eth1"),
        (
            lambda r: replace(r, nics=(r.nics[0], replace(r.nics[1], network="other"))),
            r"eth1\.network: other asked .* runs with data",
        ),
        (
            lambda r: replace(
                r, nics=(r.nics[0], replace(r.nics[1], mac=MacAddress.parse("02:00:00:00:09:09")))
            ),
            r"eth1\.mac: 02:00:00:00:09:09 asked",
        ),
    ],
)
def test_a_live_change_of_the_vnics_themselves_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    before = two()
    out = live.reconfigure_many(
        NetnsVm(),
        planning.capabilities("netns", None),
        planning.plan_for,
        [(before, change(before))],
    )
    error = out[("s", "a")]
    assert isinstance(error, Conflict)
    # The message names the field and value, and says when the vNICs can change.
    assert "vNICs change only on a stopped VM" in str(error)
    assert re.search(message, str(error)), str(error)
