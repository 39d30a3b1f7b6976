"""``python -m vnic.lab.hostbed_main up N [TAG] | down TAG`` (``scripts/hosts.sh``): an
emulated-host bed (:mod:`vnic.lab.hostbed`) that outlives the command, for trying
things by hand. Needs root.

``up`` makes a bed of ``N`` hosts (tag ``TAG``, default a random one) with its host
directories under ``/tmp/vnic-hosts-<tag>``, prints each host's address and how to
enter it, and returns: the hosts run on (their holders are not this process's
children to stop). ``down`` destroys the bed of ``TAG`` as one a killed run left
(:meth:`~vnic.lab.hostbed.HostBed.destroy`: each host entered through its holder,
vnic's teardown inside, then the hosts and the underlay) and then its directories;
its host count is read from the machine's namespaces. Exit status 2 with a message on bad input.
"""

from __future__ import annotations

import re
import shutil
import sys
import uuid
from pathlib import Path

from vnic.dataplane import namespaces as nsops
from vnic.errors import VnicError
from vnic.lab.hostbed import HostBed
from vnic.lab.hostbed_plan import TAG

USAGE = "usage: hosts.sh up N [TAG] | down TAG"


def root_of(tag: str) -> Path:
    """Where ``up`` puts a bed's host directories."""
    return Path(f"/tmp/vnic-hosts-{tag}")


def up(count: int, tag: str) -> None:
    bed = HostBed(tag, count, root=root_of(tag)).create()
    print(f"host bed {tag}: {count} hosts, directories under {bed.root}")
    for host in bed.every_host:
        print(
            f"  {host.short}: {host.address4} {host.address6}"
            f"  enter: nsenter --target {host.entry()} --net --mount"
            f"  (VNIC_HOME={host.home} VNIC_RUNTIME_DIR={host.runtime_dir})"
        )
    print(f"remove it with: scripts/hosts.sh down {tag}")


def down(tag: str) -> None:
    hosts = [m.group(1) for n in nsops.listing() if (m := re.fullmatch(rf"vnic-h(\d+)-{tag}", n))]
    if hosts:
        HostBed(tag, max(int(h) for h in hosts), root=root_of(tag)).destroy()
    # Only once nothing is left: the directories are what up made for this tag.
    shutil.rmtree(root_of(tag), ignore_errors=True)
    print(f"host bed {tag}: {'destroyed' if hosts else 'none on this machine'}")


def main(argv: list[str]) -> int:
    try:
        if len(argv) in (2, 3) and argv[0] == "up":
            if not argv[1].isdigit():
                raise ValueError(f"N: got {argv[1]!r}; expected a number of hosts")
            tag = argv[2] if len(argv) == 3 else uuid.uuid4().hex[:8]
            up(int(argv[1]), tag)
        elif len(argv) == 2 and argv[0] == "down":
            if not TAG.fullmatch(argv[1]):
                raise ValueError(
                    f"TAG: got {argv[1]!r}; expected 1 to 8 lower-case letters and digits"
                )
            down(argv[1])
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except (VnicError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
