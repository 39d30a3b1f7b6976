"""What one QEMU guest is started with: its command line, derived from a launch request. Pure.

The guest boots the kernel and initramfs of ``scripts/vm/build-image.sh``
directly (no disk, no firmware menu), with one virtio-net NIC per vNIC, each on
its own tap device in its session namespace (``nic0`` on ``net0`` for ``eth0``,
``nic1`` on ``net1`` for ``eth1``...), a virtio-serial port for the QEMU guest agent, a QMP
socket, and its serial console in a file. Its init reads the NIC's addresses,
the profile's TCP sysctls and whether segmentation offload is off from the
kernel command line (``vnic.ipv4=``, ``vnic.ipv6=``, ``vnic.sysctl=``,
``vnic.offload=``; ``vnic.nic=NAME,MAC,IPV4,IPV6[,off]`` for each vNIC after
``eth0``), so a launch needs no round trip through the guest agent.
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


def nic_id(index: int) -> str:
    """The QEMU id of the guest's NIC of vNIC ``index`` (0: ``eth0``, :data:`NIC_ID`)."""
    return f"nic{index}"


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
class GuestNic:
    """A vNIC of a guest after ``eth0``: its name in the guest, its tap in the session
    namespace, its MAC and addresses, and whether TSO/GSO stay on (``offload``)."""

    name: str
    tap: str
    mac: str
    ipv4: str
    ipv6: str
    offload: bool = True


@dataclass(frozen=True)
class GuestSpec:
    """Everything a guest is started with.

    ``tap``: the tap device in the session namespace. ``sysctls``: (key, value)
    set by the guest's init before the NIC comes up. ``offload``: False turns
    TSO/GSO off on the guest's eth0 (per-packet impairments of its egress).
    ``accel``: ``kvm`` or ``tcg``. ``memory_mib``: guest RAM. ``more``: the
    vNICs after ``eth0``, in order.
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
    more: tuple[GuestNic, ...] = ()

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
    for nic in spec.more:
        words.append(
            f"vnic.nic={nic.name},{nic.mac},{nic.ipv4},{nic.ipv6}" + ("" if nic.offload else ",off")
        )
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
    # Each further vNIC's NIC right after eth0's: the guest names NICs in PCI probe
    # order (its init still finds each by MAC).
    more_nics = [
        word
        for i, nic in enumerate(spec.more, start=1)
        for word in (
            "-netdev",
            f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,id={nic_id(i)},netdev=net{i},mac={nic.mac}",
        )
    ]
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
        *more_nics,
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
