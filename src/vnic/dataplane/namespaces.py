"""Network namespaces, links and addresses of the netns data plane (needs root).

Only names from :mod:`vnic.plan.names` are created or removed here;
removal of a namespace first stops the processes inside it (found by the
namespace, not by any name pattern), since a namespace lives on while a
process holds it. A program run in a VM's namespace (:func:`run`,
:func:`popen`) runs inside the VM: with its init's PID, mount and UTS
namespaces too (see :mod:`vnic.dataplane.vminit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import vminit
from vnic.errors import DataplaneError
from vnic.plan.names import BRIDGE, VM_IFNAME, VmLinks, owner_tag

IFA_F_NODAD = 0x02


def exists(name: str) -> bool:
    return name in netns.listnetns()


def listing() -> list[str]:
    return sorted(netns.listnetns())


def find_link(ipr: Any, name: str) -> int | None:
    """Index of interface ``name`` in the socket's namespace, or None.

    A targeted RTM_GETLINK: ``link_lookup`` would dump and decode every link
    of the namespace, which in a session namespace grows with its VMs.
    """
    try:
        return int(ipr.link("get", ifname=name)[0]["index"])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def link_index(ipr: Any, name: str) -> int:
    """Index of interface ``name``; :class:`DataplaneError` if it does not exist."""
    index = find_link(ipr, name)
    if index is None:
        raise DataplaneError(f"device {name!r} does not exist")
    return index


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``name``.

    A socket opened, a ``/proc/sys/net`` file written or a process started in
    the block belongs to ``name``; entering once is far cheaper than a helper
    process per call (``ip netns exec``, pyroute2's ``NetNS``).
    """
    # Our own setns, not pyroute2's pushns/popns: those keep one process-wide
    # stack and save /proc/self (the main thread's namespace), which is wrong
    # when the agent's threads enter namespaces side by side.
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(f"{RUN_DIR}/{name}", os.O_RDONLY)
        except FileNotFoundError:
            raise DataplaneError(f"network namespace {name} does not exist") from None
        try:
            _check(_libc.setns(target, CLONE_NEWNET), f"entering namespace {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWNET), "returning to this thread's namespace")
    finally:
        os.close(own)


@contextlib.contextmanager
def opened(name: str) -> Iterator[Any]:
    """A netlink socket inside namespace ``name``, reused for every call in the block."""
    with inside(name):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
RUN_DIR = "/run/netns"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prepare_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does."""
    os.makedirs(RUN_DIR, exist_ok=True)
    if _libc.mount(b"", RUN_DIR.encode(), b"none", MS_SHARED | MS_REC, None) != 0:
        _check(
            _libc.mount(RUN_DIR.encode(), RUN_DIR.encode(), b"none", MS_BIND | MS_REC, None),
            "bind /run/netns",
        )
        _check(
            _libc.mount(b"", RUN_DIR.encode(), b"none", MS_SHARED | MS_REC, None),
            "share /run/netns",
        )


def create(name: str) -> None:
    """Create the named namespace (with ``lo`` up), like ``ip netns add``, without a child process.

    A short-lived thread unshares its network namespace and bind-mounts it to
    /run/netns/NAME; namespaces are per thread, so the rest of the process is
    untouched.
    """
    _prepare_run_dir()
    path = os.path.join(RUN_DIR, name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    failure: list[BaseException] = []

    def make() -> None:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare")
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                f"bind {path}",
            )
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)

    worker = threading.Thread(target=make, name=f"netns-{name}")
    worker.start()
    worker.join()
    if failure:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise DataplaneError(f"cannot create namespace {name}: {failure[0]}")
    with opened(name) as ns:
        ns.link("set", index=link_index(ns, "lo"), state="up")


def pids(name: str) -> list[int]:
    """Processes that live in namespace ``name``.

    Not this process, and no visitor (not to be stopped with the namespace): one
    of which only some threads are inside (a manager or agent reading with a
    thread, see :func:`inside`), or one sharing this process's mount namespace (it
    entered the network namespace alone with ``setns``: a single-threaded reader,
    the embedded CLI or a test, looking in while an agent destroys the VM). What
    vnic starts in a namespace has its own: ``ip netns exec`` makes one, and a
    VM's processes run in the VM's."""
    try:
        inode = os.stat(f"{RUN_DIR}/{name}").st_ino
        mounts = os.stat("/proc/self/ns/mnt").st_ino
    except FileNotFoundError:
        return []
    out = []
    for pid in (int(p) for p in netns.ns_pids().get(name, [])):
        if pid == os.getpid():
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            inside_all = all(os.stat(f"/proc/{pid}/task/{t}/ns/net").st_ino == inode for t in tasks)
            if inside_all and os.stat(f"/proc/{pid}/ns/mnt").st_ino != mounts:
                out.append(pid)
        except FileNotFoundError:
            continue  # gone already
    return sorted(out)


def remove(name: str, grace: float = 2.0) -> None:
    """Stop every process inside ``name`` (TERM, then KILL after ``grace`` s), then remove it."""
    if not exists(name):
        return
    victims = pids(name)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if alive(p)]
        time.sleep(0.02)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    netns.remove(name)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def run(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``name``: in a VM's, inside the VM (see :func:`entered`)."""
    with entered(name, kwargs) as prefix:
        return subprocess.run([*prefix, *argv], text=True, **kwargs)


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``argv`` inside namespace ``name`` without waiting for it: in a VM's, inside the
    VM (see :func:`entered`); killing what this returns kills the program."""
    with entered(name, kwargs) as prefix:
        return subprocess.Popen([*prefix, *argv], text=True, **kwargs)


@contextlib.contextmanager
def entered(name: str, kwargs: dict[str, Any]) -> Iterator[list[str]]:
    """The command prefix that runs a program in namespace ``name``, for the block;
    ``kwargs`` (a :mod:`subprocess` call's) gain the file descriptors it needs.

    A VM's namespace (``vnic.<session>.<vm>``) is entered with its init's PID,
    mount and UTS namespaces too (:func:`vnic.dataplane.vminit.entry`): a process
    run in a VM sees and signals only the VM's processes, and the VM's /proc,
    /sys and /etc/hosts; :class:`DataplaneError` if the VM's init is not running.
    Any other namespace (a session's, the probe's): ``ip netns exec``.
    """
    owner = vminit.owner_of_netns(name)
    if owner is None:
        yield ["ip", "netns", "exec", name]
        return
    with vminit.entry(*owner) as (prefix, fds):
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), *fds)
        yield prefix


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def sysctl(name: str, key: str, value: str) -> None:
    """Set a network sysctl inside namespace ``name``."""
    try:
        with inside(name), open(_sysctl_path(key), "w") as f:
            f.write(value)
    except OSError as exc:
        raise DataplaneError(f"sysctl {key}={value} refused in {name}: {exc.strerror}") from None


def read_sysctl(name: str, key: str) -> str:
    try:
        with inside(name), open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError as exc:
        raise DataplaneError(f"cannot read {key} in {name}: {exc.strerror}") from None


def run_inside(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a network tool (``nft``, ``ip``) with this thread's namespace set to ``name``.

    Cheaper than :func:`run`; unlike ``ip netns exec`` it does not remount
    /sys, so use :func:`run` for anything a user asked to run in a VM.
    """
    with inside(name):
        return subprocess.run(list(argv), text=True, **kwargs)


# ----------------------------------------------------------------------------- session and VM links


def ensure_session(ns_name: str, session: str, bridges: Sequence[str] = (BRIDGE,)) -> None:
    """The session namespace with the bridge ``vbr0`` and each of ``bridges`` (one per
    network, see :func:`vnic.plan.names.bridge_of`), each created if missing and tagged
    with the session. A bridge carries no address and the namespace routes nothing
    between bridges: each network is an L2 segment of its own."""
    if not exists(ns_name):
        create(ns_name)
    made = False
    with opened(ns_name) as ns:
        for bridge in dict.fromkeys((BRIDGE, *bridges)):
            if find_link(ns, bridge) is not None:
                continue
            # New, or left without its bridge by a killed launch: finish it.
            ns.link("add", ifname=bridge, kind="bridge")
            ns.link("set", index=link_index(ns, bridge), ifalias=owner_tag(session), state="up")
            made = True
    if made:
        _bridge_without_ip_hooks(ns_name)


#: br_netfilter's switches: when on (its per-namespace default), every bridged
#: frame also walks the IPv4/IPv6/ARP netfilter hooks of the session namespace.
BRIDGE_NF_SYSCTLS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)


