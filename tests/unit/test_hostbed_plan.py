"""The emulated-host bed's names and addresses (pure), and the run files it makes per host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vnic.dataplane import delayd, qemu, vminit
from vnic.errors import InvalidInput, show_value
from vnic.lab.hostbed import HostBed
from vnic.lab.hostbed_plan import plan_bed
from vnic.settings import Settings


def test_names_and_addresses() -> None:
    plan = plan_bed("ab12", 3, "10.250.0.0/24", "fd00:250::/64")
    assert plan.underlay == "vnic-ul-ab12"
    assert plan.bridge == "br-ab12"
    assert [h.netns for h in plan.every_host] == [
        "vnic-hm-ab12",
        "vnic-h1-ab12",
        "vnic-h2-ab12",
        "vnic-h3-ab12",
    ]
    assert [str(h.address4) for h in plan.every_host] == [
        "10.250.0.1/24",
        "10.250.0.11/24",
        "10.250.0.12/24",
        "10.250.0.13/24",
    ]
    assert [str(h.address6) for h in plan.every_host] == [
        "fd00:250::1/64",
        "fd00:250::11/64",
        "fd00:250::12/64",
        "fd00:250::13/64",
    ]
    assert plan.hosts[0].port == "h1-ab12" and plan.hosts[0].ifname == "ul-ab12"
    assert plan.hosts[0].alias == "vnic-hostbed:ab12/h1"
    assert plan.names() == {"vnic-ul-ab12", *(h.netns for h in plan.every_host)}


def test_every_name_carries_the_tag_and_fits_an_interface_name() -> None:
    one = plan_bed("aaaaaaaa", 99, "10.250.0.0/24", "fd00:250::/64")
    two = plan_bed("bbbbbbbb", 99, "10.250.0.0/24", "fd00:250::/64")
    links = [(h.port, h.ifname) for h in one.every_host] + [("", one.bridge)]
    assert all(len(name) <= 15 for pair in links for name in pair)
    assert not one.names() & two.names()
    assert {h.port for h in one.every_host}.isdisjoint({h.port for h in two.every_host})
    assert one.owns_link("h7-aaaaaaaa", None) and one.owns_link("x", "vnic-hostbed:aaaaaaaa/h7")
    assert not one.owns_link("h7-bbbbbbbb", "vnic-hostbed:bbbbbbbb/h7")


def test_other_subnets() -> None:
    plan = plan_bed("t", 2, "192.168.7.0/28", "fd00:1:2:3::/64")
    assert plan.hosts[1].address4 == ipaddress.IPv4Interface("192.168.7.12/28")
    assert plan.manager.address6 == ipaddress.IPv6Interface("fd00:1:2:3::1/64")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("Bad", 3, "10.250.0.0/24", "fd00:250::/64"), "tag"),
        (("toolongtag", 3, "10.250.0.0/24", "fd00:250::/64"), "tag"),
        (("t", 0, "10.250.0.0/24", "fd00:250::/64"), "count"),
        (("t", 100, "10.250.0.0/24", "fd00:250::/64"), "count"),
        (("t", True, "10.250.0.0/24", "fd00:250::/64"), "count"),
        (("t", 3, "10.250.0.1/24", "fd00:250::/64"), "subnet4"),
        (("t", 3, "10.250.0.0/29", "fd00:250::/64"), "subnet4"),
        (("t", 3, "10.250.0.0/24", "fd00:250::/126"), "subnet6"),
        (("t", 3, "10.250.0.0/24", "nonsense"), "subnet6"),
    ],
)
def test_bad_input_names_the_field(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        plan_bed(*args)  # type: ignore[arg-type]
    assert err.value.paths == [field]
    value = args[["tag", "count", "subnet4", "subnet6"].index(field)]
    assert f"got {show_value(value)}; expected" in str(err.value)


def test_run_files_follow_the_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two emulated hosts on one machine get their own VNIC_RUNTIME_DIR: the pid and run
    files of the same session and VM then never meet."""
    for name in ("VNIC_RUNTIME_DIR", "VNIC_RUN_DIR", "VNIC_NETNS_RUN_DIR", "VNIC_QEMU_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert Settings.from_env({}).runtime_dir == Path("/run/vnic")
    assert delayd.run_dir("s") == Path("/run/vnic/delayd/s")
    runs = {}
    for host in ("h1", "h2"):
        monkeypatch.setenv("VNIC_RUNTIME_DIR", str(tmp_path / host))
        runs[host] = (
            delayd.run_dir("s"),
            vminit.run_dir("s", "a"),
            qemu.run_files("s", "a").directory,
        )
    assert runs["h1"] == (
        tmp_path / "h1/delayd/s",
        tmp_path / "h1/netns/s/a",
        tmp_path / "h1/qemu/s/a",
    )
    assert all(a != b for a, b in zip(runs["h1"], runs["h2"], strict=True))
    # The older, narrower variables still win for their own directory.
    monkeypatch.setenv("VNIC_NETNS_RUN_DIR", str(tmp_path / "inits"))
    assert vminit.run_dir("s", "a") == tmp_path / "inits/s/a"
    assert delayd.run_dir("s") == tmp_path / "h2/delayd/s"


def test_a_host_is_named_by_short_name_or_namespace() -> None:
    """(No root: naming a host touches nothing.)"""
    bed = HostBed("ab12", 2)
    assert bed.host("h2") is bed.host("vnic-h2-ab12") is bed.hosts[1]
    assert bed.host("hm") is bed.manager
    with pytest.raises(InvalidInput) as err:
        bed.host("h3")
    assert err.value.paths == ["host"]
    assert "one of hm, h1, h2" in str(err.value)
