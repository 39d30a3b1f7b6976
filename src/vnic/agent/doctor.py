"""What a host can do, as the agent reports it (:meth:`vnic.agent.core.Agent.doctor`,
``vnic doctor``): the kernel probe (found by trying, in a throwaway namespace), the tools
missing, the profile fields each driver can therefore honour, the delay engine chosen,
what the qemu driver's guests run with, and the vNICs running here with their engine.

The report is plain data (the JSON ``vnic doctor --json`` prints, and the agent's and the
manager's ``GET /v1/doctor`` answer); the CLI renders it (:mod:`vnic.cli.render`).
Needs root (the probe makes a namespace).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from vnic.dataplane import qemu
from vnic.dataplane.probe import run_probe, tools_missing
from vnic.drivers.netns import NetnsDriver, capabilities_from_probe, choose_engine
from vnic.drivers.qemu import QemuDriver
from vnic.errors import DataplaneError


def report() -> dict[str, Any]:
    """The host's report: ``kernel`` (the probe by group, ``congestion_control`` among
    them), ``tools_missing``, ``drivers`` (each driver's capabilities), ``delay_engine``
    (``engine`` and ``why``), ``qemu`` (:func:`qemu_report`) and ``vnics`` (each running
    vNIC's engine, with its counters if it has any)."""
    probe = run_probe()
    choice = choose_engine(probe)
    return {
        "kernel": probe.to_dict(),
        "tools_missing": tools_missing(),
        "drivers": [
            capabilities_from_probe(probe).to_dict(),
            QemuDriver(probe).capabilities().to_dict(),
        ],
        "delay_engine": {"engine": choice.engine, "why": choice.reason},
        "qemu": qemu_report(),
        "vnics": NetnsDriver(probe).engines_in_use(),
    }


def qemu_report() -> dict[str, Any]:
    """What the qemu driver needs here, found without building or booting anything new:
    the accelerator and why, QEMU's binary and version, and the guest boot image."""
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
