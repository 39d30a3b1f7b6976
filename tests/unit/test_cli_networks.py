"""``vnic session network ...`` and ``vnic vm ... --nic``/``VM/NIC``, run as real processes
against a SQLite file (the --server forms go through the same service methods of the
manager client; tests/e2e/test_cli_remote.py runs the remote CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import Vnic


@pytest.fixture
def vnic(tmp_path: Path) -> Vnic:
    v = Vnic(tmp_path / "home")
    v("profile", "apply", "-f", "-", stdin=PROFILES)
    v("session", "create", "lab", "--default-profile", "campus")
    return v


PROFILES = """\
- {name: campus, egress: {rate: 20Mbit}}
- {name: fast, egress: {rate: 100Mbit}}
"""


def test_networks_add_list_remove_and_their_refusals(vnic: Vnic) -> None:
    out = vnic("session", "network", "add", "lab", "data", "--id", "4242", "--ipv4", "10.77.0.0/24")
    assert "network lab/data: added (network id 4242, 10.77.0.0/24" in out.stdout
    vnic("session", "network", "add", "lab", "mgmt", "--profile", "fast")
    nets = vnic.json("session", "network", "list", "lab")
    assert [(n["name"], n["default_profile"]) for n in nets] == [
        ("default", None),
        ("data", None),
        ("mgmt", "fast"),
    ]
    table = vnic("session", "network", "list", "lab").stdout
    assert "data" in table and "4242" in table and "(session's)" in table
    assert "networks: default, data, mgmt" in vnic("session", "show", "lab").stdout
    for args, text in (
        (("add", "lab", "again", "--id", "4242"), "network_id: got 4242"),
        (("add", "lab", "over", "--ipv4", "10.77.0.0/16"), "ipv4: got '10.77.0.0/16'"),
        (("add", "lab", "data"), "already exists"),
        (("remove", "lab", "default"), "network: got 'default'"),
    ):
        proc = vnic("session", "network", *args, ok=False)
        assert proc.returncode != 0 and text in proc.stderr, proc.stderr
    assert vnic.json("session", "network", "list", "lab") == nets
    vnic("session", "network", "remove", "lab", "mgmt")
    assert [n["name"] for n in vnic.json("session", "network", "list", "lab")] == [
        "default",
        "data",
    ]


def test_vm_with_several_vnics_set_one_and_explain_every_one(vnic: Vnic) -> None:
    vnic("session", "network", "add", "lab", "data")
    out = vnic(
        "vm", "add", "lab", "a", "--nic", "net=default",
        "--nic", "net=data,profile=fast,set=egress.delay=5ms",
    ).stdout  # fmt: skip
    assert "eth1 on data: MAC" in out
    (a,) = vnic.json("vm", "list", "lab")
    assert [(n["name"], n["network"], n["override_profile"]) for n in a["nics"]] == [
        ("eth0", "default", None),
        ("eth1", "data", "fast"),
    ]
    assert "eth0@default eth1@data" in vnic("vm", "list", "lab").stdout
    # VM/NIC changes that vNIC's override; VM alone, eth0's, as before.
    vnic("vm", "set", "lab", "a/eth1", "egress.rate=3Mbit")
    vnic("vm", "set", "lab", "a", "egress.rate=2Mbit")
    e = vnic.json("vm", "explain", "lab", "a")
    rates = {n["name"]: n["effective"]["fields"]["egress.rate"] for n in e["nics"]}
    assert rates["eth0"]["value"] == "2Mbit" and rates["eth1"]["value"] == "3Mbit"
    assert rates["eth1"]["source"]["layer"] == "vm-patch"
    delay = e["nics"][1]["effective"]["fields"]["egress.delay"]
    assert delay == {"value": "5ms", "source": {"layer": "vm-patch", "detail": "override"}}
    text = vnic("vm", "explain", "lab", "a").stdout
    assert "lab/a/eth0" in text and "lab/a/eth1" in text and "network data" in text
    one = vnic.json("vm", "explain", "lab", "a/eth1")
    assert one["name"] == "eth1" and one["effective"] == e["nics"][1]["effective"]
    assert "lab/a/eth0" not in vnic("vm", "explain", "lab", "a/eth1").stdout
    # A network in use cannot go, and the error names the vNIC.
    proc = vnic("session", "network", "remove", "lab", "data", ok=False)
    assert proc.returncode != 0 and "lab/a/eth1" in proc.stderr


def test_vnic_refusals_name_the_option_and_add_nothing(vnic: Vnic) -> None:
    for args, text in (
        (("--nic", "net=nope"), "nics[0].network: got 'nope'"),
        (("--nic", "net=default", "--nic", "color=red"), "--nic[1]: got 'color=red'"),
        (("--nic", "net=default,set=egress.rate=fast"), "--nic[0]"),
        (("--profile", "fast", "--nic", "net=default"), "give each vNIC its own"),
        (tuple(a for _ in range(9) for a in ("--nic", "net=default")), "at most 8"),
        (("--nic", "net=default,profile=nope"), "nics[0].profile"),
    ):
        proc = vnic("vm", "add", "lab", "x", *args, ok=False)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr)
    assert vnic.json("vm", "list", "lab") == []
    vnic("vm", "add", "lab", "y")
    proc = vnic("vm", "set", "lab", "y/eth1", "egress.rate=1Mbit", ok=False)
    assert proc.returncode != 0 and "eth1" in proc.stderr
