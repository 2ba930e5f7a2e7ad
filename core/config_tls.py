"""TLS settings: ``[server.tls]`` (termination on the native listener) and the
``ca_file`` / ``verify`` of ``[upstreams.NAME]`` (https targets), with the
SSL contexts they make.

The contexts are built here, in the base layer (stdlib ``ssl`` only), so
that one function both checks a config (at start, ``triogate check-config``
and every reload: a missing file, a key that does not match its
certificate, a CA file that is not PEM are field errors naming the file)
and makes what the data plane uses. Loading a certificate is the only
honest check that it loads.

Defaults are the stdlib's modern ones (``ssl.create_default_context``):
TLS 1.2 at least, the OpenSSL "secure" cipher list (no RC4, 3DES, export or
anonymous suites), compression off; TLS renegotiation is switched off on
the listener (a client-driven CPU sink, and TLS 1.3 has none); ALPN offers
only ``http/1.1`` (the native listener speaks nothing else).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Annotated, Literal

from cryptography import x509
from msgspec import Meta, Struct

from triogate.errors import ConfigError, FieldError

if TYPE_CHECKING:
    from triogate.config import Config

__all__ = [
    "ServerTLSConfig",
    "client_context",
    "server_context",
    "tls_checks",
]

ALPN: tuple[str, ...] = ("http/1.1",)


class ServerTLSConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[server.tls]``: the native listener speaks HTTPS only when present."""

    cert_file: Annotated[str, Meta(min_length=1, description="PEM certificate chain (leaf first)")]
    key_file: Annotated[str, Meta(min_length=1, description="PEM private key of the certificate")]
    client_ca_file: Annotated[
        str | None,
        Meta(description="PEM CA certificates that sign client certificates (mTLS)"),
    ] = None
    client_cert: Annotated[
        Literal["none", "optional", "required"],
        Meta(
            description="ask clients for a certificate: none, optional (verified if sent) "
            "or required (the handshake fails without one)"
        ),
    ] = "none"
    handshake_timeout_seconds: Annotated[
        float,
        Meta(ge=0.001, le=3600, description="a TLS handshake must finish within this"),
    ] = 10.0


def _refuse(path: str, message: str) -> ConfigError:
    """A certificate, key or CA file that cannot be used: ``path`` is the
    config field, the message names the file."""
    return ConfigError([FieldError(path, message)], path)


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class _Encrypted(Exception):
    """The key file asked for a passphrase."""


def _no_passphrase() -> bytes:
    # Without a password callback OpenSSL prompts on the terminal for an
    # encrypted key's passphrase: `triogate serve` (and every reload, the
    # event loop with it) would hang on "Enter PEM pass phrase:".
    raise _Encrypted()


def _check_certificate(path: str, field: str) -> None:
    """The certificate file alone, read first: a broken certificate and a
    key that does not belong to it are different mistakes to report."""
    try:
        with open(path, "rb") as file:
            pem = file.read(1 << 20)
        if not x509.load_pem_x509_certificates(pem):
            raise ValueError("no certificate in it")
    except (OSError, ValueError) as exc:
        reason = _reason(exc) if isinstance(exc, OSError) else "not a PEM certificate"
        raise _refuse(field, f"cannot use certificate file {path!r}: {reason}") from None


def server_context(tls: ServerTLSConfig, field: str = "server.tls") -> ssl.SSLContext:
    """The listener's context, files read now. Raises ConfigError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(list(ALPN))
    _check_certificate(tls.cert_file, f"{field}.cert_file")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except _Encrypted:
        raise _refuse(
            f"{field}.key_file",
            f"cannot use key file {tls.key_file!r}: it is encrypted (needs a passphrase); "
            "give an unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)",
        ) from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = _reason(exc)
        if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
            reason = f"the key does not match the certificate {tls.cert_file!r}"
        raise _refuse(
            f"{field}.key_file", f"cannot use key file {tls.key_file!r}: {reason}"
        ) from None
    if tls.client_cert != "none":
        if tls.client_ca_file is None:
            raise _refuse(
                f"{field}.client_ca_file",
                f"client_cert = {tls.client_cert!r} needs client_ca_file "
                "(the CAs that sign client certificates)",
            )
        _load_cas(context, tls.client_ca_file, f"{field}.client_ca_file")
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(ca_file: str | None, verify: bool, field: str) -> ssl.SSLContext:
    """An upstream's context: the system's CAs (or ``ca_file``'s), hostname
    checked; ``verify=False`` checks nothing (testing only)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(ALPN))
    if ca_file is not None:
        _load_cas(context, ca_file, f"{field}.ca_file")
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _load_cas(context: ssl.SSLContext, path: str, field: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise _refuse(field, f"cannot use CA file {path!r}: {_reason(exc)}") from None


def tls_checks(config: Config) -> list[FieldError]:
    """Every TLS file of ``config`` loads (cross-checks of ``parse_config``)."""
    errors: list[FieldError] = []
    tls = config.server.tls
    if tls is not None:
        if config.server.proxy_server != "native":
            errors.append(
                FieldError(
                    "server.tls",
                    "TLS termination is the native listener's (proxy_server = 'native'); "
                    "with hypercorn, give hypercorn its own certificate",
                )
            )
        try:
            server_context(tls)
        except ConfigError as exc:
            errors.extend(exc.errors)
    for name, upstream in config.upstreams.items():
        field = f"upstreams.{name}"
        https = any(t.startswith("https://") for t in upstream.targets)
        if not https:
            if upstream.ca_file is not None or not upstream.verify:
                errors.append(
                    FieldError(field, "ca_file and verify apply to https:// targets; this has none")
                )
            continue
        try:
            client_context(upstream.ca_file, upstream.verify, field)
        except ConfigError as exc:
            errors.extend(exc.errors)
    return errors
