"""The explicit driver registry: kind -> factory."""

from __future__ import annotations

from collections.abc import Callable

from vnic.drivers.base import Driver
from vnic.errors import InvalidInput


def _netns() -> Driver:
    from vnic.drivers.netns import NetnsDriver

    return NetnsDriver()


def _qemu() -> Driver:
    from vnic.drivers.qemu import QemuDriver

    return QemuDriver()


def _fake() -> Driver:
    from vnic.drivers.fake import FakeDriver

    return FakeDriver()


FACTORIES: dict[str, Callable[[], Driver]] = {"netns": _netns, "qemu": _qemu, "fake": _fake}
DEFAULT = "netns"
#: The drivers of real VMs on this host: an agent loads them all, since one session
#: may hold VMs of each (they share the session's bridge).
HOST_DRIVERS = ("netns", "qemu")


def get_driver(kind: str = DEFAULT) -> Driver:
    """The driver of ``kind``; an unknown kind names the valid ones."""
    try:
        return FACTORIES[kind]()
    except KeyError:
        raise InvalidInput.one("driver", kind, "one of " + ", ".join(sorted(FACTORIES))) from None
