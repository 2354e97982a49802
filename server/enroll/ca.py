"""The consortium CA and the coordinator's TLS certificate, under ``<workdir>/pki``.

Callers hold the PKI lock (:class:`server.enroll.Consortium` does); keys are
ECDSA P-384, written 0600 as PKCS#8 PEM, never through a readable state.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError
from common.files import write_atomic
from common.kit import KEY_CURVE, check_private_mode, load_certificate

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__package__)  # "server.enroll", as the log has always said

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
CA_NAME = "fedrad consortium CA"
SERVER_NAME = "fedrad coordinator"
CA_DAYS = 3650
SERVER_DAYS = 730
RENEW_BEFORE_DAYS = 30  # a server certificate closer than this to expiry is re-issued
LOOPBACK_SANS = (("ip", "127.0.0.1"), ("dns", "localhost"))

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-384 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    """``cert`` in PEM format."""
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-384 private key from a PEM file that only its owner can read, or a one-line error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_private_mode(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"Cannot read the private key {path} ({exc}); restore it from backup") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != KEY_CURVE:
        raise ConfigError(f"Expected an ECDSA P-384 key in {path}, but got a {type(key).__name__}")
    return key


def san_entries(hosts: list[str]) -> set[tuple[str, str]]:
    """The SAN set for ``hosts`` plus the loopback names, as ``{("ip", "127.0.0.1"), ("dns", …)}``.

    Raises
    ------
    ConfigError
        A host is neither an IP address nor a valid DNS name.
    """
    sans = set(LOOPBACK_SANS)
    for raw in hosts:
        host = str(raw).strip().strip("[]")
        if not host:
            continue
        try:
            sans.add(("ip", str(ipaddress.ip_address(host))))
            continue
        except ValueError:
            pass
        if len(host) > 253 or not _DNS_RE.match(host):
            raise ConfigError(
                f"Expected a host name or IP address for the server certificate, but got {raw!r}"
            )
        sans.add(("dns", host.lower()))
    return sans


def _cert_sans(cert: x509.Certificate) -> set[tuple[str, str]]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    sans = {("ip", str(ip)) for ip in ext.get_values_for_type(x509.IPAddress)}
    sans |= {("dns", name.lower()) for name in ext.get_values_for_type(x509.DNSName)}
    return sans


def _sign(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, *, days: int, ca: bool,
    extensions: list[x509.ExtensionType], signer: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A certificate valid from 5 minutes ago for ``days``: CA or end entity by ``ca`` (basic
    constraints and key usage, critical), then ``extensions`` (non-critical)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                          encipher_only=False, decipher_only=False)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA384())


class CertificateAuthority:
    """The consortium CA and the coordinator's TLS certificate in one folder.

    Parameters
    ----------
    pki_dir : Path
        ``<workdir>/pki``: ``ca.key``, ``ca.crt``, ``server.key``, ``server.crt``.
    """

    def __init__(self, pki_dir: Path) -> None:
        self.key_path = pki_dir / CA_KEY
        self.cert_path = pki_dir / CA_CERT
        self.server_key_path = pki_dir / SERVER_KEY
        self.server_cert_path = pki_dir / SERVER_CERT

    def load_or_create(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The CA ``(key, certificate)``, created when absent; call with the PKI lock held.

        Raises
        ------
        ConfigError
            The certificate exists without its key, does not match it, or either is unreadable.
        """
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if self.cert_path.exists() and not self.key_path.exists():
            raise ConfigError(
                f"The CA certificate {self.cert_path} has no key {self.key_path}; restore the key from "
                "backup (a new CA would invalidate every kit)"
            )
        if self.key_path.exists():
            key = _load_pem_key(self.key_path)
        else:
            key = new_key()
            write_atomic(self.key_path, _key_pem(key), mode=0o600)
            logger.info("Created the consortium CA key %s", self.key_path)
        if self.cert_path.exists():
            cert = load_certificate(self.cert_path)
            if cert.public_key() != key.public_key():
                raise ConfigError(
                    f"The CA certificate {self.cert_path} does not belong to {self.key_path}; "
                    "restore both from backup"
                )
            return key, cert
        # A key without a certificate (a crash between the two writes): certify the key.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        cert = _sign(name, name, key.public_key(), days=CA_DAYS, ca=True, signer=key,
                     extensions=[x509.SubjectKeyIdentifier.from_public_key(key.public_key())])
        write_atomic(self.cert_path, cert_pem(cert), mode=0o644)
        logger.info("Created the consortium CA certificate %s", self.cert_path)
        return key, cert

    def ensure_server_cert(self, sans: set[tuple[str, str]]) -> None:
        """Issue the server certificate unless the one there has exactly ``sans``; call with the lock held."""
        ca_key, ca_cert = self.load_or_create()
        reason = self._server_cert_problem(ca_cert, sans)
        if reason is not None:
            self._issue_server_cert(ca_key, ca_cert, sans)
            logger.info("Issued the coordinator's TLS certificate %s (%s)", self.server_cert_path, reason)

    def _server_cert_problem(self, ca_cert: x509.Certificate, wanted: set[tuple[str, str]]) -> str | None:
        """Why the existing server certificate cannot be reused, or None when it can."""
        from cryptography.exceptions import InvalidSignature

        if not self.server_cert_path.exists() or not self.server_key_path.exists():
            return "none yet"
        try:
            cert = load_certificate(self.server_cert_path)
            key = _load_pem_key(self.server_key_path)
        except ConfigError as exc:
            return str(exc)
        if _cert_sans(cert) != wanted:
            return "host names changed"
        if cert.public_key() != key.public_key():
            return "key does not match"
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return "not issued by the current CA"
        if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=RENEW_BEFORE_DAYS):
            return "expires soon"
        return None

    def _issue_server_cert(
        self, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: set[tuple[str, str]]
    ) -> None:
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = new_key()
        public = key.public_key()
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(value)) for kind, value in sorted(sans) if kind == "ip"
        ]
        names += [x509.DNSName(value) for kind, value in sorted(sans) if kind == "dns"]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
        cert = _sign(subject, ca_cert.subject, public, days=SERVER_DAYS, ca=False, signer=ca_key, extensions=[
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            x509.SubjectAlternativeName(names),
            x509.SubjectKeyIdentifier.from_public_key(public),
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
        ])
        # Key first: a crash before the certificate leaves a mismatch the next call re-issues.
        write_atomic(self.server_key_path, _key_pem(key), mode=0o600)
        write_atomic(self.server_cert_path, cert_pem(cert), mode=0o644)
