"""Remove every vnic session from this host through vnic's own teardown (needs root).

``python -m vnic.lab.hostclean`` is what :meth:`vnic.lab.hostbed.HostBed.destroy`
runs inside an emulated host once the host's agents are stopped: the host's agent
(on ``$VNIC_HOME/agent``, as ``vnic agent`` and the embedded CLI use it) tears down
every session its drivers find on the host, by name and owner tag, and forgets
their desired state, so nothing is removed that vnic did not make and a later
agent on the same directory relaunches nothing. Prints one line per session; exit
status 1 when a teardown failed (its error on stderr).
"""

from __future__ import annotations

import sys

from vnic.errors import VnicError


def main() -> int:
    from vnic.agent.core import local_agent
    from vnic.dataplane import overlay

    agent = local_agent("netns")
    sessions: set[str] = {vm.request.session for vm in agent.state.all()}
    for driver in agent.drivers.values():
        sessions.update(driver.inventory())
    sessions.update(overlay.sessions())  # a filter whose namespace is gone already
    failed = 0
    for session in sorted(sessions):
        try:
            agent.teardown_session(session)
            print(f"session {session}: torn down")
        except VnicError as exc:
            failed += 1
            print(f"session {session}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
