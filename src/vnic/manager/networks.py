"""The network use cases: add a network to a session (a free network id and the
subnets derived from it, unless chosen), list, read, remove.

A network's id is a VXLAN VNI unique across every network of every session (the
``default`` network of a session has the session's ``network_id``); its subnets must
not overlap another network's of the same session (sessions are isolated
namespaces, so two sessions may share a subnet).
"""

from __future__ import annotations

import ipaddress

from sqlalchemy.orm import Session

from vnic.errors import Conflict, InUse, InvalidInput, NotFound
from vnic.manager.core import ServiceCore
from vnic.manager.results import NetworkInfo
from vnic.manager.sessions import Sessions
from vnic.model.launch import DEFAULT_NETWORK
from vnic.model.network import parse_ipv4_subnet, parse_ipv6_subnet, parse_network_name
from vnic.model.session import parse_network_id
from vnic.plan.names import session_ipv4, session_ipv6
from vnic.store.models import NetworkRow, SessionRow


class Networks(ServiceCore):
    """A session's networks: ``default`` and those added."""

    def add_network(
        self,
        session: str,
        name: str,
        *,
        network_id: int | str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        default_profile: str | None = None,
    ) -> NetworkInfo:
        """Add network ``name`` to ``session``. ``network_id`` (default: the lowest free
        one), ``ipv4``/``ipv6`` (CIDR; default: derived from the network id as a
        session's are) and ``default_profile`` (default: none, the session's applies).
        Refused, with nothing written, for a taken name or id, overlapping subnets or
        an unknown profile."""
        name = parse_network_name(name, "name")
        wanted_id = parse_network_id(network_id) if network_id is not None else None
        v4 = parse_ipv4_subnet(ipv4) if ipv4 is not None else None
        v6 = parse_ipv6_subnet(ipv6) if ipv6 is not None else None
        with self.db.transaction() as s:
            self.db.allocation_lock(s)
            srow = self._session_row(s, session)
            if any(n.name == name for n in srow.networks):
                raise Conflict(f"network {name!r} already exists in session {srow.name!r}")
            profile = self._existing_profile(s, default_profile, "default_profile")
            if wanted_id is None:
                wanted_id = Sessions._free_network_id(s)
            else:
                owner = Sessions._network_id_owner(s, wanted_id)
                if owner is not None:
                    raise InvalidInput.one(
                        "network_id",
                        wanted_id,
                        f"a network id no other network uses ({owner} does)",
                    )
            v4 = v4 or session_ipv4(wanted_id)
            v6 = v6 or session_ipv6(wanted_id)
            _check_overlap(srow, v4, v6, chosen=(ipv4 is not None, ipv6 is not None))
            row = NetworkRow(
                name=name,
                network_id=wanted_id,
                ipv4=str(v4),
                ipv6=str(v6),
                default_profile_id=profile.id if profile else None,
                created_at=self.clock(),
            )
            row.default_profile = profile
            srow.networks.append(row)
            s.flush()
            return _network_info(row)

    def list_networks(self, session: str) -> list[NetworkInfo]:
        with self.db.reading() as s:
            return [_network_info(n) for n in self._session_row(s, session).networks]

    def get_network(self, session: str, name: str) -> NetworkInfo:
        with self.db.reading() as s:
            return _network_info(self._network_row(s, self._session_row(s, session), name))

    def remove_network(self, session: str, name: str) -> None:
        """Remove a network no vNIC uses; ``default`` stays (every session has it)."""
        with self.db.transaction() as s:
            srow = self._session_row(s, session)
            row = self._network_row(s, srow, name)
            if row.name == DEFAULT_NETWORK:
                raise InvalidInput.one(
                    "network", name, "a network other than default (every session keeps it)"
                )
            users = [f"{srow.name}/{n.vm.name}/{n.name}" for n in row.nics]
            if users:
                raise InUse("network", f"{srow.name}/{name}", users)
            srow.networks.remove(row)

    @staticmethod
    def _network_row(s: Session, srow: SessionRow, name: str) -> NetworkRow:
        for row in srow.networks:
            if row.name == name:
                return row
        raise NotFound(f"network in session {srow.name!r}", name, [n.name for n in srow.networks])


def _check_overlap(
    srow: SessionRow,
    v4: ipaddress.IPv4Network,
    v6: ipaddress.IPv6Network,
    chosen: tuple[bool, bool],
) -> None:
    for net in srow.networks:
        for path, mine, theirs, given in (
            ("ipv4", v4, ipaddress.IPv4Network(net.ipv4), chosen[0]),
            ("ipv6", v6, ipaddress.IPv6Network(net.ipv6), chosen[1]),
        ):
            if mine.overlaps(theirs):
                hint = "" if given else f" (derived from the network id; choose one with {path})"
                raise InvalidInput.one(
                    path,
                    str(mine),
                    f"a subnet overlapping no other network of session {srow.name!r}: "
                    f"network {net.name} has {theirs}{hint}",
                )


def _network_info(row: NetworkRow) -> NetworkInfo:
    return NetworkInfo(
        session=row.session.name,
        name=row.name,
        network_id=row.network_id,
        ipv4=row.ipv4,
        ipv6=row.ipv6,
        default_profile=row.default_profile.name if row.default_profile else None,
        nics=[f"{n.vm.name}/{n.name}" for n in row.nics],
    )