def _bridge_without_ip_hooks(ns_name: str) -> None:
    """Bridged frames skip the IP hooks: vnic filters them in the bridge family only.

    The hooks cost about a tenth of the per-packet time of a bridged frame
    here, and nothing in the session namespace uses them.
    """
    for key in BRIDGE_NF_SYSCTLS:
        if os.path.exists(_sysctl_path(key)):
            sysctl(ns_name, key, "0")


def plug_vm(
    session_ns: str,
    vm_ns: str,
    session: str,
    vm: str,
    mac: str,
    addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    *,
    relay: bool = False,
    ifname: str = VM_IFNAME,
    bridge: str = BRIDGE,
) -> VmLinks:
    """Make one vNIC's veth (``ifname`` inside ``vm_ns``, the port in the session) and its
    IFB, the port on ``bridge``. ``vm`` is the vNIC's unit (the VM's name for ``eth0``,
    ``VM.NIC`` for the others): its links' names and owner tag come from it.

    With ``relay`` (the delay engine runs), the port stays off the bridge and
    a relay veth pair joins it instead: the engine is then the only way
    between the VM and the bridge.
    """
    links = VmLinks.of(vm)
    with opened(session_ns) as ns:
        _check_free(ns, session_ns, links)
        ns.link("add", ifname=links.port, kind="veth", peer={"ifname": ifname, "net_ns_fd": vm_ns})
        _attach_port(ns, session_ns, owner_tag(session, vm), links, relay, bridge)
    with opened(vm_ns) as vns:
        eth = link_index(vns, ifname)
        vns.link("set", index=eth, address=mac, state="up")
        for addr in addresses:
            vns.addr(
                "add",
                index=eth,
                address=str(addr.ip),
                prefixlen=addr.network.prefixlen,
                flags=IFA_F_NODAD,
            )
    return links


