"""TLS for the picker's ext_proc server, as the upstream endpoint picker serves it.

- `--secure-serving` (upstream default: on): with no `--cert-path`, a self-signed certificate is
  generated at start (an ECDSA P-256 key, valid one year, for `localhost`, the pod's hostname and the
  listen address); Gateway API implementations connect to the picker with TLS but do not verify it.
- `--cert-path DIR`: `DIR/tls.crt` and `DIR/tls.key` (the layout of a Kubernetes TLS secret mounted
  as a volume). With `--enable-cert-reload` the files are re-read when they change (checked every
  few seconds; a rotated secret shows up as new files), and new connections get the new certificate;
  open ones keep theirs. A pair that fails to load is logged and the previous one stays in use.

ALPN offers `h2` (gRPC). `--tls-min-version` (default `VersionTLS12`) and `--tls-cipher-suites` (Go
names, TLS <= 1.2 only) restrict the handshake (`ingate.tls_options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ingate import tls_options

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
RELOAD_INTERVAL_S = 5.0


def self_signed(hosts: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed certificate and its private key (PEM) for `hosts` (names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ingate"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "ingate"),
        ]
    )
    sans: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


class ServerTLS:
    """An `ssl.SSLContext` for a gRPC server, from a cert directory or self-signed, with reload."""

    def __init__(
        self,
        cert_path: str | None = None,
        *,
        reload: bool = False,
        hosts: list[str] | None = None,
        min_version: str = tls_options.DEFAULT_MIN_VERSION,
        cipher_suites: Sequence[str] = (),
        alpn: Sequence[str] = ("h2",),
    ) -> None:
        self.cert_path = Path(cert_path) if cert_path else None
        self.reload = reload and self.cert_path is not None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_options.apply(self.context, min_version, cipher_suites)
        self.restricted = min_version != tls_options.DEFAULT_MIN_VERSION or bool(
            tls_options.openssl_ciphers(cipher_suites)
        )
        """A non-default minimum version or cipher list (only the h2 transport applies them)."""
        if alpn:
            self.context.set_alpn_protocols(list(alpn))
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stamp: tuple[float, float] | None = None
        self._task: asyncio.Task[None] | None = None
        self.loads = 0
        if self.cert_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ingate-tls-")
            cert, key = self_signed(hosts or ["localhost", socket.gethostname(), "127.0.0.1"])
            d = Path(self._tmp.name)
            (d / CERT_FILE).write_bytes(cert)
            (d / KEY_FILE).touch(mode=0o600)
            (d / KEY_FILE).write_bytes(key)
            self._dir = d
        else:
            self._dir = self.cert_path
        self._load()

    @property
    def cert_file(self) -> Path:
        return self._dir / CERT_FILE

    @property
    def key_file(self) -> Path:
        return self._dir / KEY_FILE

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)

    def _load(self) -> None:
        stamp = self._mtimes()
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp
        self.loads += 1

    def check_reload(self) -> bool:
        """Reload the pair if either file changed; True when a new pair was loaded."""
        try:
            stamp = self._mtimes()
        except OSError as e:
            log.error("tls: cannot stat %s: %s (keeping the current certificate)", self._dir, e)
            return False
        if stamp == self._stamp:
            return False
        try:
            self._load()
        except (OSError, ssl.SSLError) as e:
            log.error("tls: reloading %s failed: %s (keeping the current certificate)", self._dir, e)
            self._stamp = stamp  # do not retry the same broken pair every interval
            return False
        log.info("tls: reloaded the certificate from %s", self._dir)
        return True

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check_reload()

    def start(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Start watching the files (with `reload`)."""
        if self.reload and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(interval_s), name="tls-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def metrics_tls(cert_dir: str, client_ca_file: str | None = None) -> ServerTLS:
    """The metrics port's TLS (`--metrics-cert-dir` DIR with tls.crt/tls.key, TLS 1.2 or later, as
    upstream; the pair is re-read when it changes, as upstream's certificate watcher does); with
    `--metrics-client-ca-file` a client must present a certificate that CA signed (read at start).
    ValueError naming the file that cannot be used."""
    d = Path(cert_dir)
    try:
        tls = ServerTLS(cert_dir, reload=True, alpn=())
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"metrics TLS: cannot load {d / CERT_FILE} / {d / KEY_FILE}: {e}") from None
    if client_ca_file:
        try:
            tls.context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"metrics TLS: no usable CA certificate in {client_ca_file}: {e}") from None
        tls.context.verify_mode = ssl.CERT_REQUIRED
    return tls
