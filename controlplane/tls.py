"""Mutual TLS for the xDS port: the server's credentials, and certificates to start with.

The xDS port hands every Envoy the whole fleet's routes and endpoints and takes in their
stats, which steer the health analysis; beyond loopback only an Envoy whose certificate the
configured CA signed may connect. `make_certs` (`switchyard certs`) writes a private CA, a
server certificate and an Envoy client certificate with `openssl`, for a first deployment and
for the tests; production fleets bring their own (cert-manager, a corporate CA).
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

from controlplane.config import XdsTls
from controlplane.errors import ConfigError

CERT_DAYS = 825  # what browsers and most CAs accept for a leaf certificate at most


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (an address or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_pem(path: str, key: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming the config key when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{key}: {path} is not a PEM file")
    return data


def server_context(tls: XdsTls) -> ssl.SSLContext:
    """Serve `cert`, and refuse any client without a certificate signed by `ca`: TLS 1.2 or
    newer, HTTP/2 by ALPN (gRPC's way). ConfigError naming the key that is wrong."""
    for key in ("cert", "key", "ca"):
        read_pem(getattr(tls, key), f"xds.tls.{key}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise ConfigError(f"xds.tls.key: does not match xds.tls.cert or is not a key: "
                          f"{exc.reason}") from None  # fmt: skip
    try:
        context.load_verify_locations(cafile=tls.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"xds.tls.ca: not a CA certificate: {exc.reason}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def make_certs(directory: Path, hosts: list[str], envoy_name: str = "envoy") -> dict[str, Path]:
    """A CA, a server certificate for `hosts` (DNS names or IP addresses) and a client
    certificate for Envoys, all signed by the CA: {"ca", "ca_key", "cert", "key",
    "envoy_cert", "envoy_key"} -> path. Keys are written readable by the owner only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("openssl is not installed: it makes the certificates")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": directory / "ca.crt", "ca_key": directory / "ca.key",
        "cert": directory / "server.crt", "key": directory / "server.key",
        "envoy_cert": directory / f"{envoy_name}.crt", "envoy_key": directory / f"{envoy_name}.key",
    }  # fmt: skip
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", paths["ca_key"], "-out", paths["ca"], "-days", str(CERT_DAYS),
        "-subj", "/CN=switchyard xDS CA")  # fmt: skip
    san = ",".join(_san(host) for host in hosts)
    _leaf(run, paths, "cert", "key", "switchyard",
          f"subjectAltName={san}\nextendedKeyUsage=serverAuth")  # fmt: skip
    _leaf(run, paths, "envoy_cert", "envoy_key", envoy_name,
          f"subjectAltName=DNS:{envoy_name}\nextendedKeyUsage=clientAuth")  # fmt: skip
    for name in ("ca_key", "key", "envoy_key"):
        paths[name].chmod(0o600)
    return paths


def _san(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"


def _leaf(run, paths: dict[str, Path], cert: str, key: str, name: str, extensions: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        request, ext = Path(scratch) / "req.csr", Path(scratch) / "ext.cnf"
        ext.write_text(extensions + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", paths[key], "-out", request, "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", request, "-CA", paths["ca"], "-CAkey", paths["ca_key"],
            "-set_serial", str(secrets.randbits(63)), "-out", paths[cert], "-days", str(CERT_DAYS),
            "-extfile", ext)  # fmt: skip
