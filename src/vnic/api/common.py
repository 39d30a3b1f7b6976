"""What several of the API's routers share: the VM-writer check and the JSON of live changes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from vnic.manager import views
from vnic.manager.auth import Principal, require_vm_writer
from vnic.manager.dispatch import Manager
from vnic.manager.results import VmChange

#: ``check(who, session, action)``: refuses (:class:`~vnic.errors.Forbidden`) a caller who
#: may not change the VMs of ``session``; ``action`` names what was tried, for the message.
VmWriter = Callable[[Principal, str, str], None]


def vm_writer(manager: Manager) -> VmWriter:
    """The VM-writer check on ``manager``'s tokens: admins, and the session's owner."""

    def check(who: Principal, session: str, action: str) -> None:
        owner = None if who.is_admin else manager.tokens.session_owner(session)
        require_vm_writer(who, session, owner, action)

    return check


def changes_json(changes: Iterable[VmChange]) -> list[dict[str, Any]]:
    """The ``changes`` of an answer: what a write changed on running VMs."""
    return [views.change_json(c) for c in changes]
