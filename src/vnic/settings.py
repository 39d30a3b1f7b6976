"""Settings, read from the environment by a factory (never at import time).

=====================  ===============================================  =========================
variable               meaning                                          default
=====================  ===============================================  =========================
``VNIC_DATABASE_URL``  SQLAlchemy URL of the central database           ``sqlite:///<home>/vnic.db``
``VNIC_HOME``          directory for vnic's own files                   ``/var/lib/vnic`` as root,
                                                                        else ``~/.local/share/vnic``
=====================  ===============================================  =========================
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
        return cls(home=home, database_url=url)
