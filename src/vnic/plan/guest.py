"""What one QEMU guest is started with: its command line, derived from a launch request. Pure.

The guest boots the kernel and initramfs of ``scripts/vm/build-image.sh``
directly (no disk, no firmware menu), with one virtio-net NIC on a tap device
in its session namespace, a virtio-serial port for the QEMU guest agent, a QMP
socket, and its serial console in a file. Its init reads the NIC's addresses,
the profile's TCP sysctls and whether segmentation offload is off from the
kernel command line (``vnic.ipv4=``, ``vnic.ipv6=``, ``vnic.sysctl=``,
``vnic.offload=``), so a launch needs no round trip through the guest agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vnic.plan import names

#: Guest memory (MiB) and vCPUs, unless ``VNIC_QEMU_MEMORY`` / ``VNIC_QEMU_CPUS`` say otherwise.
#: 128 MiB holds the kernel, the initramfs (unpacked into RAM) and iperf3 with room to spare.
DEFAULT_MEMORY_MIB = 128
DEFAULT_CPUS = 1
#: Name of the virtio-serial port the guest agent listens on (its init finds it by this name).
AGENT_PORT = "org.qemu.guest_agent.0"
#: The QEMU ids of the guest's NIC (QMP's ``set_link`` and ``query-rx-filter`` name it)
#: and of the tap back end it is connected to.
NIC_ID = "nic0"
NETDEV_ID = "net0"
#: The line the guest's init prints on its console once eth0 is up.
READY_MARK = "vnic-guest: ready"


@dataclass(frozen=True)
class RunFiles:
    """A guest's files in its run directory: pid, QMP and agent sockets, console log."""

    directory: Path

    @property
    def pid(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.directory / "qga.sock"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"


@dataclass(frozen=True)
class GuestSpec:
    """Everything a guest is started with.

    ``tap``: the tap device in the session namespace. ``sysctls``: (key, value)
    set by the guest's init before the NIC comes up. ``offload``: False turns
    TSO/GSO off on the guest's eth0 (per-packet impairments of its egress).
    ``accel``: ``kvm`` or ``tcg``. ``memory_mib``: guest RAM.
    """

    session: str
    vm: str
    tap: str
    mac: str
    ipv4: str
    ipv6: str
    sysctls: tuple[tuple[str, str], ...] = ()
    offload: bool = True
    accel: str = "tcg"
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    extra_append: Sequence[str] = field(default_factory=tuple)

    @property
    def owner(self) -> str:
        """QEMU's ``-name``: the owner tag, which is how vnic tells its guest processes apart."""
        return names.owner_tag(self.session, self.vm)


def kernel_command_line(spec: GuestSpec) -> str:
    """The guest kernel's command line: a quiet console on ttyS0 and the init's settings.

    Sysctl keys and values with whitespace, commas or ``=`` cannot be passed (none
    of the TCP settings has one); they raise ValueError rather than reach the guest
    half-parsed.
    """
    words = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1"]
    words += [f"vnic.ipv4={spec.ipv4}", f"vnic.ipv6={spec.ipv6}"]
    if spec.sysctls:
        for key, value in spec.sysctls:
            if any(c.isspace() or c in ",=" for c in f"{key}{value}"):
                raise ValueError(f"sysctl {key}={value!r} cannot be passed on a command line")
        words.append("vnic.sysctl=" + ",".join(f"{k}={v}" for k, v in spec.sysctls))
    if not spec.offload:
        words.append("vnic.offload=off")
    return " ".join([*words, *spec.extra_append])


def qemu_argv(
    spec: GuestSpec, kernel: Path, initrd: Path, run: RunFiles, binary: str = "qemu-system-x86_64"
) -> list[str]:
    """The QEMU command line of ``spec``; it daemonizes once the tap is open and the sockets
    listen, and writes its pid to ``run.pid``.

    The tap exists already (vnic makes it, tagged, in the session namespace);
    ``script=no`` keeps QEMU from configuring anything on the host. ``-no-reboot``
    with ``panic=-1``: a guest that panics ends its QEMU instead of looping.
    """
    cpu = "host" if spec.accel == "kvm" else "max"
    return [
        binary,
        "-name",
        spec.owner,
        "-accel",
        spec.accel,
        "-cpu",
        cpu,
        "-smp",
        str(spec.cpus),
        "-m",
        str(spec.memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        kernel_command_line(spec),
        "-serial",
        f"file:{run.console}",
        "-netdev",
        f"tap,id={NETDEV_ID},ifname={spec.tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,id={NIC_ID},netdev={NETDEV_ID},mac={spec.mac}",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=qga,path={run.agent},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=qga,name={AGENT_PORT}",
        "-qmp",
        f"unix:{run.qmp},server=on,wait=off",
        "-pidfile",
        str(run.pid),
        "-daemonize",
    ]


def owner_of_cmdline(argv: Sequence[str]) -> str | None:
    """The ``-name`` of a QEMU process's command line (its owner tag), or None."""
    for i, word in enumerate(argv[:-1]):
        if word == "-name":
            return argv[i + 1]
    return None
