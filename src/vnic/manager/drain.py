"""Draining a host: its running VMs relaunched on other hosts, with the same MACs and
addresses (they are the database's, not the host's).

For each VM, one transaction moves its placement and appends a change for both hosts:
the old host's agent sees the VM no longer desired there and removes it, the new
host's launches it. The host is cordoned first, so nothing new lands on it. A VM no
other host can take stays where it is, and the answer says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from vnic.errors import VnicError
from vnic.manager.hosts import Hosts
from vnic.store.models import VmRow


@dataclass(frozen=True)
class Move:
    """One VM of a drained host: where it went (None: it stayed) and why not, or the
    new host agent's error."""

    session: str
    vm: str
    to: str | None
    error: str | None = None


class Draining(Hosts):
    def drain_host(self, name: str) -> list[Move]:
        """Cordon host ``name`` and move each of its running VMs to another host (placed
        as a launch would be), waiting for the new hosts' reports (:attr:`host_wait`
        in all)."""
        self.cordon_host(name, True)
        with self.db.reading() as s:
            host = self._host_row(s, name)
            keys = [
                (v.session.name, v.name)
                for v in s.scalars(
                    select(VmRow).where(VmRow.host_id == host.id, VmRow.state == "running")
                )
            ]
        moves: list[Move] = []
        waits: list[tuple[str, str, int]] = []
        for session, vm in keys:
            try:
                with self.db.transaction() as s:
                    row = self._vm_row(s, session, vm)
                    old = row.host_id
                    target = self._place(s, row, None)
                    assert old is not None
                    self._append(s, row)  # the old host: no longer desired there
                    row.host_id = target.id
                    s.flush()
                    waits.append((session, vm, self._append(s, row, placement={old})))
                    moves.append(Move(session, vm, target.name))
            except VnicError as exc:
                moves.append(Move(session, vm, None, str(exc)))
        self.waiters.local_wake()
        statuses = self.wait_statuses(waits, self.host_wait)
        out = []
        for m in moves:
            status = statuses.get((m.session, m.vm))
            if m.to is not None and status is None:
                m = Move(
                    m.session, m.vm, m.to, f"no report from {m.to} within {self.host_wait:g} s"
                )
            elif status is not None and status.error:
                m = Move(m.session, m.vm, m.to, str(status.error.get("message", "failed")))
            out.append(m)
        return out
