"""Delay and loss in the plan, for both engines, and their renderings. No root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vnic.dataplane import delayd
from vnic.errors import InvalidInput
from vnic.model.profile import Profile, parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan.compile import DEFAULT_MINOR, compile_plan, direction_seed, impaired
from vnic.plan.model import DelayEngine, Devices, Impairment, NetemQdisc
from vnic.plan.netem import netem_argv

PLAIN = Devices(port="vh1", ifb="vi1")
RELAYED = Devices(port="vh1", ifb="vi1", relay="vx1", relay_port="vy1")


def profile(**doc: Any) -> Profile:
    spec = parse_profile_document({"name": "t", **doc})
    return complete([Layer("session-default", "t", spec.values)]).profile


def test_impaired_only_with_delay_or_loss() -> None:
    assert not impaired(profile(egress={"rate": "10Mbit"}))
    assert impaired(profile(ingress={"delay": "1ms"}))
    assert impaired(profile(egress={"loss": "1%"}))
    assert impaired(profile(egress={"duplicate": "1%"}))


def test_an_impaired_profile_needs_an_engine() -> None:
    with pytest.raises(ValueError, match="engine"):
        compile_plan(profile(egress={"delay": "5ms"}), PLAIN)
    with pytest.raises(ValueError, match="relay"):
        compile_plan(profile(egress={"delay": "5ms"}), PLAIN, engine="delayd")


def test_delayd_moves_shaping_off_the_ifb_and_guards_the_relay_port() -> None:
    from vnic.plan.model import Identity

    ident = Identity("02:76:6e:00:00:01", "10.0.0.2", "fd00::2", "vnic:s/a")
    plan = compile_plan(
        profile(egress={"rate": "10Mbit", "delay": "20ms"}, ingress={"rate": "5Mbit"}),
        RELAYED,
        ident,
        engine="delayd",
        seed=7,
    )
    assert plan.engine is not None
    assert plan.egress.device == "vx1"  # the engine writes VM egress into the relay
    assert plan.ingress.device == "vh1"
    assert plan.redirect is None
    assert plan.guard is not None and plan.guard.port == "vy1"
    assert plan.engine.egress == Impairment(
        direction="egress",
        delay=20_000_000,
        distribution="uniform",
        limit=plan.engine.egress.limit,
        seed=direction_seed(7, "egress"),
    )
    assert plan.engine.ingress is None  # relayed untouched


def test_plain_profile_ignores_the_engine() -> None:
    plan = compile_plan(profile(egress={"rate": "10Mbit"}), RELAYED, engine="delayd")
    assert plan.engine is None and plan.egress.device == "vi1" and plan.redirect is not None


def test_probabilities_in_ppb_times_in_ns_and_bursty_loss() -> None:
    plan = compile_plan(
        profile(
            egress={
                "delay": "10ms",
                "jitter": "2ms",
                "distribution": "pareto",
                "loss": {"mean": "2%", "burst_length": 4},
                "duplicate": "0.5%",
                "corrupt": "0.001%",
                "reorder": "25%",
            }
        ),
        RELAYED,
        engine="delayd",
    )
    assert plan.engine is not None and plan.engine.egress is not None
    imp = plan.engine.egress
    assert (imp.delay, imp.jitter, imp.distribution) == (10_000_000, 2_000_000, "pareto")
    assert (imp.loss, imp.loss_burst, imp.duplicate, imp.corrupt, imp.reorder) == (
        20_000_000,
        4.0,
        5_000_000,
        10_000,
        250_000_000,
    )
    assert imp.per_packet


def test_segmentation_offload_stays_for_jitter_that_keeps_order() -> None:
    assert not Impairment("egress", delay=1, jitter=1).per_packet
    assert Impairment("egress", delay=1, jitter=1, reorder=1).per_packet
    assert Impairment("egress", loss=1).per_packet


def test_seeds_come_from_the_profile_else_the_caller_and_differ_per_direction() -> None:
    doc = {"egress": {"loss": "1%"}, "ingress": {"loss": "1%"}}
    own = compile_plan(profile(seed=42, **doc), RELAYED, engine="delayd", seed=7).engine
    given = compile_plan(profile(**doc), RELAYED, engine="delayd", seed=7).engine
    assert own and own.egress and own.ingress and given and given.egress
    assert own.egress.seed == direction_seed(42, "egress") != own.ingress.seed
    assert given.egress.seed == direction_seed(7, "egress")


def test_delay_line_holds_more_for_longer_delays_and_higher_rates() -> None:
    def limit(**d: Any) -> int:
        eng = compile_plan(profile(egress=d), RELAYED, engine="delayd").engine
        assert eng and eng.egress
        return eng.egress.limit

    assert limit(delay="200ms") > limit(delay="10ms")
    assert limit(delay="10ms", rate="10Mbit") < limit(delay="10ms")  # no rate: 10 Gbit/s assumed
    # 200 ms at 10 Gbit/s must fit: at least the bandwidth-delay product.
    assert limit(delay="200ms") >= 10_000_000_000 // 8 * 0.2


def test_seed_field_is_validated() -> None:
    assert profile(seed=5).seed == 5
    assert profile(seed="12").seed == 12
    for bad in (-1, "x", 2**63, True, 1.5):
        with pytest.raises(InvalidInput) as exc:
            parse_profile_document({"name": "t", "seed": bad})
        assert exc.value.errors[0].path == "seed"


# ----------------------------------------------------------------------------- netem


def test_netem_replaces_each_leaf_and_keeps_order_by_pacing() -> None:
    plan = compile_plan(
        profile(
            egress={"rate": "10Mbit", "delay": "50ms", "jitter": "5ms"},
            qos={"egress": [{"name": "voice", "guaranteed": "1Mbit", "match": {"dscp": [46]}}]},
        ),
        PLAIN,
        engine="netem",
    )
    assert plan.engine is None and plan.egress.leaves == ()
    minors = sorted(q.parent_minor for q in plan.egress.netem)
    assert minors == [0x10, DEFAULT_MINOR]
    q = plan.egress.netem[0]
    assert q.device == "vi1" and q.rate == 10_000_000 // 8  # paced at the class ceiling: in order
    # Limit: the bandwidth-delay product (rate x (delay + jitter) + queue) in full frames, not 1000.
    frames = (10_000_000 // 8 * 55 // 1000 + plan_queue(plan)) / 1514
    assert q.limit == pytest.approx(frames, abs=1)
    assert plan.redirect is not None


def plan_queue(plan: Any) -> int:
    # the derived queue of 10 Mbit/s with 50 ms + 5 ms: rate x (delay + jitter + 50 ms)
    return int(10_000_000 // 8 * 0.105)


def test_netem_at_the_root_without_a_rate_and_unpaced_when_reordering() -> None:
    plan = compile_plan(
        profile(ingress={"delay": "10ms", "jitter": "1ms", "reorder": "5%"}), PLAIN, engine="netem"
    )
    (q,) = plan.ingress.netem
    assert (q.device, q.parent_minor, q.rate) == ("vh1", 0, 0)
    assert plan.ingress.root is None and plan.ingress.shaped


def test_netem_arguments() -> None:
    imp = Impairment(
        "egress",
        delay=20_000_000,
        jitter=5_000_000,
        distribution="normal",
        loss=10_000_000,
        loss_burst=4.0,
        duplicate=1_000_000,
        corrupt=1,
    )
    args = netem_argv(NetemQdisc("vi1", 0x10, imp, limit=300, rate=1_250_000))
    assert args[:9] == [
        "qdisc",
        "replace",
        "dev",
        "vi1",
        "parent",
        "1:10",
        "handle",
        "10:",
        "netem",
    ]
    text = " ".join(args)
    assert "limit 300 delay 20000.000us 5000.000us distribution normal" in text
    # Gilbert from mean 1 % and bursts of 4: r = 25 %, p = 0.01 x 0.25 / 0.99.
    assert "loss gemodel 0.2525253% 25.0000000% 100% 0%" in text
    assert "duplicate 0.1000000%" in text and "corrupt 0.0000001%" in text
    assert text.endswith("rate 10000000bit")
    root = netem_argv(NetemQdisc("vh1", 0, Impairment("ingress", loss=5_000_000), limit=10))
    assert root[4:7] == ["root", "handle", "1:"] and "loss random 0.5000000%" in " ".join(root)


# ----------------------------------------------------------------------------- delay engine


def test_engine_arguments() -> None:
    imp = Impairment(
        "egress",
        delay=5,
        jitter=2,
        distribution="normal",
        loss=3,
        loss_burst=2.5,
        seed=9,
        limit=100,
    )
    spec = delayd.direction_spec(imp, "vh1", "vx1")
    assert spec == (
        "name=egress,from=vh1,to=vx1,delay=5,jitter=2,dist=normal,reorder=0,loss=3,"
        "burst=2500,dup=0,corrupt=0,limit=100,seed=9"
    )
    argv = delayd.argv(DelayEngine("vh1", "vx1", imp, None), "vnic:s/a", Path("/x"), Path("/e"))
    assert argv[:5] == ["/e", "--tag", "vnic:s/a", "--stats", "/x"]
    assert argv[6].startswith("name=ingress,from=vx1,to=vh1,delay=0,")
