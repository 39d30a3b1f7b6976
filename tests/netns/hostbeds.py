"""Emulated hypervisor hosts for the root and e2e tests (:class:`vnic.lab.hostbed.HostBed`).

``hostbed`` (a fixture the e2e tier's conftest imports) is a bed of 3 hosts and a
manager host with a tag of its own; afterwards the bed is destroyed and the test
fails if anything of it is left (namespaces, links, processes it started, what
vnic made inside a host).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnic.errors import DataplaneError
from vnic.lab.hostbed import HostBed

#: The embedded `vnic` command, as a host's processes run it (this interpreter, this tree).
VNIC = [sys.executable, "-m", "vnic.cli.app"]


@contextlib.contextmanager
def new_bed(count: int = 3, root: Path | None = None) -> Iterator[HostBed]:
    """A created bed of ``count`` hosts with a unique tag; destroyed after the block, which
    fails if anything of it is left."""
    bed = HostBed(uuid.uuid4().hex[:8], count, root=root).create()
    try:
        yield bed
    finally:
        with contextlib.suppress(DataplaneError):  # what it names, leftovers() lists
            bed.destroy()
        left = bed.leftovers()
        assert left == [], f"host bed {bed.tag} left: {left}"


@pytest.fixture
def hostbed(tmp_path: Path) -> Iterator[HostBed]:
    """3 emulated hosts and a manager host (their directories under the test's tmp_path)."""
    with new_bed(3, tmp_path / "hosts") as bed:
        yield bed
