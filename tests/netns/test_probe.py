"""The capability probe on the real kernel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.netns.conftest import doctor_json
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import qemu
from vnic.dataplane.probe import run_probe
from vnic.drivers.netns import capabilities_from_probe


def _tc_accepts(kind: str, *args: str) -> bool:
    ns = "vnic.probe-check"
    nsops.remove(ns)
    nsops.create(ns)
    try:
        nsops.run(ns, ["ip", "link", "add", "c0", "type", "veth", "peer", "name", "c1"], check=True)
        return (
            nsops.run(
                ns, ["tc", "qdisc", "add", "dev", "c0", "root", kind, *args], capture_output=True
            ).returncode
            == 0
        )
    finally:
        nsops.remove(ns)


def test_probe_agrees_with_trying_by_hand_and_cleans_up() -> None:
    before = nsops.listing()
    probe = run_probe()
    assert nsops.listing() == before
    assert probe.has("qdisc:htb") and probe.has("link:ifb") and probe.has("action:mirred")
    assert probe.has("qdisc:netem") == _tc_accepts("netem", "delay", "1ms")
    assert probe.has("qdisc:sfq") == _tc_accepts("sfq")
    assert set(probe.congestion_control) >= {"reno"}


def test_capabilities_follow_the_probe() -> None:
    probe = run_probe()
    caps = capabilities_from_probe(probe)
    assert "egress.rate" in caps.fields and "qos.ingress" in caps.fields
    # Delay and loss: netem where the kernel has it, else the vnic delay engine.
    assert probe.has("qdisc:netem") or probe.has("engine:delayd")
    assert "egress.delay" in caps.fields and "ingress.loss" in caps.fields
    probe.qdiscs["netem"] = probe.engines["netem"] = probe.engines["delayd"] = False
    neither = capabilities_from_probe(probe)
    assert "egress.delay" not in neither.fields
    assert "netem (missing on this kernel)" in neither.missing["egress.delay"]
    probe.actions["mirred"] = False
    crippled = capabilities_from_probe(probe)
    assert "egress.rate" not in crippled.fields
    assert "action:mirred" in crippled.missing["egress.rate"]


def test_doctor_json() -> None:
    data = doctor_json()
    assert data["kernel"]["qdiscs"]["htb"] is True
    assert data["drivers"][0]["kind"] == "netns"
    assert data["tools_missing"] == []
    # The qemu driver keeps the netns driver's host side, so it honours the same fields.
    netns, guests = data["drivers"]
    assert guests["kind"] == "qemu"
    assert (guests["fields"], guests["missing"]) == (netns["fields"], netns["missing"])


def _expected_accelerator() -> tuple[str | None, str]:
    """The accelerator (and a word its reason must hold) this host's /dev/kvm and
    /proc/cpuinfo call for; None where only a KVM trial boot can tell."""
    forced = os.environ.get("VNIC_QEMU_ACCEL", "").strip()
    if forced:
        return forced, "VNIC_QEMU_ACCEL"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.MULTILINE):
        return "tcg", "vmx/svm"
    return None, "trial boot"


def _image_key() -> str:
    """The cache key of scripts/vm/build-image.sh, computed by bash from its own lines."""
    script = Path(qemu.BUILD_SCRIPT)
    snippet = (
        f"eval \"$(grep '^GUEST_TOOLS=' {script})\"; "
        f'(cat {script} "${{GUEST_TOOLS[@]}}") | sha256sum | cut -c1-16'
    )
    return subprocess.run(
        ["bash", "-c", snippet], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_doctor_reports_what_the_qemu_driver_runs_with() -> None:
    data = doctor_json()
    guests = data["qemu"]

    name, reason = _expected_accelerator()
    accel = guests["accelerator"]
    if name is not None:
        assert accel["name"] == name
        assert reason in accel["why"]
    else:  # vmx/svm and /dev/kvm: a trial boot decides once the image exists
        assert accel["name"] in (("kvm", "tcg") if guests["image"]["directory"] else (None,))

    binary = shutil.which("qemu-system-x86_64")
    assert guests["binary"]["path"] == binary
    if binary is not None:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        assert guests["binary"]["version"] == version.splitlines()[0]
        assert guests["binary"]["version"].startswith("QEMU emulator version ")

    image = guests["image"]
    if os.environ.get("VNIC_VM_IMAGE"):
        assert image["given"] == os.environ["VNIC_VM_IMAGE"]
    else:
        cache = Path(os.environ.get("VNIC_VM_CACHE") or "/var/cache/vnic/vm")
        assert image["cache"] == str(cache)
        current = cache / _image_key()
        if (current / "complete").is_file():
            assert image["directory"] == str(current)
            assert image["info"]["kernel"] == next(
                line.split("=", 1)[1]
                for line in (current / "info").read_text().splitlines()
                if line.startswith("kernel=")
            )
        else:
            assert image["directory"] is None

    # The table says the same.
    table = subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    (accel_row,) = [r for r in table.stdout.splitlines() if r.startswith("│ accelerator ")]
    assert accel_row.split("│")[2].strip() == (accel["name"] or "undecided")
    drivers = [r.split("│")[1].strip() for r in table.stdout.splitlines() if r.startswith("│ ")]
    assert "netns" in drivers and "qemu" in drivers