def plug_tap(
    session_ns: str, session: str, vm: str, *, relay: bool = False, bridge: str = BRIDGE
) -> VmLinks:
    """Make a QEMU guest's tap device as the VM's port (with its IFB, or the relay pair with
    ``relay``), tagged, on the session bridge as :func:`plug_vm` does for a veth.

    The tap is persistent (it outlives the file descriptor of whoever opens it)
    and named like a netns VM's port, so shaping, counters, guards and cleanup
    find a guest's vNIC exactly as they find a namespace VM's.
    """
    links = VmLinks.of(vm)
    with opened(session_ns) as ns:
        _check_free(ns, session_ns, links)
    # pyroute2 makes tuntap devices through /dev/net/tun in the calling thread's
    # namespace: enter the session's, so the tap is made there.
    proc = run_inside(
        session_ns,
        ["ip", "tuntap", "add", "dev", links.port, "mode", "tap", "vnet_hdr"],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot make tap {links.port} in {session_ns}: {proc.stderr.strip()}")
    with opened(session_ns) as ns:
        _attach_port(ns, session_ns, owner_tag(session, vm), links, relay, bridge)
    return links


def _check_free(ns: Any, session_ns: str, links: VmLinks) -> None:
    taken = [n for n in links.all() if find_link(ns, n) is not None]
    if taken:
        raise DataplaneError(f"links {', '.join(taken)} already exist in {session_ns}")


def _attach_port(
    ns: Any, session_ns: str, tag: str, links: VmLinks, relay: bool, bridge_name: str
) -> None:
    """Tag the VM's port and put it on the bridge with an IFB, or (``relay``) keep it off
    the bridge and put a relay veth pair there instead."""
    port = link_index(ns, links.port)
    bridge = link_index(ns, bridge_name)
    if relay:
        ns.link("add", ifname=links.relay, kind="veth", peer={"ifname": links.relay_port})
        for name in (links.port, links.relay):
            _detach_from_stack(session_ns, name)
            ns.link("set", index=link_index(ns, name), ifalias=tag, state="up")
        on_bridge = link_index(ns, links.relay_port)
    else:
        on_bridge = port
        ns.link("add", ifname=links.ifb, kind="ifb")
        ns.link("set", index=link_index(ns, links.ifb), ifalias=tag, state="up")
    ns.link("set", index=on_bridge, master=bridge, ifalias=tag, state="up")


def replug_host_side(
    session_ns: str, session: str, vm: str, *, relay: bool, bridge: str = BRIDGE
) -> VmLinks:
    """Rebuild the links of the vNIC of unit ``vm`` in the session namespace for ``relay``
    (the delay engine runs) or not, keeping the port and with it the VM's interface
    (its addresses and sockets); what goes on ``bridge`` is the port or the relay port.

    The port's qdiscs go (the caller applies the new plan), the IFB or relay pair of
    the old layout is deleted, and the new one made as :func:`plug_vm` makes it.
    """
    links = VmLinks.of(vm)
    tag = owner_tag(session, vm)
    with opened(session_ns) as ns:
        port = link_index(ns, links.port)
        for kind, handle in (("htb", 0x10000), ("netem", 0x10000), ("ingress", 0xFFFF0000)):
            with contextlib.suppress(NetlinkError):  # none there: nothing to remove
                ns.tc("del", kind, port, handle)
        for name in (links.ifb, links.relay):
            index = find_link(ns, name)
            if index is not None:
                ns.link("del", index=index)
        bridge_index = link_index(ns, bridge)
        if relay:
            ns.link("set", index=port, master=0)
            ns.link("add", ifname=links.relay, kind="veth", peer={"ifname": links.relay_port})
            for name in (links.port, links.relay):
                _detach_from_stack(session_ns, name)
                ns.link("set", index=link_index(ns, name), ifalias=tag, state="up")
            ns.link(
                "set",
                index=link_index(ns, links.relay_port),
                master=bridge_index,
                ifalias=tag,
                state="up",
            )
        else:
            sysctl(session_ns, f"net.ipv6.conf.{links.port}.disable_ipv6", "0")
            sysctl(session_ns, f"net.ipv4.conf.{links.port}.arp_ignore", "0")
            ns.link("add", ifname=links.ifb, kind="ifb")
            ns.link("set", index=link_index(ns, links.ifb), ifalias=tag, state="up")
            ns.link("set", index=port, master=bridge_index, ifalias=tag, state="up")
    return links


def _detach_from_stack(session_ns: str, device: str) -> None:
    """Keep the session's own stack off a device only the engine should use.

    Without this, the session namespace would answer the VM's ARP for the
    bridge address through the port, bypassing the engine, and send IPv6
    router solicitations of its own into it.
    """
    sysctl(session_ns, f"net.ipv6.conf.{device}.disable_ipv6", "1")
    sysctl(session_ns, f"net.ipv4.conf.{device}.arp_ignore", "8")


def set_offloads(ns_name: str, device: str, on: bool) -> None:
    """Turn TCP segmentation and generic segmentation offload of ``device`` on or off.

    Off makes the kernel hand over single MTU-sized frames, so per-packet
    decisions (loss, duplication, corruption, reordering) hit single packets.
    """
    state = "on" if on else "off"
    # run_inside, not run: a network tool, which needs only the network namespace (a
    # VM's offloads are set at launch before its init is ready, see vminit.finish).
    proc = run_inside(
        ns_name,
        ["ethtool", "-K", device, "tso", state, "gso", state],
        capture_output=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise DataplaneError(
            f"cannot turn segmentation offload {state} on {device} in {ns_name}: {proc.stderr.strip()}"
        )


def unplug_vm(session_ns: str, session: str, vm: str) -> None:
    """Delete the VM's port, IFB and relay in the session namespace, if they carry its tag."""
    if not exists(session_ns):
        return
    links = VmLinks.of(vm)
    tag = owner_tag(session, vm)
    with opened(session_ns) as ns:
        for name in (links.port, links.ifb, links.relay):
            # Absent is fine, and a veth goes away by itself once its peer (or
            # its peer's namespace) is gone, possibly between get and delete.
            try:
                (link,) = ns.link("get", ifname=name)
                if link.get_attr("IFLA_IFALIAS") == tag:
                    ns.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise DataplaneError(f"cannot delete {name} in {session_ns}: {exc}") from exc


def set_route_congctl(
    vm_ns: str,
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    algorithm: str | None,
    device: str = VM_IFNAME,
) -> None:
    """Per-route congestion control for ``network`` on ``device`` (reaches algorithms the
    namespace sysctl may not select, such as cubic); None takes the per-route choice away."""
    family = "-6" if network.version == 6 else "-4"
    # "replace" matches the kernel's own prefix route only with the same metric:
    # IPv6 gives it 256 (IPv4 0); without it a second, losing route is added.
    metric = ["metric", "256"] if network.version == 6 else []
    proc = subprocess.run(
        [
            "ip",
            family,
            "-n",
            vm_ns,
            "route",
            "replace",
            str(network),
            "dev",
            device,
            "proto",
            "kernel",
            *metric,
            *(["congctl", algorithm] if algorithm else []),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if proc.returncode != 0:
        raise DataplaneError(
            f"congctl {algorithm} on {network} refused in {vm_ns}: {proc.stderr.strip()}"
        )


# ----------------------------------------------------------------------------- session services


def session_listener(
    ns_name: str, addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface], port: int
) -> list[socket.socket]:
    """Listening TCP sockets on ``addresses`` (put on the session bridge if missing), inside
    the session namespace: a service VMs of the session reach, and nothing else can.

    The addresses go on the bridge, which the session namespace owns (they go
    with it); IPv6 without duplicate address detection, so it listens at once.
    """
    listeners: list[socket.socket] = []
    with opened(ns_name) as ns:
        index = link_index(ns, BRIDGE)
        have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=index)}
        for address in addresses:
            if str(address.ip) not in have:
                family = socket.AF_INET if address.version == 4 else socket.AF_INET6
                ns.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    family=family,
                    flags=IFA_F_NODAD,
                )
    try:
        with inside(ns_name):
            for address in addresses:
                family = socket.AF_INET if address.version == 4 else socket.AF_INET6
                sock = socket.socket(family, socket.SOCK_STREAM)
                listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((str(address.ip), port))
                sock.listen(64)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


#: Interface address flag: skip duplicate address detection (IPv6).
IFA_F_NODAD = 0x02
