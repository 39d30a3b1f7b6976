"""``vnic doctor``: what this kernel can do, found by trying in a throwaway namespace,
which profile fields each driver can therefore honour, and what the qemu driver's
guests would run with. The probes are imported when the command runs."""

from typing import Any

from vnic.cli import render
from vnic.cli.common import JsonFlag, emit_json, out, run


def doctor(as_json: JsonFlag = False) -> None:
    """Probe what this kernel can do (by trying, in a throwaway namespace) and which
    profile fields each driver can therefore honour; and what the qemu driver's guests
    run with (accelerator, QEMU, boot image). Needs root."""

    def body() -> None:
        from vnic.dataplane.probe import run_probe, tools_missing
        from vnic.drivers.netns import NetnsDriver, capabilities_from_probe, choose_engine
        from vnic.drivers.qemu import QemuDriver

        probe = run_probe()
        caps = capabilities_from_probe(probe)
        guest_caps = QemuDriver(probe).capabilities()
        choice = choose_engine(probe)
        in_use = NetnsDriver(probe).engines_in_use()
        guests = qemu_report()
        if as_json:
            emit_json(
                {
                    "kernel": probe.to_dict(),
                    "tools_missing": tools_missing(),
                    "drivers": [caps.to_dict(), guest_caps.to_dict()],
                    "delay_engine": {"engine": choice.engine, "why": choice.reason},
                    "qemu": guests,
                    "vnics": in_use,
                }
            )
            return
        out.print(render.kernel_table(probe.to_dict(), probe.congestion_control))
        out.print(render.driver_fields_table((caps, guest_caps)))
        out.print(f"delay and loss engine: {choice.engine} ({choice.reason})", markup=False)
        out.print(render.qemu_table(guests))
        if in_use:
            out.print(render.vnic_engines_table(in_use))
        missing = tools_missing()
        if missing:
            out.print(f"missing tools: {' '.join(missing)} (run scripts/install.sh)", markup=False)

    run(body)


def qemu_report() -> dict[str, Any]:
    """What the qemu driver needs here, found without building or booting anything new:
    the accelerator and why, QEMU's binary and version, and the guest boot image."""
    import os
    import shutil
    import subprocess

    from vnic.dataplane import qemu
    from vnic.errors import DataplaneError

    accelerator: dict[str, str | None]
    try:
        accel = qemu.known_accelerator()
    except DataplaneError as exc:
        accelerator = {"name": None, "why": str(exc)}
    else:
        accelerator = (
            {"name": accel.name, "why": accel.reason}
            if accel is not None
            else {
                "name": None,
                "why": "/dev/kvm exists and the CPU shows vmx/svm: a KVM trial boot of the "
                "guest image decides, on the first launch (the image is not built yet)",
            }
        )
    binary = shutil.which("qemu-system-x86_64")
    version = None
    if binary is not None:
        try:
            proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            version = proc.stdout.strip().splitlines()[0]
    image = qemu.cached_image()
    return {
        "accelerator": accelerator,
        "binary": {"path": binary, "version": version},
        "image": {
            "directory": str(image.directory) if image is not None else None,
            "info": image.info() if image is not None else {},
            "given": os.environ.get("VNIC_VM_IMAGE") or None,
            "cache": str(qemu.image_cache()),
        },
    }
