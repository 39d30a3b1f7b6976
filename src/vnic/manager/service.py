"""The service layer: every operation on profiles, sessions and VMs.

The CLI (embedded), the REST API and the UI all call this class, so input is
validated once, here and in :mod:`vnic.model`. Every public method is one
transaction: it either completes or changes nothing (a use case that spans
several, like :meth:`Service.add_and_launch`, undoes its earlier steps). Results
are plain dataclasses (:mod:`vnic.manager.results`), never ORM rows.

:class:`Service` composes one class per aggregate (:mod:`vnic.manager.profiles`,
:mod:`~vnic.manager.sessions`, :mod:`~vnic.manager.vms`, :mod:`~vnic.manager.launch`,
:mod:`~vnic.manager.reapply`, over :mod:`~vnic.manager.core`); what is here spans
aggregates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vnic.agent.port import AgentPort
from vnic.manager.drain import Draining
from vnic.manager.launch import Launching
from vnic.manager.networks import Networks
from vnic.manager.profiles import Profiles
from vnic.manager.reapply import Reapplying
from vnic.manager.results import ApplyResult, Explanation, VmChange, VmRequest
from vnic.manager.sessions import Sessions
from vnic.manager.vms import Vms
from vnic.model.profile import ProfileSpec


class Service(Profiles, Sessions, Networks, Vms, Launching, Reapplying, Draining):
    """Profiles, sessions and VMs over one :class:`~vnic.store.db.Database`.

    ``clock`` is injectable (see :class:`~vnic.manager.core.ServiceCore`).
    """

    def apply_profiles_live(
        self, specs: Sequence[ProfileSpec], driver: AgentPort
    ) -> tuple[list[ApplyResult], list[VmChange]]:
        """:meth:`apply_profiles`, then the new revisions live on every running VM they reach."""
        results = self.apply_profiles(specs, driver=driver)
        updated = [f"{r.name} r{r.revision}" for r in results if r.action == "updated"]
        if not updated:
            return results, []
        reason = "profile " + ", ".join(updated)
        return results, self.reapply(driver, source="user", reason=reason)

    def update_vm_live(
        self,
        session: str,
        name: str,
        changes: Mapping[str, Any],
        driver: AgentPort,
        nic: str = "eth0",
    ) -> tuple[Explanation, list[VmChange]]:
        """:meth:`update_vm` (of vNIC ``nic``'s override), then the change live on the VM
        if it runs (errors raised); only the vNICs whose profile changed are touched."""
        # update_vm's explanation is the one after the change: reapply sends what it
        # resolved and changes no record but what runs.
        result = self.update_vm(session, name, changes, driver, nic=nic)
        reason = "VM override" if nic == "eth0" else f"vNIC {nic} override"
        applied = self.reapply(
            driver, session=session, vm=name, source="user", reason=reason, strict=True
        )
        return result, applied

    def add_and_launch(
        self,
        req: VmRequest,
        driver: AgentPort,
        kind: str | None = None,
        *,
        host: str | None = None,
    ) -> Explanation:
        """Define a VM (:meth:`add_vm`) and launch it (:meth:`launch_vm` on ``driver``,
        ``kind`` as there, which holds the agent's gate itself); a failed launch defines
        nothing: the new VM is removed again (its MAC released) and the launch's error
        raised."""
        added = self.add_vm(req)
        try:
            return self.launch_vm(req.session, added.vm.name, driver, kind, host=host)
        except BaseException:
            # Also on KeyboardInterrupt: a VM the caller asked to launch must not stay defined.
            self.remove_vm(req.session, added.vm.name)
            raise
