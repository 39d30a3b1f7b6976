"""Emulated hypervisor hosts on one machine, joined by an underlay bridge (needs root).

A :class:`HostBed` makes, for a tag ``T`` (names: :mod:`vnic.lab.hostbed_plan`),
an underlay namespace ``vnic-ul-T`` holding the bridge ``br-T``, a manager host
``vnic-hm-T`` (.1) and hosts ``vnic-h1-T``, ``vnic-h2-T``... (.11, .12, ...), each
a network namespace with loopback up and one veth to the bridge carrying its IPv4
and IPv6 address. Nothing joins the underlay to the machine's own namespace: the
hosts reach each other and the manager host, never the machine.

Each host is also a mount namespace of its own, where ``/run/netns`` is a private
tmpfs: the network namespaces vnic makes on a host (``vnic.<session>``,
``vnic.<session>.<vm>``) are named there only, so the same session and VM names on
two hosts do not clash, and ``ip netns list`` in a host shows that host's alone.
A small holder process (``sleep``, started by the bed, in the host's network and
mount namespaces) keeps the mount namespace alive: the host "keeps running", its
VMs included, while its agent is killed and restarted.

Every process of a host (:meth:`HostBed.spawn`, :meth:`HostBed.run`) enters the
host's network and mount namespaces through ``nsenter`` (which then executes the
program: the process is the program, signals reach it) and gets the host's own
directory ``<root>/<host>/`` as ``VNIC_HOME`` (database, agent state and lock,
keys, built engines) and ``<root>/<host>/run`` as ``VNIC_RUNTIME_DIR`` (the data
plane's pid and run files): nothing on disk is shared between hosts. Processes
are found again by the PID the bed recorded, never by a name pattern.

:meth:`HostBed.destroy` stops what the bed started (by PID: SIGTERM, then SIGKILL
after :data:`STOP_GRACE` s), removes what vnic made inside each host through vnic's
own teardown (:mod:`vnic.lab.hostclean`), then the hosts and the underlay; it is
idempotent, and reports through :meth:`HostBed.leftovers` anything it could not
remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import procs
from vnic.dataplane.inventory import parse_netns
from vnic.errors import DataplaneError, InvalidInput
from vnic.lab.hostbed_plan import BedPlan, HostSpec, plan_bed

#: Seconds a process of the bed gets between SIGTERM and SIGKILL.
STOP_GRACE = 5.0
#: Seconds a holder may take to say it is ready (a few milliseconds on an idle machine).
HOLDER_READY = 10.0
#: Seconds :meth:`HostBed.run` lets a command run by default.
RUN_TIMEOUT = 120.0
#: Where named network namespaces live, in every mount namespace.
NETNS_DIR = nsops.RUN_DIR

#: The holder: in the host's new mount namespace (private: nothing mounted here
#: reaches the machine's, nor the other way), a tmpfs over /run/netns, shared as
#: ``ip netns add`` makes it (so ``ip netns exec`` inside sees namespaces added
#: later), then "ready" and a sleep that holds the namespaces until it is stopped.
_HOLDER = (
    'mount -t tmpfs -o mode=0755,size=1m "$1" /run/netns'
    " && mount --make-shared /run/netns"
    " && echo ready"
    " && exec sleep infinity >/dev/null 2>&1"
)


@dataclass
class Host:
    """One emulated host: its plan (names, addresses), its directory, and its holder."""

    spec: HostSpec
    home: Path
    holder: subprocess.Popen[bytes] | None = None
    #: A process of the host that this bed did not start (the holder of a bed a killed
    #: run left, found by :meth:`HostBed.destroy`): the way in when there is no holder.
    adopted: int | None = None

    @property
    def name(self) -> str:
        """The host's network namespace (in the machine's ``/run/netns``)."""
        return self.spec.netns

    @property
    def short(self) -> str:
        return self.spec.short

    @property
    def address4(self) -> str:
        return str(self.spec.address4.ip)

    @property
    def address6(self) -> str:
        return str(self.spec.address6.ip)

    @property
    def runtime_dir(self) -> Path:
        return self.home / "run"

    def running(self) -> bool:
        """Whether the host's mount namespace can be entered (its holder, or an adopted
        process of it, runs)."""
        if self.holder is not None and self.holder.poll() is None:
            return True
        return self.adopted is not None and nsops.alive(self.adopted)

    def entry(self) -> int:
        """The PID whose namespaces are the host's (its holder's)."""
        if self.holder is not None and self.holder.poll() is None:
            return self.holder.pid
        if self.adopted is not None and nsops.alive(self.adopted):
            return self.adopted
        raise DataplaneError(f"host {self.short} is not running (its holder is gone)")

    def netns_dir(self) -> str:
        """The host's ``/run/netns`` as the machine reaches it (through its holder)."""
        return f"/proc/{self.entry()}/root{NETNS_DIR}"


