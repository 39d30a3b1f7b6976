"""``vnic doctor``: what this kernel can do, found by trying in a throwaway namespace,
which profile fields each driver can therefore honour, and what the qemu driver's
guests would run with. The report comes from the agent (this host's, or with
``--server`` the manager's: :mod:`vnic.agent.doctor`); this module renders it."""

from vnic.cli import render
from vnic.cli.common import JsonFlag, backend, emit_json, out, run


def doctor(as_json: JsonFlag = False) -> None:
    """Probe what this kernel can do (by trying, in a throwaway namespace) and which
    profile fields each driver can therefore honour; and what the qemu driver's guests
    run with (accelerator, QEMU, boot image). Needs root; with --server, the manager's
    agent's host (an admin token)."""

    def body() -> None:
        report = backend().doctor()
        if as_json:
            emit_json(report)
            return
        out.print(render.kernel_table(report["kernel"]))
        out.print(render.driver_fields_table(report["drivers"]))
        engine = report["delay_engine"]
        out.print(f"delay and loss engine: {engine['engine']} ({engine['why']})", markup=False)
        out.print(render.qemu_table(report["qemu"]))
        if report["vnics"]:
            out.print(render.vnic_engines_table(report["vnics"]))
        missing = report["tools_missing"]
        if missing:
            out.print(f"missing tools: {' '.join(missing)} (run scripts/install.sh)", markup=False)

    run(body)
