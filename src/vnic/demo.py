"""The demo behind the README's first command.

Loads the sample profiles, (re)creates the session ``demo`` with a default
profile, an assignment rule and a per-VM override, and prints how each VM's
profile was resolved. The data plane issue turns this into a real launch with
measured traffic.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console

from vnic.documents import parse_documents, read_documents
from vnic.errors import NotFound
from vnic.manager.service import Service, VmRequest
from vnic.model.profile import parse_assignments
from vnic.model.session import AssignmentRule

SESSION = "demo"


def run_demo(service: Service, profiles_dir: Path, out: Console) -> None:
    results = service.apply_profiles(parse_documents(read_documents([str(profiles_dir)])))
    for r in results:
        out.print(f"profile {r.name}: {r.action} (revision {r.revision})", markup=False)
    with contextlib.suppress(NotFound):  # first run: nothing to rebuild
        service.delete_session(SESSION, force=True)
    session = service.create_session(
        SESSION,
        default_profile="wan-dsl",
        rules=[AssignmentRule(profile="lan", role="server")],
    )
    out.print(
        f"session {session.name}: network id {session.network_id}, default wan-dsl, rule role=server -> lan",
        markup=False,
    )
    requests = [
        VmRequest(SESSION, "client", role="desktop"),
        VmRequest(SESSION, "server", role="server"),
        VmRequest(
            SESSION,
            "phone",
            role="desktop",
            profile="mobile-3g",
            patch=parse_assignments(["egress.loss=off", "tcp.congestion_control=reno"]),
        ),
    ]
    from vnic.cli import print_explanation

    for req in requests:
        service.add_vm(req)
    for req in requests:
        out.print()
        print_explanation(service.explain(SESSION, req.name))
