"""``vnic host add|list|show|cordon|uncordon|remove``, embedded, run as real processes
against a SQLite file (the ``--server`` forms are the manager client's host methods over
the routes tests/unit/test_hosts_api.py covers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit.test_cli import Vnic


@pytest.fixture
def vnic(tmp_path: Path) -> Vnic:
    return Vnic(tmp_path / "home")


def test_hosts_add_list_show_cordon_uncordon_remove(vnic: Vnic) -> None:
    out = vnic("host", "add", "hv1", "--label", "rack=a").stdout
    token = re.search(r"its token \(shown once\): (vnich_\S+)", out)
    assert token, out
    added = vnic.json("host", "add", "hv2")
    assert isinstance(added, dict) and str(added["token"]).startswith("vnich_")
    assert added["token"] != token.group(1)

    listed = vnic.json("host", "list")
    assert isinstance(listed, list)
    assert [(h["name"], h["state"], h["labels"], h["epoch"]) for h in listed] == [
        ("hv1", "new", {"rack": "a"}, 0),
        ("hv2", "new", {}, 0),
    ]
    assert all("token" not in h for h in listed)
    table = vnic("host", "list").stdout
    assert "hv1" in table and "rack=a" in table and "new" in table
    assert token.group(1) not in table

    shown = vnic.json("host", "show", "hv1")
    assert isinstance(shown, dict) and shown["name"] == "hv1" and "token" not in shown
    assert "lease until -" in vnic("host", "show", "hv1").stdout

    assert "host hv1: cordoned" in vnic("host", "cordon", "hv1").stdout
    assert "new, cordoned" in vnic("host", "list").stdout
    assert vnic.json("host", "show", "hv1")["cordoned"] is True  # type: ignore[index]
    assert "host hv1: uncordoned" in vnic("host", "uncordon", "hv1").stdout
    assert vnic.json("host", "show", "hv1")["cordoned"] is False  # type: ignore[index]

    # With hosts added, VMs go to them: none holds a lease yet, so a launch says why.
    vnic("session", "create", "lab")
    vnic("vm", "add", "lab", "a")
    proc = vnic("vm", "launch", "lab", "a", ok=False)
    assert proc.returncode != 0
    assert "hv1 unknown (no lease)" in proc.stderr and "hv2 unknown (no lease)" in proc.stderr

    assert "host hv2: removed" in vnic("host", "remove", "hv2").stdout
    assert [h["name"] for h in vnic.json("host", "list")] == ["hv1"]  # type: ignore[union-attr]


def test_host_refusals_name_the_field_and_change_nothing(vnic: Vnic) -> None:
    vnic("host", "add", "hv1")
    for args, text in (
        (("add", "HV_1"), "name: got 'HV_1'; expected 1 to 32 of a-z"),
        (("add", "hv1"), "name: got 'hv1'; expected a host name not in use"),
        (("add", "hv2", "--label", "rack"), "--label: got 'rack'; expected KEY=VALUE"),
        (("add", "hv2", "--label", "Rack=a"), "labels.Rack"),
        (("show", "hv9"), "host 'hv9' does not exist; known: hv1"),
        (("cordon", "hv9"), "host 'hv9' does not exist"),
        (("remove", "hv9"), "host 'hv9' does not exist"),
    ):
        proc = vnic("host", *args, ok=False)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr)
    assert [h["name"] for h in vnic.json("host", "list")] == ["hv1"]  # type: ignore[union-attr]
