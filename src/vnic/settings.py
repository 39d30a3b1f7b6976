"""Settings, read from the environment by a factory (never at import time).

=====================  ===============================================  =========================
variable               meaning                                          default
=====================  ===============================================  =========================
``VNIC_DATABASE_URL``  SQLAlchemy URL of the central database           ``sqlite:///<home>/vnic.db``
``VNIC_HOME``          directory for vnic's own files                   ``/var/lib/vnic`` as root,
                                                                        else ``~/.local/share/vnic``
``VNIC_RUNTIME_DIR``   directory of the data plane's run files (VM      ``/run/vnic``
                       inits' and QEMU guests' run directories, delay
                       engines' pid and counter files)
=====================  ===============================================  =========================

The run files are the host's: two agents on one machine that emulate two
hosts (:mod:`vnic.lab.hostbed`) each get their own ``VNIC_HOME`` and
``VNIC_RUNTIME_DIR``, so the same session and VM names on both never share a pid
file. (``VNIC_NETNS_RUN_DIR``, ``VNIC_QEMU_RUN_DIR`` and ``VNIC_RUN_DIR``, older and
narrower, still name one of its three subdirectories each when set.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    runtime_dir: Path = Path("/run/vnic")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        if env.get("VNIC_HOME"):
            home = Path(env["VNIC_HOME"])
        elif os.geteuid() == 0:
            home = Path("/var/lib/vnic")
        else:
            base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            home = Path(base) / "vnic"
        url = env.get("VNIC_DATABASE_URL") or f"sqlite:///{home / 'vnic.db'}"
        runtime = Path(env.get("VNIC_RUNTIME_DIR") or "/run/vnic")
        return cls(home=home, database_url=url, runtime_dir=runtime)


def runtime_subdir(name: str, override: str) -> Path:
    """The run directory ``name`` under ``VNIC_RUNTIME_DIR`` (``/run/vnic/<name>``), or the
    older variable ``override`` alone when it is set."""
    return Path(os.environ.get(override) or Settings.from_env().runtime_dir / name)
