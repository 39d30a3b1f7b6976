"""Resolution of a VM's effective profile: layers, provenance, rule matching, validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnic.errors import InvalidInput
from vnic.model.fields import CONGESTION_CONTROLS, DEFAULT_MAC_RANGE, DEFAULT_MTU, OFF, Loss
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import (
    BUILTIN,
    DERIVED,
    RULE,
    RUNTIME,
    SESSION_DEFAULT,
    VM_PATCH,
    VM_PROFILE,
    Adjustment,
    Effective,
    ProfileRef,
    Source,
    resolve,
)
from vnic.model.session import AssignmentRule, Policy, VmFacts
from vnic.model.units import ByteSize, Duration, Probability, QueueLimit, Rate

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _ref(name: str, revision: int, doc: dict[str, Any]) -> ProfileRef:
    spec = parse_profile_document({"name": name, **doc})
    return ProfileRef(name, revision, spec.values)


BASE = _ref(
    "base",
    1,
    {
        "egress": {"rate": "10Mbit", "delay": "20ms", "loss": "1%"},
        "ingress": {"rate": "20Mbit"},
        "tcp": {"congestion_control": "cubic", "sack": True},
    },
)
FAST = _ref(
    "fast",
    3,
    {"egress": {"rate": "100Mbit", "loss": "off"}, "ingress": {"delay": "5ms"}},
)
OTHER = _ref("other", 7, {"egress": {"rate": "2Mbit"}})
VMPROF = _ref(
    "vmprof",
    2,
    {"ingress": {"rate": "50Mbit"}, "tcp": {"congestion_control": "bbr"}},
)
PROFILES = {p.name: p for p in (BASE, FAST, OTHER, VMPROF)}

WEB = VmFacts(name="web-1", role="frontend", labels={"zone": "a"}, needs=("video",))


def _layer(eff: Effective, path: str) -> str:
    return eff.sources[path].layer


# --------------------------------------------------------------------------- provenance


def test_full_stack_provenance() -> None:
    policy = Policy(
        default_profile="base",
        rules=(
            AssignmentRule(profile="other", role="db"),
            AssignmentRule(profile="fast", name="web-*"),
            AssignmentRule(profile="other"),
        ),
    )
    eff = resolve(
        vm=WEB,
        policy=policy,
        profiles=PROFILES,
        vm_profile="vmprof",
        vm_patch={"egress.delay": Duration.parse("30ms"), "tcp.window_scaling": False},
        adjustments=[Adjustment({"ingress.delay": Duration.parse("100ms")}, "storm")],
        now=NOW,
    )
    v, s = eff.values, eff.sources

    assert v["mtu"] == DEFAULT_MTU
    assert s["mtu"] == Source(BUILTIN)
    assert v["mac_range"] == DEFAULT_MAC_RANGE
    assert _layer(eff, "mac_range") == "builtin"

    assert v["tcp.sack"] is True
    assert s["tcp.sack"] == Source(SESSION_DEFAULT, "base r1")

    assert v["egress.rate"] == Rate.parse("100Mbit")
    assert s["egress.rate"].layer == RULE == "rule"
    assert "fast r3" in s["egress.rate"].detail
    assert s["egress.rate"].detail.startswith("#2 ")

    # The rule's "off" removes the session default's loss and owns the field.
    assert "egress.loss" not in v
    assert _layer(eff, "egress.loss") == "rule"
    assert eff.profile.egress.loss is None

    assert v["ingress.rate"] == Rate.parse("50Mbit")
    assert s["ingress.rate"] == Source(VM_PROFILE, "vmprof r2")
    assert v["tcp.congestion_control"] == "bbr"
    assert _layer(eff, "tcp.congestion_control") == "vm-profile"

    assert v["egress.delay"] == Duration.parse("30ms")
    assert _layer(eff, "egress.delay") == VM_PATCH == "vm-patch"
    assert v["tcp.window_scaling"] is False
    assert _layer(eff, "tcp.window_scaling") == "vm-patch"

    assert v["ingress.delay"] == Duration.parse("100ms")
    assert _layer(eff, "ingress.delay") == RUNTIME == "runtime"
    assert "storm" in s["ingress.delay"].detail

    # derived: burst = max(2 MTU, 250 us at rate); queue = rate x (delay + jitter + 50 ms)
    assert v["egress.burst"] == ByteSize(3_125)
    assert v["egress.queue"] == QueueLimit.of_bytes(1_000_000)
    assert v["ingress.burst"] == ByteSize(3_000)
    assert v["ingress.queue"] == QueueLimit.of_bytes(937_500)
    for path in ("egress.burst", "egress.queue", "ingress.burst", "ingress.queue"):
        assert _layer(eff, path) == DERIVED == "derived"
    assert "egress.distribution" not in v

    assert eff.revisions == {"base": 1, "fast": 3, "vmprof": 2}
    assert eff.profile.egress.rate == Rate.parse("100Mbit")
    assert eff.profile.tcp.congestion_control == "bbr"

    rows = {path: (text, src) for path, text, src in eff.rows()}
    assert rows["egress.rate"][0] == "100Mbit"
    assert rows["egress.loss"] == ("-", s["egress.loss"])
    assert rows["egress.jitter"][1].layer == "unset"


def test_no_layers_gives_builtin_only() -> None:
    eff = resolve(vm=WEB, policy=Policy(), profiles={})
    assert eff.values == {"mtu": DEFAULT_MTU, "mac_range": DEFAULT_MAC_RANGE}
    assert {s.layer for s in eff.sources.values()} == {BUILTIN}
    assert eff.revisions == {}


def test_non_matching_rule_ignored() -> None:
    policy = Policy(default_profile="base", rules=(AssignmentRule(profile="fast", role="db"),))
    eff = resolve(vm=WEB, policy=policy, profiles=PROFILES)
    assert eff.values["egress.rate"] == Rate.parse("10Mbit")
    assert _layer(eff, "egress.rate") == SESSION_DEFAULT
    assert RULE not in {s.layer for s in eff.sources.values()}
    assert "fast" not in eff.revisions


def test_first_matching_rule_wins() -> None:
    policy = Policy(
        rules=(AssignmentRule(profile="other", name="web-*"), AssignmentRule(profile="fast")),
    )
    eff = resolve(vm=WEB, policy=policy, profiles=PROFILES)
    assert eff.values["egress.rate"] == Rate.parse("2Mbit")
    assert eff.sources["egress.rate"].detail.startswith("#1 ")
    assert "ingress.delay" not in eff.values  # only in the second rule's profile
    assert eff.revisions == {"other": 7}


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        (AssignmentRule(profile="p"), True),
        (AssignmentRule(profile="p", name="web-*"), True),
        (AssignmentRule(profile="p", name="web-?"), True),
        (AssignmentRule(profile="p", name="db-*"), False),
        (AssignmentRule(profile="p", name="WEB-*"), False),
        (AssignmentRule(profile="p", role="frontend"), True),
        (AssignmentRule(profile="p", role="db"), False),
        (AssignmentRule(profile="p", labels={"zone": "a"}), True),
        (AssignmentRule(profile="p", labels={"zone": "b"}), False),
        (AssignmentRule(profile="p", labels={"rack": "a"}), False),
        (AssignmentRule(profile="p", needs=("video",)), True),
        (AssignmentRule(profile="p", needs=("video", "voip")), False),
        (AssignmentRule(profile="p", name="web-*", role="frontend", labels={"zone": "a"}), True),
        (AssignmentRule(profile="p", name="web-*", role="db"), False),
    ],
)
def test_rule_matching(rule: AssignmentRule, matches: bool) -> None:
    assert rule.matches(WEB) is matches
    policy = Policy(rules=(rule,))
    assert (policy.first_match(WEB) is not None) is matches


@pytest.mark.parametrize(
    "rule",
    [
        AssignmentRule(profile="fast", name="web-*"),
        AssignmentRule(profile="fast", role="frontend"),
        AssignmentRule(profile="fast", labels={"zone": "a"}),
        AssignmentRule(profile="fast", needs=("video",)),
    ],
)
def test_rule_matching_through_resolve(rule: AssignmentRule) -> None:
    miss = VmFacts(name="db-1", role="db", labels={"zone": "b"})
    policy = Policy(default_profile="base", rules=(rule,))
    hit = resolve(vm=WEB, policy=policy, profiles=PROFILES)
    assert _layer(hit, "egress.rate") == RULE
    missed = resolve(vm=miss, policy=policy, profiles=PROFILES)
    assert _layer(missed, "egress.rate") == SESSION_DEFAULT


@pytest.mark.parametrize(
    ("expires_at", "active"),
    [
        (NOW - timedelta(seconds=1), False),
        (NOW, False),
        (NOW + timedelta(seconds=1), True),
        (None, True),
    ],
)
def test_adjustment_expiry(expires_at: datetime | None, active: bool) -> None:
    adj = Adjustment({"egress.rate": Rate.parse("1Mbit")}, "test", expires_at)
    eff = resolve(
        vm=WEB, policy=Policy(default_profile="base"), profiles=PROFILES, adjustments=[adj], now=NOW
    )
    if active:
        assert eff.values["egress.rate"] == Rate.parse("1Mbit")
        assert _layer(eff, "egress.rate") == RUNTIME
    else:
        assert eff.values["egress.rate"] == Rate.parse("10Mbit")
        assert _layer(eff, "egress.rate") == SESSION_DEFAULT


def test_later_adjustment_wins() -> None:
    adjs = [
        Adjustment({"egress.delay": Duration.parse("1ms")}, "first"),
        Adjustment({"egress.delay": Duration.parse("2ms")}, "second"),
    ]
    eff = resolve(
        vm=WEB, policy=Policy(default_profile="base"), profiles=PROFILES, adjustments=adjs
    )
    assert eff.values["egress.delay"] == Duration.parse("2ms")
    assert "second" in eff.sources["egress.delay"].detail


@pytest.mark.parametrize("layer", ["rule", "vm-profile", "vm-patch", "runtime"])
def test_off_removes_lower_value(layer: str) -> None:
    off_ref = ProfileRef("off", 1, {"egress.delay": OFF})
    profiles = {**PROFILES, "off": off_ref}
    kwargs: dict[str, Any] = {}
    policy = Policy(default_profile="base")
    if layer == "rule":
        policy = Policy(default_profile="base", rules=(AssignmentRule(profile="off"),))
    elif layer == "vm-profile":
        kwargs["vm_profile"] = "off"
    elif layer == "vm-patch":
        kwargs["vm_patch"] = {"egress.delay": OFF}
    else:
        kwargs["adjustments"] = [Adjustment({"egress.delay": OFF}, "clear")]
    eff = resolve(vm=WEB, policy=policy, profiles=profiles, **kwargs)
    assert "egress.delay" not in eff.values
    assert _layer(eff, "egress.delay") == layer
    assert eff.profile.egress.delay is None


def test_off_then_higher_value_restores() -> None:
    eff = resolve(
        vm=WEB,
        policy=Policy(default_profile="base"),
        profiles=PROFILES,
        vm_patch={"egress.delay": OFF},
        adjustments=[Adjustment({"egress.delay": Duration.parse("7ms")}, "again")],
    )
    assert eff.values["egress.delay"] == Duration.parse("7ms")
    assert _layer(eff, "egress.delay") == RUNTIME


# --------------------------------------------------------------------------- complete validation


def test_complete_profile_validated_across_layers() -> None:
    default = _ref(
        "qosdef",
        4,
        {
            "egress": {"rate": "10Mbit"},
            "qos": {"egress": [{"name": "voice", "guaranteed": "5Mbit"}]},
        },
    )
    with pytest.raises(InvalidInput) as info:
        resolve(
            vm=WEB,
            policy=Policy(default_profile="qosdef"),
            profiles={"qosdef": default},
            vm_patch={"egress.rate": Rate.parse("1Mbit")},
        )
    exc = info.value
    assert "qos.egress[0].guaranteed" in exc.paths
    err = next(e for e in exc.errors if e.path == "qos.egress[0].guaranteed")
    assert "session-default" in err.value
    assert "qosdef r4" in err.value


def test_complete_jitter_without_delay_refused() -> None:
    ref = _ref("j", 1, {"egress": {"delay": "10ms", "jitter": "5ms"}})
    with pytest.raises(InvalidInput) as info:
        resolve(
            vm=WEB,
            policy=Policy(default_profile="j"),
            profiles={"j": ref},
            vm_patch={"egress.delay": OFF},
        )
    assert info.value.paths == ["egress.jitter"]
    assert "session-default" in info.value.errors[0].value


def test_complete_qos_without_rate_refused() -> None:
    ref = _ref(
        "q",
        1,
        {"egress": {"rate": "10Mbit"}, "qos": {"egress": [{"name": "a", "guaranteed": "1Mbit"}]}},
    )
    with pytest.raises(InvalidInput) as info:
        resolve(
            vm=WEB,
            policy=Policy(default_profile="q"),
            profiles={"q": ref},
            vm_patch={"egress.rate": OFF},
        )
    assert info.value.paths == ["qos.egress"]


# --------------------------------------------------------------------------- properties

# A base without jitter or peak, whose QoS classes fit any rate >= 1Mbit, so that
# every patch drawn below gives a valid complete profile.
PROP_BASE = _ref(
    "pbase",
    1,
    {
        "egress": {"rate": "1Mbit", "delay": "20ms", "loss": "0.5%"},
        "ingress": {"rate": "16Mbit", "delay": "20ms"},
        "qos": {
            "egress": [
                {"name": "voice", "guaranteed": "256kbit", "ceiling": "1Mbit"},
                {"name": "bulk", "priority": 7, "guaranteed": "128kbit"},
            ]
        },
        "tcp": {"congestion_control": "cubic", "window_scaling": True},
    },
)
PROP_RULE = _ref("prule", 2, {"ingress": {"loss": "1%"}, "tcp": {"sack": True}})
PROP_PROFILES = {"pbase": PROP_BASE, "prule": PROP_RULE}
PROP_POLICY = Policy(
    default_profile="pbase", rules=(AssignmentRule(profile="prule", name="web-*"),)
)


def _or_off(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(OFF), strategy)


_durations = st.integers(0, 10**9).map(Duration)
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "egress.delay": _or_off(_durations),
    "ingress.delay": _or_off(_durations),
    "egress.loss": _or_off(st.integers(0, 10**9).map(lambda n: Loss(Probability(n)))),
    "tcp.congestion_control": _or_off(st.sampled_from(CONGESTION_CONTROLS)),
    "tcp.window_scaling": _or_off(st.booleans()),
    "egress.rate": st.integers(10**6, 10**10).map(Rate),
}
patches = st.fixed_dictionaries({}, optional=FIELD_STRATEGIES)


def _resolve(
    patch: dict[str, Any] | None, adjustments: list[Adjustment] | None = None
) -> Effective:
    return resolve(
        vm=WEB,
        policy=PROP_POLICY,
        profiles=PROP_PROFILES,
        vm_patch=patch,
        adjustments=adjustments or [],
        now=NOW,
    )


def test_empty_and_none_patch_identical() -> None:
    a, b = _resolve({}), _resolve(None)
    assert a.values == b.values
    assert a.sources == b.sources
    assert a == b


@settings(deadline=None)
@given(patches)
def test_property_override_wins(patch: dict[str, Any]) -> None:
    eff = _resolve(patch)
    for path, value in patch.items():
        assert eff.sources[path].layer == VM_PATCH
        if value is OFF:
            assert path not in eff.values
        else:
            assert eff.values[path] == value


@settings(deadline=None)
@given(patches)
def test_property_fields_not_in_patch_keep_lower_layers(patch: dict[str, Any]) -> None:
    eff = _resolve(patch)
    base = _resolve(None)
    for path, src in base.sources.items():
        if path in patch or src.layer == DERIVED:
            continue
        assert eff.sources[path] == src
        assert eff.values.get(path) == base.values.get(path)


@settings(deadline=None)
@given(patches)
def test_property_deterministic(patch: dict[str, Any]) -> None:
    a, b = _resolve(patch), _resolve(dict(patch))
    assert a == b
    assert a.values == b.values
    assert a.sources == b.sources
    assert a.to_dict() == b.to_dict()


@st.composite
def _patch_and_adjustment(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    patch = draw(patches.filter(bool))
    keys = draw(st.lists(st.sampled_from(sorted(patch)), min_size=1, unique=True))
    adjustment = {k: draw(FIELD_STRATEGIES[k]) for k in keys}
    return patch, adjustment


@settings(deadline=None)
@given(_patch_and_adjustment())
def test_property_runtime_beats_patch(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    patch, adjusted = case
    eff = _resolve(patch, [Adjustment(adjusted, "prop", NOW + timedelta(hours=1))])
    for path in patch:
        if path in adjusted:
            assert eff.sources[path].layer == RUNTIME
            value = adjusted[path]
        else:
            assert eff.sources[path].layer == VM_PATCH
            value = patch[path]
        if value is OFF:
            assert path not in eff.values
        else:
            assert eff.values[path] == value