@dataclass(frozen=True)
class Link:
    """A link of a namespace: its name, kind (``veth``, ``bridge``, ``ifb``...; None for a
    plain device) and alias (vnic's owner tag on the links it makes)."""

    name: str
    kind: str | None
    alias: str | None


@dataclass(frozen=True)
class Inventory:
    """What exists on one host: its named namespaces, each with its links (``lo`` left out)."""

    host: str
    namespaces: dict[str, tuple[Link, ...]]

    def sessions(self) -> set[str]:
        """Sessions with a session namespace here."""
        return {o[0] for o in map(parse_netns, self.namespaces) if o and o[1] is None}

    def vms(self) -> set[tuple[str, str]]:
        """``(session, vm)`` of every VM namespace here."""
        return {(o[0], o[1]) for o in map(parse_netns, self.namespaces) if o and o[1]}

    def links(self, namespace: str) -> set[str]:
        return {link.name for link in self.namespaces.get(namespace, ())}


HostRef = Host | str


class HostBed:
    """``count`` emulated hosts and a manager host on one underlay (see the module).

    ``root`` holds each host's directory (default: a temporary directory the bed
    makes and removes). Use as a context manager, or call :meth:`create` and
    :meth:`destroy`.
    """

    def __init__(
        self,
        tag: str,
        count: int,
        *,
        subnet4: str = "10.250.0.0/24",
        subnet6: str = "fd00:250::/64",
        root: Path | None = None,
    ) -> None:
        self.plan: BedPlan = plan_bed(tag, count, subnet4, subnet6)
        self.tag = tag
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(f"/tmp/vnic-bed-{tag}")
        self.manager = Host(self.plan.manager, self.root / self.plan.manager.short)
        self.hosts = [Host(spec, self.root / spec.short) for spec in self.plan.hosts]
        self._spawned: list[subprocess.Popen[Any]] = []
        self._problems: list[str] = []

    # ------------------------------------------------------------------ life

    def __enter__(self) -> HostBed:
        return self.create()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    @property
    def every_host(self) -> list[Host]:
        """The manager host, then the hosts."""
        return [self.manager, *self.hosts]

    def create(self) -> HostBed:
        """Make the underlay, the manager host and the hosts; on failure nothing is left
        (and the error is raised)."""
        taken = sorted(n for n in self.plan.names() if n in nsops.listing())
        if taken:
            raise DataplaneError(
                f"host bed {self.tag}: namespaces {', '.join(taken)} exist already "
                "(another bed with this tag, or one a killed run left: "
                "HostBed(tag, count, root=...).destroy() removes it)"
            )
        if self._own_root:
            self.root = Path(tempfile.mkdtemp(prefix=f"vnic-bed-{self.tag}-"))
            for host in self.every_host:
                host.home = self.root / host.short
        try:
            self._make_underlay()
            for host in self.every_host:
                self._make_host(host)
        except BaseException:
            with contextlib.suppress(DataplaneError):
                self.destroy()
            raise
        return self

    def _make_underlay(self) -> None:
        plan = self.plan
        nsops.create(plan.underlay)
        alias = f"{plan.manager.alias.rsplit('/', 1)[0]}/underlay"
        with _netlink(f"the underlay bridge {plan.bridge}"), nsops.opened(plan.underlay) as ns:
            ns.link("add", ifname=plan.bridge, kind="bridge")
            ns.link("set", index=nsops.link_index(ns, plan.bridge), ifalias=alias, state="up")

    def _make_host(self, host: Host) -> None:
        spec, plan = host.spec, self.plan
        host.home.mkdir(parents=True, exist_ok=True)
        host.runtime_dir.mkdir(exist_ok=True)
        nsops.create(spec.netns)
        # No duplicate address detection on the underlay: its addresses work at once.
        nsops.sysctl(spec.netns, "net.ipv6.conf.default.accept_dad", "0")
        with _netlink(f"host {spec.short}'s underlay port"), nsops.opened(plan.underlay) as ns:
            # Made in the underlay with its peer straight in the host: never in the
            # machine's namespace, where two beds' names could meet.
            peer = {"ifname": spec.ifname, "net_ns_fd": spec.netns}
            ns.link("add", ifname=spec.port, kind="veth", peer=peer)
            bridge = nsops.link_index(ns, plan.bridge)
            port = nsops.link_index(ns, spec.port)
            ns.link("set", index=port, ifalias=spec.alias, master=bridge, state="up")
        with _netlink(f"host {spec.short}'s addresses"), nsops.opened(spec.netns) as hs:
            nic = nsops.link_index(hs, spec.ifname)
            hs.link("set", index=nic, ifalias=spec.alias, state="up")
            for address in (spec.address4, spec.address6):
                hs.addr(
                    "add",
                    index=nic,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    flags=nsops.IFA_F_NODAD,
                )
        host.holder = self._start_holder(host)

    def _start_holder(self, host: Host) -> subprocess.Popen[bytes]:
        log = host.home / "holder.log"
        with open(log, "wb") as err:
            holder = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={NETNS_DIR}/{host.name}",
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    _HOLDER,
                    "sh",
                    f"vnic-bed-{self.tag}-{host.short}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # a terminal's ^C is for the test, not the host
            )
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], HOLDER_READY)
        line = holder.stdout.readline() if ready else b""
        holder.stdout.close()
        if line.strip() != b"ready":
            _stop([holder], STOP_GRACE)
            raise DataplaneError(
                f"host {host.short} of bed {self.tag}: its holder did not start: "
                f"{log.read_text(errors='replace').strip() or 'no output'}"
            )
        return holder

    # ------------------------------------------------------------------ processes

    def host(self, ref: HostRef) -> Host:
        """The host ``ref`` names: a :class:`Host`, a short name (``hm``, ``h1``) or a
        namespace name (``vnic-h1-T``)."""
        if isinstance(ref, Host):
            return ref
        for host in self.every_host:
            if ref in (host.short, host.name):
                return host
        known = ", ".join(h.short for h in self.every_host)
        raise InvalidInput.one("host", ref, f"a host of bed {self.tag}: one of {known}")

    def env(self, host: HostRef, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of ``host``: this one's, with the host's
        ``VNIC_HOME`` and ``VNIC_RUNTIME_DIR``, then ``extra`` (which may replace them)."""
        h = self.host(host)
        return {
            **os.environ,
            "VNIC_HOME": str(h.home),
            "VNIC_RUNTIME_DIR": str(h.runtime_dir),
            **(extra or {}),
        }

    def spawn(
        self,
        host: HostRef,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host`` (its network and mount namespaces, its directory
        as ``VNIC_HOME``; ``env`` added, see :meth:`env`), in ``popen["cwd"]`` or this
        process's working directory; ``popen`` goes to :class:`subprocess.Popen`. The
        bed stops it in :meth:`destroy` if it still runs."""
        h = self.host(host)
        cwd = str(popen.pop("cwd", None) or os.getcwd())
        prefix = ["nsenter", f"--target={h.entry()}", "--net", "--mount", f"--wd={cwd}"]
        proc = subprocess.Popen([*prefix, *argv], env=self.env(h, env), **popen)
        self._spawned.append(proc)
        return proc

    def run(
        self,
        host: HostRef,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to its end (killed after ``timeout`` s, then
        :class:`subprocess.TimeoutExpired`); its output captured as text."""
        proc = self.spawn(
            host,
            argv,
            env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            self._spawned.remove(proc)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def processes(self) -> list[int]:
        """PIDs of the processes the bed started that still run (holders included)."""
        procs = [*self._spawned, *(h.holder for h in self.every_host if h.holder is not None)]
        return [p.pid for p in procs if p.poll() is None]

    @staticmethod
    def pause(pid: int) -> None:
        """Stop process ``pid`` (SIGSTOP): it holds its sockets and locks but does nothing."""
        os.kill(pid, signal.SIGSTOP)

    @staticmethod
    def resume(pid: int) -> None:
        """Let a paused process go on (SIGCONT)."""
        os.kill(pid, signal.SIGCONT)

    # ------------------------------------------------------------------ reading

    def inventory(self, host: HostRef) -> Inventory:
        """The named namespaces inside ``host`` (its ``/run/netns``) and their links."""
        h = self.host(host)
        directory = h.netns_dir()
        found: dict[str, tuple[Link, ...]] = {}
        for name in sorted(os.listdir(directory)):
            path = f"{directory}/{name}"
            proc = subprocess.run(
                ["nsenter", f"--net={path}", "ip", "-d", "-j", "link", "show"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if proc.returncode != 0 and not os.path.exists(path):
                continue  # removed while we looked
            # A namespace file a killed launch left unmounted cannot be entered: it holds nothing.
            links = json.loads(proc.stdout or "[]") if proc.returncode == 0 else []
            found[name] = tuple(
                Link(
                    str(link["ifname"]),
                    link.get("linkinfo", {}).get("info_kind"),
                    link.get("ifalias"),
                )
                for link in links
                if link["ifname"] != "lo"
            )
        return Inventory(h.short, found)

    def leftovers(self) -> list[str]:
        """Everything of the bed that still exists: its namespaces and links in the
        machine's namespace, the processes it started, the namespaces inside hosts that
        still run, and what :meth:`destroy` could not remove. Empty after a clean
        :meth:`destroy`."""
        out = list(self._problems)
        out += [f"namespace {n}" for n in nsops.listing() if n in self.plan.names()]
        proc = subprocess.run(
            ["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30
        )
        for link in json.loads(proc.stdout or "[]"):
            if self.plan.owns_link(str(link["ifname"]), link.get("ifalias")):
                out.append(f"link {link['ifname']} in the machine's namespace")
        out += [f"process {pid}" for pid in self.processes()]
        for host in self.every_host:
            if host.running():
                out += [f"{host.short}: namespace {n}" for n in self.inventory(host).namespaces]
        return out

    # ------------------------------------------------------------------ faults

    def partition(self, host: HostRef, on: bool) -> None:
        """Drop (``on``) or let through again every packet ``host`` sends or receives on the
        underlay, with an nftables table inside the host's network namespace (removed on
        heal). Idempotent both ways."""
        h = self.host(host)
        table = f"inet {self.plan.nft_table}"
        # "add" then "delete": the table is gone afterwards whether or not it existed.
        script = f"add table {table}\ndelete table {table}\n"
        if on:
            dev = h.spec.ifname
            script += (
                f"table {table} {{\n"
                f"  chain in {{ type filter hook input priority -300; iifname {dev} drop; }}\n"
                f"  chain out {{ type filter hook output priority -300; oifname {dev} drop; }}\n"
                "}\n"
            )
        proc = nsops.run_inside(
            h.name, ["nft", "-f", "-"], input=script, capture_output=True, timeout=30
        )
        if proc.returncode != 0:
            what = "partition" if on else "heal"
            raise DataplaneError(f"cannot {what} host {h.short}: {proc.stderr.strip()}")

    # ------------------------------------------------------------------ removing

    def destroy(self) -> None:
        """Stop every process the bed started, remove what vnic made inside each host
        (through vnic's teardown), then the hosts and the underlay. Idempotent;
        :class:`DataplaneError` (after removing all it can) listing what is left.

        A bed a killed run left (its holders still running, this object knows none of
        them) is destroyed by a new ``HostBed`` with the same tag, count and ``root``:
        each host is entered through a process found in it, by its namespace."""
        problems: list[str] = []
        _stop(self._spawned, STOP_GRACE)
        self._spawned = []
        for host in self.every_host:
            if not host.running():
                host.adopted = _resident(host.name)
            problems += self._clean_host(host)
            if host.holder is not None:
                _stop([host.holder], STOP_GRACE)
                host.holder = None
            host.adopted = None
            # Stops whatever still runs in the host's network namespace (by the namespace):
            # an adopted holder, anything a host's process left behind.
            nsops.remove(host.name)
        nsops.remove(self.plan.underlay)
        if self._own_root and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self._problems = problems
        if problems:
            raise DataplaneError(f"host bed {self.tag} left: {'; '.join(problems)}")

    def _clean_host(self, host: Host) -> list[str]:
        """vnic's own teardown inside ``host`` when anything of vnic is there; what is
        still there afterwards."""
        if not host.running():
            return []
        if not self.inventory(host).namespaces and not _files(host.runtime_dir):
            return []
        proc = self.run(host, [sys.executable, "-m", "vnic.lab.hostclean"], timeout=300)
        problems = [] if proc.returncode == 0 else [f"{host.short}: {proc.stderr.strip()}"]
        problems += [f"{host.short}: namespace {n}" for n in self.inventory(host).namespaces]
        problems += [f"{host.short}: run file {p}" for p in _files(host.runtime_dir)]
        return problems


def _resident(netns: str) -> int | None:
    """A process in the machine's network namespace ``netns`` that lives in a host's mount
    namespace (it sees another ``/run/netns`` than this process): a holder; None if none."""
    if not nsops.exists(netns):
        return None
    return next((pid for pid in nsops.pids(netns) if not procs.on_this_host(pid)), None)


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[None]:
    """A netlink refusal in the block as :class:`DataplaneError` naming ``what``."""
    try:
        yield
    except NetlinkError as exc:
        raise DataplaneError(f"cannot make {what}: {exc}") from exc


def _files(directory: Path) -> list[Path]:
    """The files under ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if not p.is_dir())


def _stop(procs: Sequence[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM each process still running, SIGKILL those still there after ``grace`` s;
    every one is reaped. By PID: only processes the bed started."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
