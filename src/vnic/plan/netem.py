"""Render a :class:`~vnic.plan.model.NetemQdisc` as the arguments of ``tc``. Pure.

netem is configured through ``tc`` rather than netlink because its jitter
distributions are tables that iproute2 ships (``/usr/lib/tc/*.dist``) and
loads itself. Times go in microseconds, probabilities in percent with
enough digits for parts per billion. netem has no seed before Linux 6.3 and
iproute2 6.3, so on older systems its random choices are not reproducible
(the vnic delay engine's are).
"""

from __future__ import annotations

from vnic.plan.model import Impairment, NetemQdisc

ROOT_HANDLE_MAJOR = 1
_DEFAULT_MINOR = 0xFFFF


def _us(ns: int) -> str:
    return f"{ns / 1000:.3f}us"


def _pct(ppb: int) -> str:
    return f"{ppb / 1e7:.7f}%"


def handle(q: NetemQdisc) -> str:
    """The netem's own handle: ``1:`` at the root, else the leaf handle scheme of HTB leaves."""
    if not q.parent_minor:
        return f"{ROOT_HANDLE_MAJOR:x}:"
    major = 2 if q.parent_minor == _DEFAULT_MINOR else q.parent_minor
    return f"{major:x}:"


def netem_argv(q: NetemQdisc) -> list[str]:
    """``tc qdisc replace ...`` arguments (without the leading ``tc``)."""
    parent = ["root"] if not q.parent_minor else ["parent", f"1:{q.parent_minor:x}"]
    args = ["qdisc", "replace", "dev", q.device, *parent, "handle", handle(q), "netem"]
    args += ["limit", str(q.limit)]
    args += impairment_args(q.impairment)
    if q.rate:
        args += ["rate", f"{q.rate * 8}bit"]
    return args


def impairment_args(imp: Impairment) -> list[str]:
    args: list[str] = []
    if imp.delay or imp.jitter or imp.reorder:
        args += ["delay", _us(imp.delay)]
        if imp.jitter:
            args.append(_us(imp.jitter))
            if imp.distribution != "uniform":
                args += ["distribution", imp.distribution]
    if imp.reorder:
        args += ["reorder", _pct(imp.reorder)]
    if imp.loss:
        if imp.loss_burst:
            # The simple Gilbert model from mean loss m and mean burst b:
            # bad->good r = 1/b, good->bad p = m r / (1 - m); every packet in
            # the bad state is lost (1-h = 100%), none in the good (1-k = 0%).
            m = imp.loss / 1e9
            r = 1 / imp.loss_burst
            p = m * r / (1 - m)
            args += ["loss", "gemodel", f"{p * 100:.7f}%", f"{r * 100:.7f}%", "100%", "0%"]
        else:
            args += ["loss", "random", _pct(imp.loss)]
    if imp.duplicate:
        args += ["duplicate", _pct(imp.duplicate)]
    if imp.corrupt:
        args += ["corrupt", _pct(imp.corrupt)]
    return args
