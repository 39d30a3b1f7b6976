"""The test CA: a certificate it signed is trusted for its names and nothing else."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from vnic.errors import InvalidInput
from vnic.lab.testca import make_test_ca, san_entry


def handshake(ca: Path, cert: Path, key: Path, server_hostname: str) -> str | None:
    """A TLS handshake over a socket pair: None when the client trusts the server, else why not."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client refused us: its side says why

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname):
            return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message)
    finally:
        thread.join(10)
        a.close()
        b.close()


def test_certificate_is_trusted_for_its_names_only(tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(tmp_path / "tls", ["10.250.0.1", "manager.test"])
    assert [p.name for p in (ca, cert, key)] == ["ca.pem", "cert.pem", "key.pem"]
    assert handshake(ca, cert, key, "10.250.0.1") is None
    assert handshake(ca, cert, key, "manager.test") is None
    assert "mismatch" in (handshake(ca, cert, key, "10.250.0.11") or "")


def test_another_ca_is_not_trusted(tmp_path: Path) -> None:
    _, cert, key = make_test_ca(tmp_path / "one", ["10.250.0.1"])
    other_ca, _, _ = make_test_ca(tmp_path / "two", ["10.250.0.1"])
    assert "unable to get local issuer" in (handshake(other_ca, cert, key, "10.250.0.1") or "")


def test_san_entries() -> None:
    assert san_entry("10.250.0.1") == "IP:10.250.0.1"
    assert san_entry("fd00:250::1") == "IP:fd00:250::1"
    assert san_entry("localhost") == "DNS:localhost"


@pytest.mark.parametrize(
    ("names", "path"), [([], "names"), (["ok", "a,b"], "names[1]"), (["x y"], "names[0]")]
)
def test_bad_names_are_refused_and_nothing_is_written(
    tmp_path: Path, names: list[str], path: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        make_test_ca(tmp_path / "tls", names)
    assert err.value.paths == [path]
    assert not (tmp_path / "tls").exists()
