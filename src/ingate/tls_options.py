"""The upstream picker's TLS knobs in Go's spelling (`--tls-min-version`, `--tls-cipher-suites`), mapped
onto Python's `ssl` module.

- Versions: Go's constant names `VersionTLS10` ... `VersionTLS13` (what upstream accepts).
- Cipher suites: Go's `crypto/tls` names (e.g. `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`), translated to
  OpenSSL's names. As in Go they only restrict TLS 1.2 and below: the three TLS 1.3 suites are accepted
  and have no effect (TLS 1.3 suites are not configurable in Go either). A name Go does not know is an
  error naming it; RC4 suites, which Go still lists as insecure but OpenSSL no longer ships, too.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "VersionTLS10": ssl.TLSVersion.TLSv1,
    "VersionTLS11": ssl.TLSVersion.TLSv1_1,
    "VersionTLS12": ssl.TLSVersion.TLSv1_2,
    "VersionTLS13": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_MIN_VERSION = "VersionTLS12"

GO_CIPHERS: dict[str, str] = {
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    # Go's older aliases of the two ChaCha20 suites
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
GO_TLS13_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)
GO_RC4_SUITES = frozenset(
    {"TLS_RSA_WITH_RC4_128_SHA", "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", "TLS_ECDHE_RSA_WITH_RC4_128_SHA"}
)


def min_version(name: str) -> ssl.TLSVersion:
    """`VersionTLS12` -> `ssl.TLSVersion.TLSv1_2`; ValueError naming the supported values otherwise."""
    v = TLS_VERSIONS.get(name.strip())
    if v is None:
        raise ValueError(f"unknown TLS version {name!r} (supported: {', '.join(TLS_VERSIONS)})")
    return v


def openssl_ciphers(names: Sequence[str]) -> str:
    """Go cipher-suite names -> an OpenSSL cipher string for TLS <= 1.2 ("" when only TLS 1.3 suites,
    or none, are named: the library's defaults stay). ValueError naming the first unknown suite."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name or name in GO_TLS13_SUITES:
            continue
        if name in GO_RC4_SUITES:
            raise ValueError(f"cipher suite {name!r} (RC4) is not available in this build's OpenSSL")
        mapped = GO_CIPHERS.get(name)
        if mapped is None:
            raise ValueError(
                f"unknown cipher suite {name!r} (Go crypto/tls names, e.g. {next(iter(GO_CIPHERS))})"
            )
        if mapped not in out:
            out.append(mapped)
    return ":".join(out)


def apply(ctx: ssl.SSLContext, min_version_name: str, cipher_suites: Sequence[str]) -> None:
    """Set the minimum version and the TLS <= 1.2 suites on a server context (ValueError when this
    OpenSSL cannot provide them)."""
    ctx.minimum_version = min_version(min_version_name)
    ciphers = openssl_ciphers(cipher_suites)
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"none of the cipher suites {list(cipher_suites)} is available") from None
