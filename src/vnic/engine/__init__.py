"""vnic's C programs, built from their sources here on first use.

``delayd.c`` is the delay engine (see :mod:`vnic.dataplane.delayd`);
``udpblast.c`` is a paced UDP sender for measuring packet rates that
iperf3, one datagram per system call, cannot reach on a small machine.

Each program is compiled with the system C compiler (Debian's gcc and
libc6-dev, installed by ``scripts/install.sh``) and cached under
``<VNIC_HOME>/bin`` by a hash of its source and flags, so a changed source
is rebuilt and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from vnic.errors import DataplaneError
from vnic.settings import Settings

CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
LIBS = ("-lm", "-lpthread")
PROGRAMS = ("delayd", "udpblast")


def source(program: str) -> bytes:
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; known: {', '.join(PROGRAMS)}")
    return resources.files(__name__).joinpath(f"{program}.c").read_bytes()


def build(program: str, settings: Settings | None = None) -> Path:
    """The executable of ``program``, compiled now if this source has not been built yet."""
    settings = settings or Settings.from_env()
    code = source(program)
    digest = hashlib.sha256(code + " ".join(CFLAGS + LIBS).encode()).hexdigest()[:16]
    target = settings.home / "bin" / f"vnic-{program}-{digest}"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise DataplaneError(f"vnic-{program} needs a C compiler (cc or gcc); none is installed")
    target.parent.mkdir(parents=True, exist_ok=True)
    src = target.with_suffix(".c")
    src.write_bytes(code)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    proc = subprocess.run(
        [compiler, *CFLAGS, "-o", str(tmp), str(src), *LIBS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot build vnic-{program}: {proc.stderr.strip()}")
    os.replace(tmp, target)  # atomic: a concurrent build sees a whole file or none
    return target
