"""Live changes: re-resolve running VMs and send what changed to the agent."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vnic.agent.port import AgentPort
from vnic.errors import DataplaneError, Unavailable, VnicError, error_from_body
from vnic.manager import changelog
from vnic.manager.core import applied_state, nic_changes
from vnic.manager.hosts import Hosts
from vnic.manager.results import VmChange
from vnic.manager.rows import audit_row
from vnic.model.launch import LaunchRequest
from vnic.model.resolve import Effective
from vnic.store.models import VmRow

#: One changed vNIC of a running VM: its name, new effective profile, changed fields.
_NicDiff = tuple[str, Effective, dict[str, tuple[Any, Any]]]


class Reapplying(Hosts):
    """Live changes of running VMs through their agent."""

    def reapply(
        self,
        driver: AgentPort,
        *,
        session: str | None = None,
        vm: str | None = None,
        source: str | None = None,
        reason: str = "",
        strict: bool = False,
    ) -> list[VmChange]:
        """Re-resolve running VMs and send each one whose effective profile changed to
        ``driver`` as a live change; record what now runs and audit every change.
        ``driver`` is an agent (:meth:`vnic.agent.core.Agent.reconfigure_many`, or the
        HTTP client of one): it knows what each VM runs, which a driver's own
        live change starts from.

        The scope is every running VM, or those of ``session`` (and ``vm``).
        Only VMs whose effective values or profile revisions differ from what
        they run are touched, and the driver changes only what differs (see
        :meth:`vnic.drivers.netns.NetnsDriver.reconfigure`). A VM whose change
        fails keeps what it ran and carries the error in its :class:`VmChange`
        (or, with ``strict``, the error is raised after the others are done).
        With ``source``, each change is written to the audit log under it and
        ``reason`` (runtime adjustments audit themselves, so they pass none).
        """
        with driver.gate().shared():
            changes = self._reapply(driver, session, vm, source, reason, hosted=False)
        # VMs on hosts: with the gate let go (it covers this host's own agent, whose
        # reconcile, a replica starting, must not wait for other hosts' reports).
        changes += self._reapply(driver, session, vm, source, reason, hosted=True)
        failed = [c for c in changes if c.error]
        if strict and failed:
            raise DataplaneError("; ".join(f"{c.session}/{c.vm}: {c.error}" for c in failed))
        return changes

    def _reapply(
        self,
        driver: AgentPort,
        session: str | None,
        vm: str | None,
        source: str | None,
        reason: str,
        hosted: bool,
    ) -> list[VmChange]:
        """:meth:`reapply` of the VMs on hosts (``hosted``) or of those on the manager's
        own agent."""
        with self.db.reading() as s:
            # One entry per running VM with a changed vNIC: the whole request goes to the
            # agent (the driver changes only what differs), one VmChange per changed vNIC.
            pending: list[tuple[dict[str, Effective], LaunchRequest, list[_NicDiff]]] = []
            ids: dict[tuple[str, str], int] = {}
            for row, effs in self._running(s, session, vm, hosted=hosted):
                diffs: list[_NicDiff] = []
                for name, eff in effs.items():
                    fields = nic_changes(row.applied, name, eff)
                    if fields is not None:
                        diffs.append((name, eff, fields))
                if not diffs:
                    continue
                pending.append((effs, self._launch_request(row, effs), diffs))
                ids[(row.session.name, row.name)] = row.id
        if not pending:
            return []
        waited: dict[tuple[str, str], int] = {}
        if hosted:
            outcomes, waited = self._reconfigure_hosted(sorted(ids), ids)
        else:
            outcomes = driver.reconfigure_many([r for _, r, _ in pending])
        changes: list[VmChange] = []
        now = self.clock()
        with self.db.transaction() as s:
            rows = {r.id: r for r in s.scalars(select(VmRow).where(VmRow.id.in_(ids.values())))}
            for effs, request, diffs in pending:
                outcome = outcomes.get((request.session, request.vm))
                error = str(outcome) if isinstance(outcome, BaseException) else None
                kernel = [] if error or not isinstance(outcome, list) else list(outcome)
                for name, eff, fields in diffs:
                    sources = {path: str(eff.sources.get(path, "")) for path in fields}
                    changes.append(
                        VmChange(
                            request.session,
                            request.vm,
                            fields,
                            sources,
                            kernel,
                            error,
                            eff.revisions,
                            nic=name,
                        )
                    )
                if error:
                    continue
                current = rows.get(ids[(request.session, request.vm)])
                if current is None:
                    continue  # removed while the change ran
                current.applied = applied_state(
                    (current.applied or {}).get("driver", driver.kind), effs
                )
                key = (request.session, request.vm)
                if key in waited:
                    current.applied[changelog.LOGGED] = waited[key]
                if source is None:
                    continue
                for name, _, fields in diffs:
                    if fields:
                        s.add(
                            audit_row(
                                now, request.session, request.vm, source, reason, fields, name
                            )
                        )
        return changes

    def _reconfigure_hosted(
        self, keys: list[tuple[str, str]], ids: dict[tuple[str, str], int]
    ) -> tuple[dict[tuple[str, str], list[str] | VnicError], dict[tuple[str, str], int]]:
        """Wait for the reports of the changes of ``keys`` (VMs on hosts), :attr:`host_wait`
        seconds in all: the outcome of each, and the revision waited for.

        The write that made the change logged it in its own transaction (a change newer
        than the one whose outcome the VM's ``applied`` records); a VM whose newest
        change is not newer gets one here (a write that logs none, or the VM's change
        was taken in already, e.g. by an earlier live change that raced this one), and
        so does one whose newest change its agent reported as failed (tried again)."""
        if not keys:
            return {}, {}
        with self.db.transaction() as s:
            rows = list(s.scalars(select(VmRow).where(VmRow.id.in_([ids[k] for k in keys]))))
            newest = changelog.newest(s, rows)
            reported = self._statuses(s, keys)
            waits = []
            for r in rows:
                revision = newest.get(r.id, -1)
                status = reported.get((r.session.name, r.name))
                # An error already reported for that change is tried again, not repeated.
                failed = status is not None and status.revision >= revision and status.error
                if revision <= changelog.logged(r.applied) or failed:
                    revision = self._append(s, r)
                waits.append((r.session.name, r.name, revision))
        self.waiters.local_wake()
        out: dict[tuple[str, str], list[str] | VnicError] = {}
        for key, status in self.wait_statuses(waits, self.host_wait).items():
            if status is None:
                out[key] = Unavailable(
                    f"no report from the VM's host within {self.host_wait:g} s; the change "
                    "stays desired and its agent applies it when it is back"
                )
            elif status.error:
                out[key] = error_from_body(dict(status.error))
            else:
                out[key] = list(status.changes)
        return out, {(session, vm): revision for session, vm, revision in waits}

    def running_effective(self, session: str) -> dict[tuple[str, str], tuple[str, Effective]]:
        """Every vNIC of each running VM of ``session``, ``(vm, nic) -> (its network's
        name, its effective profile)``, in one transaction (what the controller compares
        its samples per vNIC with)."""
        with self.db.reading() as s:
            return {
                (row.name, nic.name): (nic.network.name, effs[nic.name])
                for row, effs in self._running(s, session)
                for nic in row.nics
            }
