"""A throwaway CA, a server and a client certificate for TLS tests (openssl CLI)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertSet", "make_certs"]


@dataclass(frozen=True)
class CertSet:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server_name: str


def _openssl(*args: str) -> None:
    res = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {res.stderr.strip()}")


def make_certs(directory: Path, server_name: str = "hubble.axoneme.test") -> CertSet:
    """EC P-256 keys, one day: a CA, a server certificate for ``server_name`` (and
    127.0.0.1), a client certificate; all signed by the CA."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "1", "-subj", "/CN=axoneme test CA")
    for who, ext in (("server", f"subjectAltName=DNS:{server_name},IP:127.0.0.1\n"
                                "extendedKeyUsage=serverAuth\n"),
                     ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{who}.ext").write_text(ext)
        _openssl("req", "-new", *ec, "-keyout", str(d / f"{who}.key"), "-out",
                 str(d / f"{who}.csr"), "-subj", f"/CN={server_name if who == 'server' else who}")
        _openssl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                 "-extfile", str(d / f"{who}.ext"), "-out", str(d / f"{who}.pem"))
    return CertSet(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                     d / "client.key", server_name)
