"""The netns VM init's pure parts: which namespaces are VMs', the VM's /etc files, and
that a VM without a running init is refused before anything runs (no root needed)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import vminit
from vnic.errors import DataplaneError


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("vnic.s1.web", ("s1", "web")),
        ("vnic.s1", None),  # a session's namespace
        ("vnic.probe-12", None),
        ("other.s1.web", None),
        ("vnic..web", None),
        ("vnic.s1.web.x", None),
    ],
)
def test_owner_of_netns(name: str, owner: tuple[str, str] | None) -> None:
    assert vminit.owner_of_netns(name) == owner


def test_the_vm_etc_files_name_the_vm_and_no_name_server() -> None:
    files = vminit._etc_files(
        "s1",
        "web",
        [ipaddress.IPv4Interface("10.0.1.2/24"), ipaddress.IPv6Interface("fd00::2/64")],
    )
    assert files["hostname"] == "web\n"
    assert "10.0.1.2\tweb\n" in files["hosts"] and "fd00::2\tweb\n" in files["hosts"]
    assert "127.0.0.1\tlocalhost" in files["hosts"]
    assert "nameserver" not in files["resolv.conf"]


def test_a_vm_without_a_running_init_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VNIC_NETNS_RUN_DIR", str(tmp_path))
    (tmp_path / "s1" / "web").mkdir(parents=True)
    (tmp_path / "s1" / "web" / "init.pid").write_text("1\n")  # pid 1 here is not its init
    assert vminit.init_pid("s1", "web") is None
    with pytest.raises(DataplaneError, match="VM s1/web has no running init"):
        nsops.run("vnic.s1.web", ["true"], timeout=5)
    with pytest.raises(DataplaneError, match="VM s1/db has no running init"):
        nsops.popen("vnic.s1.db", ["true"])


def test_other_namespaces_are_entered_with_ip_netns_exec() -> None:
    kwargs: dict[str, object] = {}
    with nsops.entered("vnic.s1", kwargs) as prefix:
        assert prefix == ["ip", "netns", "exec", "vnic.s1"]
    assert kwargs == {}
