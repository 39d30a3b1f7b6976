"""A certificate authority made for one test, with the ``openssl`` command.

:func:`make_test_ca` writes into a directory of the test's own a CA (its key never
leaves that directory) and one certificate it signed for the names given: the
manager's address on a host bed (``10.250.0.1``), ``localhost``... Both server and
client use (``serverAuth``, ``clientAuth``), so the same pair serves a manager's
HTTPS and an agent's client certificate. Keys are ECDSA P-256; everything is valid
for :data:`DAYS` days. ``openssl`` is Debian's (``scripts/install.sh``).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from vnic.errors import InvalidInput

#: Days the CA and the certificate are valid (a test run is minutes).
DAYS = 2
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def san_entry(name: str) -> str:
    """The subjectAltName entry of ``name``: ``IP:`` for an address, ``DNS:`` else."""
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        return f"DNS:{name}"


def make_test_ca(directory: Path, names: Sequence[str]) -> tuple[Path, Path, Path]:
    """Make a CA and a certificate for ``names`` (IP addresses or DNS names, the first one
    also the subject's common name) in ``directory``; returns the paths of the CA's
    certificate, the certificate and its key (PEM): ``ca.pem``, ``cert.pem``, ``key.pem``.

    :class:`~vnic.errors.InvalidInput` when ``names`` is empty or a name is not a
    plain host name or address (nothing is written then)."""
    if not names:
        raise InvalidInput.one("names", list(names), "at least one IP address or DNS name")
    for i, name in enumerate(names):
        if not name or any(c in name for c in ",/\n =") or not name.isascii():
            raise InvalidInput.one(f"names[{i}]", name, "an IP address or a DNS name")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found; scripts/install.sh installs Debian's package")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "cert.pem", directory / "key.pem", directory / "cert.csr"
    ext = directory / "cert.ext"
    ext.write_text(
        f"subjectAltName = {', '.join(san_entry(n) for n in names)}\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    steps = [
        [
            "req", "-x509", *_KEY, "-keyout", str(ca_key), "-out", str(ca),
            "-days", str(DAYS), "-subj", "/CN=vnic test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
        ["req", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}"],
        [
            "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", str(DAYS), "-extfile", str(ext),
        ],
    ]  # fmt: skip
    for step in steps:
        proc = subprocess.run(
            [openssl, *step], capture_output=True, text=True, timeout=60, cwd=directory
        )
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {step[0]} failed: {proc.stderr.strip()}")
    csr.unlink()
    return ca, cert, key
