"""Profile documents, field parsing, cross-field rules and derived defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from vnic.errors import InvalidInput
from vnic.model.fields import DEFAULT_MTU, FIELDS, OFF, Loss, parse_field
from vnic.model.profile import (
    ProfileSpec,
    check_rules,
    derived_values,
    parse_assignments,
    parse_profile_document,
)
from vnic.model.qos import QosClass
from vnic.model.units import (
    ByteSize,
    Dscp,
    Duration,
    MacRange,
    Probability,
    QueueLimit,
    Rate,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "profiles"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*.json"))


def _load(path: Path) -> Any:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _doc(**fields: Any) -> dict[str, Any]:
    return {"name": "test", **fields}


def _refused(doc: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_profile_document(doc)
    return info.value


def _yaml_doc(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return {"name": "test", **doc}


# --------------------------------------------------------------------------- examples


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert "wan-dsl.yaml" in names
    assert any(n.endswith(".json") for n in names)


def test_wan_dsl_example() -> None:
    spec = parse_profile_document(_load(EXAMPLES / "wan-dsl.yaml"))
    assert spec.name == "wan-dsl"
    assert spec.description == "ADSL line"
    assert spec.labels == {"kind": "wan"}
    v = spec.values
    assert v["egress.rate"] == Rate(1_000_000)
    assert v["egress.delay"] == Duration.parse("20ms")
    assert v["egress.loss"] == Loss(Probability(5_000_000))
    assert v["ingress.rate"] == Rate(16_000_000)
    assert v["ingress.burst"] == ByteSize(32_000)
    assert v["ingress.jitter"] == Duration.parse("2ms")
    assert v["ingress.distribution"] == "normal"
    assert v["mac_range"] == MacRange.parse("02:00:00:10:00:00-02:00:00:10:ff:ff")
    assert v["tcp.congestion_control"] == "cubic"
    assert v["tcp.window_scaling"] is True
    classes = v["qos.egress"]
    assert [c.name for c in classes] == ["voice", "bulk"]
    assert isinstance(classes[0], QosClass)
    assert classes[0].guaranteed == Rate(256_000)
    assert classes[0].ceiling == Rate(1_000_000)
    assert classes[0].match.dscp == (Dscp(46),)
    assert classes[1].priority == 7


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_round_trip(path: Path) -> None:
    spec = parse_profile_document(_load(path))
    again = parse_profile_document(spec.to_document())
    assert again.values == spec.values
    assert again == spec


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_round_trip_through_text(path: Path) -> None:
    spec = parse_profile_document(_load(path))
    via_yaml = parse_profile_document(yaml.safe_load(yaml.safe_dump(spec.to_document())))
    via_json = parse_profile_document(json.loads(json.dumps(spec.to_document())))
    assert via_yaml.values == spec.values
    assert via_json.values == spec.values


def test_lan_example_turns_things_off() -> None:
    spec = parse_profile_document(_load(EXAMPLES / "lan.yaml"))
    for path in ("egress.burst", "egress.delay", "egress.loss", "qos.egress", "qos.ingress"):
        assert spec.values[path] is OFF


def test_to_document_is_canonical() -> None:
    spec = ProfileSpec(
        name="x",
        values={"egress.rate": Rate(1_500_000_000), "tcp.window_scaling": OFF, "egress.delay": OFF},
    )
    assert spec.to_document() == {
        "name": "x",
        "egress": {"rate": "1500Mbit", "delay": "off"},
        "tcp": {"window_scaling": None},
    }


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (_doc(colour="red"), "colour"),
        (_doc(egress={"speed": "10Mbit"}), "egress.speed"),
        (
            _doc(
                egress={"rate": "10Mbit"},
                qos={"egress": [{"name": "a", "guaranteed": "1Mbit", "colour": "red"}]},
            ),
            "qos.egress[0].colour",
        ),
        (
            _doc(
                egress={"rate": "10Mbit"},
                qos={"egress": [{"name": "a", "guaranteed": "1Mbit", "match": {"vlan": 5}}]},
            ),
            "qos.egress[0].match.vlan",
        ),
        (_doc(qos={"bulk": []}), "qos.bulk"),
    ],
)
def test_unknown_key(doc: dict[str, Any], path: str) -> None:
    exc = _refused(doc)
    assert exc.paths == [path]
    assert exc.errors[0].value == "unknown key"
    assert exc.errors[0].expected.startswith("one of ")


def test_unknown_field_in_parse_field() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_field("egress.speed", "10Mbit")
    assert info.value.paths == ["egress.speed"]


def test_name_required() -> None:
    exc = _refused({"egress": {"rate": "1Mbit"}})
    assert exc.paths == ["name"]


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidInput):
        parse_profile_document(["egress"])


# --------------------------------------------------------------------------- one test per rule


def test_rule_burst_below_default_mtu() -> None:
    assert _refused(_doc(egress={"burst": "1000B"})).paths == ["egress.burst"]


def test_rule_burst_below_explicit_mtu() -> None:
    parse_profile_document(_doc(egress={"burst": "3000B"}))
    exc = _refused(_doc(mtu="9000B", egress={"burst": "3000B"}))
    assert exc.paths == ["egress.burst"]
    assert str(ByteSize(9000)) in exc.errors[0].expected


def test_rule_burst_equal_to_mtu_ok() -> None:
    parse_profile_document(_doc(egress={"burst": "1500B"}))


def test_rule_peak_below_rate() -> None:
    exc = _refused(_doc(ingress={"rate": "10Mbit", "peak": "5Mbit"}))
    assert exc.paths == ["ingress.peak"]


def test_rule_peak_equal_rate_ok() -> None:
    parse_profile_document(_doc(ingress={"rate": "10Mbit", "peak": "10Mbit"}))


def test_rule_class_guaranteed_above_ceiling() -> None:
    doc = _doc(
        egress={"rate": "10Mbit"},
        qos={"egress": [{"name": "a", "guaranteed": "5Mbit", "ceiling": "2Mbit"}]},
    )
    assert _refused(doc).paths == ["qos.egress[0].guaranteed"]


def test_rule_class_ceiling_above_rate() -> None:
    doc = _doc(
        egress={"rate": "10Mbit"},
        qos={"egress": [{"name": "a", "guaranteed": "1Mbit", "ceiling": "20Mbit"}]},
    )
    assert _refused(doc).paths == ["qos.egress[0].ceiling"]


def test_rule_sum_of_guarantees_above_rate() -> None:
    doc = _doc(
        egress={"rate": "10Mbit"},
        qos={
            "egress": [
                {"name": "a", "guaranteed": "6Mbit"},
                {"name": "b", "guaranteed": "6Mbit"},
            ]
        },
    )
    assert _refused(doc).paths == ["qos.egress"]


def test_rule_dscp_out_of_range_in_match() -> None:
    doc = _doc(
        egress={"rate": "10Mbit"},
        qos={"egress": [{"name": "a", "guaranteed": "1Mbit", "match": {"dscp": [64]}}]},
    )
    assert _refused(doc).paths == ["qos.egress[0].match.dscp[0]"]


def test_rule_dscp_mark_out_of_range() -> None:
    assert _refused(_doc(egress={"dscp_mark": 64})).paths == ["egress.dscp_mark"]


def test_rule_loss_probability_above_100() -> None:
    assert _refused(_doc(egress={"loss": "150%"})).paths == ["egress.loss"]


def test_rule_duplicate_probability_above_100() -> None:
    assert _refused(_doc(ingress={"duplicate": "150%"})).paths == ["ingress.duplicate"]


def test_rule_unknown_distribution() -> None:
    doc = _doc(egress={"delay": "10ms", "jitter": "1ms", "distribution": "gaussian"})
    assert _refused(doc).paths == ["egress.distribution"]


@pytest.mark.parametrize(
    "mac_range",
    [
        "03:00:00:00:00:00-03:00:00:00:00:ff",  # multicast
        "00:11:22:00:00:00-00:11:22:00:00:ff",  # globally administered
    ],
)
def test_rule_mac_range_not_local_unicast(mac_range: str) -> None:
    assert _refused(_doc(mac_range=mac_range)).paths == ["mac_range"]


def test_rule_unknown_congestion_control() -> None:
    assert _refused(_doc(tcp={"congestion_control": "turbo"})).paths == ["tcp.congestion_control"]


def test_rule_jitter_above_delay() -> None:
    exc = _refused(_doc(egress={"delay": "10ms", "jitter": "20ms"}))
    assert exc.paths == ["egress.jitter"]


def test_rule_jitter_equal_delay_ok() -> None:
    parse_profile_document(_doc(egress={"delay": "10ms", "jitter": "10ms"}))


def test_rule_gilbert_elliott_impossible() -> None:
    exc = _refused(_doc(egress={"loss": {"mean": "90%", "burst_length": 1}}))
    assert exc.paths == ["egress.loss"]


def test_gilbert_elliott_possible() -> None:
    spec = parse_profile_document(_doc(egress={"loss": {"mean": "2%", "burst_length": 4}}))
    loss = spec.values["egress.loss"]
    assert loss == Loss(Probability.parse("2%"), 4.0)
    p, r = loss.transition_probabilities()
    assert r == pytest.approx(0.25)
    assert p == pytest.approx(0.02 * 0.25 / 0.98)


def test_rule_queue_below_mtu() -> None:
    assert _refused(_doc(egress={"queue": "1000B"})).paths == ["egress.queue"]


def test_queue_in_packets_not_compared_with_mtu() -> None:
    spec = parse_profile_document(_doc(egress={"queue": "10pkt"}))
    assert spec.values["egress.queue"] == QueueLimit(10, "packets")


def test_check_rules_complete_needs_rate_for_classes() -> None:
    values = {"qos.egress": (QosClass("a", 0, Rate(1_000_000)),)}
    assert check_rules(values, complete=False) == []
    assert [e.path for e in check_rules(values, complete=True)] == ["qos.egress"]


def test_check_rules_complete_jitter_without_delay() -> None:
    values = {"egress.jitter": Duration.parse("5ms")}
    assert check_rules(values, complete=False) == []
    assert [e.path for e in check_rules(values, complete=True)] == ["egress.jitter"]


# --------------------------------------------------------------------------- collection


def test_all_errors_collected() -> None:
    doc = _doc(
        egress={"rate": "fast"},
        ingress={"delay": "soon"},
        tcp={"congestion_control": "turbo"},
    )
    exc = _refused(doc)
    assert sorted(exc.paths) == ["egress.rate", "ingress.delay", "tcp.congestion_control"]


def test_all_rule_errors_collected() -> None:
    doc = _doc(
        egress={"burst": "100B", "delay": "1ms", "jitter": "2ms"},
        ingress={"rate": "10Mbit", "peak": "1Mbit"},
    )
    assert sorted(_refused(doc).paths) == ["egress.burst", "egress.jitter", "ingress.peak"]


# --------------------------------------------------------------------------- off


def test_off_removes_impairment() -> None:
    spec = parse_profile_document(_yaml_doc("egress: {delay: off}"))
    assert spec.values["egress.delay"] is OFF


def test_off_is_false_for_on_off_fields() -> None:
    spec = parse_profile_document(_yaml_doc("tcp: {window_scaling: off}"))
    assert spec.values["tcp.window_scaling"] is False


def test_null_is_off() -> None:
    spec = parse_profile_document(_yaml_doc("egress: {delay: null}\ntcp: {window_scaling: null}"))
    assert spec.values["egress.delay"] is OFF
    assert spec.values["tcp.window_scaling"] is OFF


@pytest.mark.parametrize("raw", ["off", "OFF", "none", None, False])
def test_off_words(raw: Any) -> None:
    assert parse_field("egress.loss", raw) is OFF


@pytest.mark.parametrize(
    ("raw", "value"), [("off", False), ("on", True), (False, False), (True, True)]
)
def test_on_off_field_words(raw: Any, value: bool) -> None:
    assert parse_field("tcp.sack", raw) is value


# --------------------------------------------------------------------------- --set


def test_parse_assignments() -> None:
    values = parse_assignments(
        [
            "egress.rate=5Mbit",
            "egress.loss={mean: 2%, burst_length: 4}",
            "tcp.window_scaling=off",
            "egress.delay=off",
        ]
    )
    assert values == {
        "egress.rate": Rate(5_000_000),
        "egress.loss": Loss(Probability(20_000_000), 4.0),
        "tcp.window_scaling": False,
        "egress.delay": OFF,
    }
    assert values["tcp.window_scaling"] is False


def test_parse_assignments_scalars_kept_as_text() -> None:
    values = parse_assignments(["egress.loss=0.005", "ingress.delay=1.5s", "tcp.ecn=on"])
    assert values["egress.loss"] == Loss(Probability(5_000_000))
    assert values["ingress.delay"] == Duration(1_500_000_000)
    assert values["tcp.ecn"] == "on"


def test_parse_assignments_bad_value() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignments(["egress.rate=fast"])
    assert info.value.paths == ["egress.rate"]


def test_parse_assignments_not_an_assignment() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignments(["nonsense"])
    assert info.value.paths == ["--set"]


def test_parse_assignments_unknown_field() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignments(["egress.speed=1Mbit"])
    assert info.value.paths == ["egress.speed"]


def test_parse_assignments_checks_rules() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignments(["egress.delay=1ms", "egress.jitter=5ms"])
    assert info.value.paths == ["egress.jitter"]


# --------------------------------------------------------------------------- derived values


@pytest.mark.parametrize(("rate", "burst"), [("1Mbit", 3000), ("100Mbit", 3125), ("1Gbit", 31_250)])
def test_derived_burst(rate: str, burst: int) -> None:
    out = derived_values({"egress.rate": Rate.parse(rate)})
    assert out["egress.burst"] == ByteSize(burst)


def test_derived_burst_follows_mtu() -> None:
    out = derived_values({"mtu": ByteSize(9000), "egress.rate": Rate.parse("1Mbit")})
    assert out["egress.burst"] == ByteSize(18_000)


def test_derived_burst_not_when_set() -> None:
    out = derived_values({"egress.rate": Rate.parse("1Mbit"), "egress.burst": ByteSize(5000)})
    assert "egress.burst" not in out


def test_derived_queue_bandwidth_delay_product() -> None:
    values = {
        "egress.rate": Rate.parse("10Mbit"),
        "egress.delay": Duration.parse("100ms"),
        "egress.jitter": Duration.parse("10ms"),
    }
    out = derived_values(values)
    # 10 Mbit/s x (100 + 10 + 50) ms / 8 = 200 000 bytes
    assert out["egress.queue"] == QueueLimit.of_bytes(200_000)


def test_derived_queue_floor() -> None:
    out = derived_values({"egress.rate": Rate.parse("100kbit")})
    assert out["egress.queue"] == QueueLimit.of_bytes(4 * DEFAULT_MTU.value)


def test_derived_queue_reference_rate_without_rate() -> None:
    out = derived_values({"ingress.delay": Duration.parse("50ms")})
    # 1 Gbit/s x (50 + 50) ms / 8 = 12.5 MB
    assert out["ingress.queue"] == QueueLimit.of_bytes(12_500_000)
    assert "ingress.burst" not in out


def test_derived_nothing_for_idle_direction() -> None:
    assert derived_values({}) == {}


def test_derived_distribution() -> None:
    out = derived_values(
        {"egress.delay": Duration.parse("10ms"), "egress.jitter": Duration.parse("1ms")}
    )
    assert out["egress.distribution"] == "uniform"
    out = derived_values({"egress.delay": Duration.parse("10ms")})
    assert "egress.distribution" not in out
    out = derived_values(
        {
            "egress.delay": Duration.parse("10ms"),
            "egress.jitter": Duration.parse("1ms"),
            "egress.distribution": "pareto",
        }
    )
    assert "egress.distribution" not in out


def test_every_field_documented() -> None:
    for path, fdef in FIELDS.items():
        assert fdef.path == path
        assert fdef.doc
        assert fdef.expected
