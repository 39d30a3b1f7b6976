"""Placement (``vnic.model.placement``): which host a VM goes to, and why not the others."""

from __future__ import annotations

from typing import Any

import pytest

from vnic.errors import Conflict, Exhausted, InvalidInput, NotFound
from vnic.model.placement import (
    Candidate,
    Constraint,
    choose_host,
    parse_constraint,
    parse_host_name,
    parse_labels,
)


def host(name: str, **kw: Any) -> Candidate:
    return Candidate(name, kw.pop("ready", True), vnics=kw.pop("vnics", 10), **kw)


def test_spread_picks_the_host_with_fewest_of_the_session_then_least_used() -> None:
    hosts = [
        host("hv1", session_vms=2, used=1),
        host("hv2", session_vms=0, used=8),
        host("hv3", session_vms=1, used=0),
    ]
    assert choose_host(hosts, 1) == "hv2"  # fewest of the session wins over usage
    hosts = [host("hv1", used=5), host("hv2", used=2, vnics=4), host("hv3", used=2)]
    # Usage is a fraction of capacity: 2 of 10 beats 2 of 4 and 5 of 10.
    assert choose_host(hosts, 1, Constraint("spread")) == "hv3"


def test_pack_picks_the_host_with_most_of_the_session_then_most_used() -> None:
    hosts = [
        host("hv1", session_vms=1, used=9),
        host("hv2", session_vms=3, used=3),
        host("hv3", session_vms=0, used=9),
    ]
    assert choose_host(hosts, 1, Constraint("pack")) == "hv2"
    hosts = [host("hv1", used=1), host("hv2", used=6), host("hv3", used=2)]
    assert choose_host(hosts, 1, Constraint("pack")) == "hv2"


def test_ties_go_to_the_name() -> None:
    hosts = [host("hv3"), host("hv1"), host("hv2")]
    assert choose_host(hosts, 1) == "hv1"
    assert choose_host(hosts, 1, Constraint("pack")) == "hv1"


def test_only_hosts_that_fit_are_chosen() -> None:
    hosts = [
        host("a-down", ready=False),
        host("b-cordoned", cordoned=True),
        host("c-full", used=9),
        host("d-unlabelled"),
        host("e-fits", labels={"rack": "a", "gpu": "yes"}, used=5),
    ]
    constraint = Constraint("spread", {"rack": "a"})
    assert choose_host(hosts, 2, constraint) == "e-fits"
    # Without the label, the unlabelled one (less used) wins; c-full cannot take 2 vNICs.
    assert choose_host(hosts, 2) == "d-unlabelled"


def test_none_fits_is_exhausted_naming_every_host_and_why() -> None:
    hosts = [
        host("hv1", ready=False),
        host("hv2", cordoned=True),
        host("hv3", used=10),
        host("hv4", labels={"rack": "b"}),
    ]
    with pytest.raises(Exhausted) as err:
        choose_host(hosts, 1, Constraint("spread", {"rack": "a"}))
    text = str(err.value)
    assert "hv1 unknown (no lease)" in text
    assert "hv2 cordoned" in text
    assert "hv3 lacks label rack=a" in text
    assert "hv4 lacks label rack=a" in text
    with pytest.raises(Exhausted) as err:
        choose_host(hosts[2:3], 1)
    assert "hv3 full (10 of 10 vNICs used, 1 more asked)" in str(err.value)
    with pytest.raises(Exhausted, match="no hosts"):
        choose_host([], 1)


def test_an_explicit_host_must_exist_and_fit() -> None:
    hosts = [host("hv1"), host("hv2", cordoned=True), host("hv3", used=9)]
    assert choose_host(hosts, 1, host="hv3") == "hv3"  # chosen although spread would not
    with pytest.raises(NotFound) as err:
        choose_host(hosts, 1, host="hv9")
    assert "'hv9' does not exist; known: hv1, hv2, hv3" in str(err.value)
    with pytest.raises(Conflict) as conflict:
        choose_host(hosts, 1, host="hv2")
    assert "host hv2 cannot take a VM of 1 vNIC(s): it is cordoned" in str(conflict.value)
    with pytest.raises(Conflict, match=r"full \(9 of 10 vNICs used, 2 more asked\)"):
        choose_host(hosts, 2, host="hv3")
    with pytest.raises(Conflict, match="lacks label zone=x"):
        choose_host(hosts, 1, Constraint("pack", {"zone": "x"}), host="hv1")


@pytest.mark.parametrize("name", ["hv1", "a", "rack-7-hv-01", "x" * 32])
def test_host_names_accepted(name: str) -> None:
    assert parse_host_name(name) == name


@pytest.mark.parametrize("name", ["", "HV1", "-hv", "hv-", "hv_1", "x" * 33, 7, None])
def test_host_names_refused_naming_the_field(name: object) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_host_name(name, "name")
    assert err.value.paths == ["name"]
    assert "1 to 32 of a-z" in str(err.value)


def test_labels_parse_and_refuse_by_key() -> None:
    assert parse_labels({"rack": "a", "zone.x": "eu-1/b:2"}) == {"rack": "a", "zone.x": "eu-1/b:2"}
    assert parse_labels({}) == {}
    with pytest.raises(InvalidInput) as err:
        parse_labels({"Rack": "a"})
    assert err.value.paths == ["labels.Rack"] and "a label key" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        parse_labels({"rack": "a b"}, "host.labels")
    assert err.value.paths == ["host.labels.rack"] and "a label value" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        parse_labels({"rack": 7})
    assert err.value.paths == ["labels.rack"]
    with pytest.raises(InvalidInput) as err:
        parse_labels({f"k{i}": "v" for i in range(17)})
    assert err.value.paths == ["labels"] and "at most 16 labels" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        parse_labels(["rack=a"])
    assert err.value.paths == ["labels"]


def test_constraints_parse_and_refuse_by_field() -> None:
    assert parse_constraint(None) == Constraint()
    got = parse_constraint({"strategy": "pack", "labels": {"rack": "a"}})
    assert got == Constraint("pack", {"rack": "a"})
    assert got.to_dict() == {"strategy": "pack", "labels": {"rack": "a"}}
    assert parse_constraint({}) == Constraint("spread", {})
    with pytest.raises(InvalidInput) as err:
        parse_constraint({"strategy": "random"})
    assert err.value.paths == ["placement.strategy"] and "spread or pack" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        parse_constraint({"strategy": "pack", "hosts": ["hv1"]})
    assert err.value.paths == ["placement"]
    with pytest.raises(InvalidInput) as err:
        parse_constraint("pack")
    assert err.value.paths == ["placement"]
    assert parse_constraint({"labels": {"rack": ""}}).labels == {"rack": ""}  # empty value ok
    with pytest.raises(InvalidInput) as err:
        parse_constraint({"labels": {"-x": "a"}})
    assert err.value.paths == ["placement.labels.-x"]
    # A falsy value of the wrong type is refused too, not taken for "no labels".
    for wrong in ([], "", 0):
        with pytest.raises(InvalidInput) as err:
            parse_constraint({"labels": wrong}, "policy.placement")
        assert err.value.paths == ["policy.placement.labels"]
    assert parse_constraint({"labels": None}).labels == {}
