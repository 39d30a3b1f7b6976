"""Write a :class:`~vnic.plan.model.Plan`'s traffic control on fresh devices (at launch).

Runs against an open pyroute2 socket of the namespace that holds the plan's
devices. HTB classes are encoded by :func:`.encode.htb_class`, the one
encoder a live change uses too, and carried as they are by pyroute2
(:func:`send`); the qdiscs and filters go through pyroute2's own encoders.
Netem is added with ``tc`` (:func:`apply_netem`), whose distribution tables
pyroute2 lacks.
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink import nlmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from vnic.dataplane.namespaces import link_index, run_inside
from vnic.dataplane.tc.encode import (
    ETH_P_ALL,
    INGRESS_HANDLE,
    MATCH_ALL_KEY,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    ROOT_HANDLE,
    RTM_NEWTCLASS,
    TcRequest,
    handle,
    htb_class,
    leaf_major,
    pyroute2_keys,
    teach_pyroute2_bfifo,
)
from vnic.errors import DataplaneError
from vnic.plan.model import DirectionPlan, Plan
from vnic.plan.netem import netem_argv

#: Flags of a create-or-replace request (pyroute2's ``replace``, ``tc ... replace``).
REPLACE_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE


def apply_plan(ipr: Any, plan: Plan) -> None:
    """Create the plan's qdiscs, classes, filters and redirect on fresh devices."""
    teach_pyroute2_bfifo()
    for direction in plan.directions():
        if direction.shaped:
            _apply_direction(ipr, direction)
    if plan.redirect is not None:
        port = link_index(ipr, plan.redirect.device)
        ifb = link_index(ipr, plan.redirect.target)
        ipr.tc("add", "ingress", port, INGRESS_HANDLE)
        ipr.tc(
            "add-filter",
            "u32",
            port,
            parent=INGRESS_HANDLE,
            prio=1,
            protocol=ETH_P_ALL,
            target=INGRESS_HANDLE | 1,
            keys=[MATCH_ALL_KEY],
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb},
        )


def apply_netem(session_ns: str, plan: Plan) -> None:
    """Put the plan's netem qdiscs in place (after :func:`apply_plan` made their HTB classes)."""
    for d in plan.directions():
        for q in d.netem:
            proc = run_inside(session_ns, ["tc", *netem_argv(q)], capture_output=True, timeout=30)
            if proc.returncode != 0:
                raise DataplaneError(
                    f"cannot add netem on {q.device} ({d.direction}): {proc.stderr.strip()}"
                )


def _apply_direction(ipr: Any, d: DirectionPlan) -> None:
    assert d.device is not None
    if d.root is None:
        return  # netem alone, at the root: see apply_netem
    idx = link_index(ipr, d.device)
    ipr.tc("replace", "htb", idx, ROOT_HANDLE, default=d.root.default_minor)
    for c in d.classes:
        send(ipr, RTM_NEWTCLASS, REPLACE_FLAGS, htb_class(idx, c))
    for leaf in d.leaves:
        ipr.tc(
            "replace",
            leaf.kind,
            idx,
            leaf_major(leaf.class_minor) << 16,
            parent=handle(leaf.class_minor),
            limit=leaf.limit,
        )
    for f in d.filters:
        ipr.tc(
            "add-filter",
            "u32",
            idx,
            parent=ROOT_HANDLE,
            prio=f.prio,
            protocol=f.protocol,
            target=handle(f.class_minor),
            keys=pyroute2_keys(f.matches),
        )


def send(ipr: Any, msg_type: int, flags: int, request: TcRequest) -> None:
    """Send ``request`` on pyroute2 socket ``ipr`` and wait for its acknowledgement
    (:class:`~pyroute2.netlink.exceptions.NetlinkError` on a refusal, as ``ipr.tc``)."""
    msg = pyroute2_message(request)
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    # One message per call, so the first refusal stops the launch there, as ``ipr.tc``
    # would. (The sync wrapper's ``nlm_request`` fails in pyroute2 0.9.7: KeyError
    # 'nlm_generator'; its batch keeps the header as given.)
    ipr.nlm_request_batch([msg])


def pyroute2_message(request: TcRequest) -> Any:
    """``request`` as a pyroute2 message whose encoding is :meth:`TcRequest.body` after the
    netlink header: the options go as opaque bytes, not through a pyroute2 plugin."""
    msg = _RawTcmsg()
    msg["index"] = request.index
    msg["handle"] = request.handle
    msg["parent"] = request.parent
    msg["attrs"] = [["TCA_KIND", request.kind], ["TCA_OPTIONS", request.options]]
    return msg


class _RawTcmsg(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """A ``tcmsg`` whose ``TCA_OPTIONS`` is raw bytes (``cdata``), encoded elsewhere."""

    prefix = "TCA_"
    fields = tcmsg.fields
    nla_map = (("TCA_UNSPEC", "none"), ("TCA_KIND", "asciiz"), ("TCA_OPTIONS", "cdata"))
