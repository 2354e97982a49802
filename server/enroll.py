"""The consortium's PKI and the sites' enrollment kits, kept by the coordinator.

Everything lives under the coordinator's work dir::

    <workdir>/pki/ca.key         consortium CA key, ECDSA P-384, PKCS#8 PEM, mode 0600
    <workdir>/pki/ca.crt         self-signed CA certificate (10 years)
    <workdir>/pki/server.key     the coordinator's TLS key, mode 0600
    <workdir>/pki/server.crt     its certificate, signed by the CA (2 years, serverAuth)
    <workdir>/pki/sites.json     registry: site → public_key, fingerprint, enrolled, kit
    <workdir>/kits/<site>/       the site's kit (see :mod:`common.kit`)
    <workdir>/kits/<site>.tar.gz the same kit as one file to hand over (mode 0600)

Every file is written whole to a temporary file in its folder and renamed into
place, so a crash leaves the old file or the new one, never half of one; private
keys are created 0600 and never pass through a readable state. Changes to the
registry are serialised by an ``flock`` on ``pki/.lock``. The registry is the source
of truth and is written last: a kit folder is swapped in whole (a failed swap puts the
old one back), then its archive, then the registry entry, so a crash in between leaves
at worst a kit whose key is not registered, which the next ``enroll``/``rekey`` replaces.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import site_name
from common.errors import ConfigError
from common.files import replace_dir, write_atomic
from common.kit import (
    CA_CERT_FILE,
    FORMAT,
    KEY_CURVE,
    KIT_FILE,
    KIT_FILES,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    cert_fingerprint,
    render_kit_toml,
    ssh_fingerprint,
)
from common.kit import server_address as _valid_address

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__name__)

PKI_DIR = "pki"
KITS_DIR = "kits"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
REGISTRY = "sites.json"
CA_NAME = "fedrad consortium CA"
SERVER_NAME = "fedrad coordinator"
CA_DAYS = 3650
SERVER_DAYS = 730
RENEW_BEFORE_DAYS = 30  # a server certificate closer than this to expiry is re-issued
LOOPBACK_SANS = (("ip", "127.0.0.1"), ("dns", "localhost"))

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


@dataclass(frozen=True)
class Rekeyed:
    """What :meth:`Consortium.rekey` returns.

    Attributes
    ----------
    kit : Path
        The site's new kit folder.
    old_public_key : str
        The OpenSSH public key line the site had before, for the caller to unregister.
    old_fingerprint : str
        Its fingerprint (``SHA256:…``).
    """

    kit: Path
    old_public_key: str
    old_fingerprint: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_atomic(path: Path, data: bytes | str, *, mode: int) -> None:
    write_atomic(path, data, mode=mode)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-384 private key from a PEM file that only its owner can read, or a one-line error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"The private key {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"Cannot read the private key {path} ({exc}); restore it from backup") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != KEY_CURVE:
        raise ConfigError(f"Expected an ECDSA P-384 key in {path}, but got a {type(key).__name__}")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot parse the certificate {path} ({exc}); restore it from backup") from exc


def _san_entries(hosts: list[str]) -> set[tuple[str, str]]:
    """The SAN set for ``hosts`` plus the loopback names, as ``{("ip", "127.0.0.1"), ("dns", …)}``."""
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


class Consortium:
    """The coordinator's PKI and site registry under ``<workdir>/pki`` and ``<workdir>/kits``.

    Parameters
    ----------
    workdir : Path
        The coordinator's work dir (created on first write).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.pki_dir = self.workdir / PKI_DIR
        self.kits_dir = self.workdir / KITS_DIR
        self.ca_key_path = self.pki_dir / CA_KEY
        self.ca_cert_path = self.pki_dir / CA_CERT
        self.server_key_path = self.pki_dir / SERVER_KEY
        self.server_cert_path = self.pki_dir / SERVER_CERT
        self.registry_path = self.pki_dir / REGISTRY

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes to the PKI between processes (one coordinator CLI at a time)."""
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.pki_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- the CA -------------------------------------------------------------------

    def ensure_ca(self) -> Path:
        """Create the consortium CA once; afterwards check and reuse it.

        Returns
        -------
        Path
            ``pki/ca.crt``.

        Raises
        ------
        ConfigError
            The CA certificate exists without its key, or either is unreadable.
        """
        with self._locked():
            self._ensure_ca()
        return self.ca_cert_path

    def _ensure_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The CA ``(key, cert)``, created when absent; call with the lock held."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        if self.ca_cert_path.exists() and not self.ca_key_path.exists():
            raise ConfigError(
                f"The CA certificate {self.ca_cert_path} has no key {self.ca_key_path}; restore the key from "
                "backup (a new CA would invalidate every kit)"
            )
        if self.ca_key_path.exists():
            key = _load_pem_key(self.ca_key_path)
        else:
            key = _new_key()
            _write_atomic(self.ca_key_path, _key_pem(key), mode=0o600)
            logger.info("Created the consortium CA key %s", self.ca_key_path)
        if self.ca_cert_path.exists():
            cert = _load_cert(self.ca_cert_path)
            if cert.public_key() != key.public_key():
                raise ConfigError(
                    f"The CA certificate {self.ca_cert_path} does not belong to {self.ca_key_path}; "
                    "restore both from backup"
                )
            return key, cert
        # A key without a certificate (a crash between the two writes): certify the key.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA384())
        )
        _write_atomic(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        logger.info("Created the consortium CA certificate %s", self.ca_cert_path)
        return key, cert

    # -- the coordinator's TLS certificate ----------------------------------------

    def ensure_server_cert(self, hosts: list[str]) -> tuple[Path, Path]:
        """Issue the coordinator's TLS certificate, or reuse the one that fits.

        The certificate names ``127.0.0.1`` and ``localhost`` plus every host in
        ``hosts`` (an IP address as an IP SAN, anything else as a DNS SAN). It is
        re-issued, with a new key, when the names differ from the existing
        certificate's, when it is not signed by the current CA, does not match its
        key, or expires within 30 days.

        Parameters
        ----------
        hosts : list[str]
            Extra names the sites reach the coordinator by.

        Returns
        -------
        tuple[Path, Path]
            ``(pki/server.crt, pki/server.key)``.
        """
        wanted = _san_entries(hosts)
        with self._locked():
            ca_key, ca_cert = self._ensure_ca()
            reason = self._server_cert_problem(ca_cert, wanted)
            if reason is not None:
                self._issue_server_cert(ca_key, ca_cert, wanted)
                logger.info("Issued the coordinator's TLS certificate %s (%s)", self.server_cert_path, reason)
        return self.server_cert_path, self.server_key_path

    def _server_cert_problem(self, ca_cert: x509.Certificate, wanted: set[tuple[str, str]]) -> str | None:
        """Why the existing server certificate cannot be reused, or None when it can."""
        from cryptography.exceptions import InvalidSignature

        if not self.server_cert_path.exists() or not self.server_key_path.exists():
            return "none yet"
        try:
            cert = _load_cert(self.server_cert_path)
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
        if cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS):
            return "expires soon"
        return None

    def _issue_server_cert(
        self, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: set[tuple[str, str]]
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = _new_key()
        public = key.public_key()
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(value)) for kind, value in sorted(sans) if kind == "ip"
        ]
        names += [x509.DNSName(value) for kind, value in sorted(sans) if kind == "dns"]
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
            .issuer_name(ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=True, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA384())
        )
        # Key first: a crash before the certificate leaves a mismatch the next call re-issues.
        _write_atomic(self.server_key_path, _key_pem(key), mode=0o600)
        _write_atomic(self.server_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)

    # -- the site registry --------------------------------------------------------

    def sites(self) -> dict[str, dict[str, str]]:
        """The enrolled sites.

        Returns
        -------
        dict[str, dict[str, str]]
            Site name → ``{"public_key", "fingerprint", "enrolled", "kit"}``; empty before
            the first enrollment.
        """
        if not self.registry_path.exists():
            return {}
        try:
            data: Any = json.loads(self.registry_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"Cannot read the site registry {self.registry_path} ({exc}); restore it from backup"
            ) from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ConfigError(
                f"The site registry {self.registry_path} is not a mapping of sites; restore it from backup"
            )
        return {str(site): {str(k): str(v) for k, v in entry.items()} for site, entry in data.items()}

    def _save_sites(self, sites: dict[str, dict[str, str]]) -> None:
        text = json.dumps(dict(sorted(sites.items())), indent=2, sort_keys=True) + "\n"
        _write_atomic(self.registry_path, text, mode=0o644)

    def kit_dir(self, site: str) -> Path:
        """The folder of ``site``'s kit, ``<workdir>/kits/<site>``."""
        return self.kits_dir / site_name(site)

    def kit_archive(self, site: str) -> Path:
        """The archive of ``site``'s kit, ``<workdir>/kits/<site>.tar.gz``."""
        return self.kits_dir / f"{site_name(site)}.tar.gz"

    # -- enrollment ---------------------------------------------------------------

    def enroll(self, site: str, *, server_address: str) -> Path:
        """Enroll a new site: a fresh key pair, its kit and archive, a registry entry.

        Parameters
        ----------
        site : str
            The site's name (letters, digits, ``_``, ``-``).
        server_address : str
            The coordinator's address as the site reaches it, ``HOST:PORT``.

        Returns
        -------
        Path
            The kit folder ``<workdir>/kits/<site>`` (the archive lies beside it).

        Raises
        ------
        ConfigError
            A bad name or address, or the site is already enrolled.
        """
        site = site_name(site)
        address = _check_address(server_address)
        with self._locked():
            sites = self.sites()
            if site in sites:
                raise ConfigError(
                    f"Site {site!r} is already enrolled (key {sites[site].get('fingerprint', '?')}); "
                    f"to give it a new key use `fl-server rekey --site {site}`"
                )
            kit, entry = self._write_kit(site, address)
            sites[site] = entry
            self._save_sites(sites)
        logger.info("Enrolled site %s (key %s); kit %s", site, entry["fingerprint"], kit)
        return kit

    def rekey(self, site: str, *, server_address: str) -> Rekeyed:
        """Give an enrolled site a new key pair and a new kit, replacing the old ones.

        Parameters
        ----------
        site : str
            An enrolled site.
        server_address : str
            The coordinator's address as the site reaches it, ``HOST:PORT``.

        Returns
        -------
        Rekeyed
            The new kit folder and the old public key (for the caller to unregister
            from the SuperLink).

        Raises
        ------
        ConfigError
            A bad name or address, or the site is not enrolled.
        """
        site = site_name(site)
        address = _check_address(server_address)
        with self._locked():
            sites = self.sites()
            if site not in sites:
                raise ConfigError(f"Site {site!r} is not enrolled; use `fl-server enroll --site {site}`")
            old = sites[site]
            kit, entry = self._write_kit(site, address)
            sites[site] = entry
            self._save_sites(sites)
        logger.info("Re-keyed site %s: key %s replaces %s", site, entry["fingerprint"], old.get("fingerprint"))
        return Rekeyed(kit=kit, old_public_key=old.get("public_key", ""),
                       old_fingerprint=old.get("fingerprint", ""))

    def remove(self, site: str) -> str:
        """Remove a site: its registry entry, kit folder and archive.

        Parameters
        ----------
        site : str
            An enrolled site.

        Returns
        -------
        str
            The removed OpenSSH public key line (for the caller to unregister).

        Raises
        ------
        ConfigError
            The site is not enrolled.
        """
        site = site_name(site)
        with self._locked():
            sites = self.sites()
            if site not in sites:
                raise ConfigError(f"Site {site!r} is not enrolled; `fl-server sites` lists the enrolled ones")
            entry = sites.pop(site)
            self._save_sites(sites)  # registry first: a crash leaves stray files, not a site with no kit
            shutil.rmtree(self.kit_dir(site), ignore_errors=True)
            self.kit_archive(site).unlink(missing_ok=True)
        logger.info("Removed site %s (key %s)", site, entry.get("fingerprint"))
        return entry.get("public_key", "")

    def _write_kit(self, site: str, address: str) -> tuple[Path, dict[str, str]]:
        """Write ``site``'s kit (new key) and archive in place of any old ones; call with the lock held.

        Returns the kit folder and the registry entry for it.
        """
        from cryptography.hazmat.primitives import serialization

        _, ca_cert = self._ensure_ca()
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        key = _new_key()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        public_line = f"{public.decode()} fedrad-site-{site}"
        fingerprint = ssh_fingerprint(public_line)
        created = _now().isoformat(timespec="seconds")
        toml = render_kit_toml({"format": FORMAT, "site": site, "server": address, "fingerprint": fingerprint,
                                "ca-fingerprint": cert_fingerprint(ca_pem), "created": created})
        contents: dict[str, tuple[bytes, int]] = {
            KIT_FILE: (toml.encode(), 0o644),
            PRIVATE_KEY_FILE: (private, 0o600),
            PUBLIC_KEY_FILE: (public_line.encode() + b"\n", 0o644),
            CA_CERT_FILE: (ca_pem, 0o644),
        }
        assert set(contents) == set(KIT_FILES)

        # Build the kit in a private temporary folder, then swap it in with renames. Leftovers of
        # a crashed earlier attempt (which may hold a private key) go first; the lock is held.
        self.kits_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.kits_dir.glob(f".{site}.*.tmp"), *self.kits_dir.glob(f".{site}.*.old")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        kit = self.kits_dir / site
        staging = Path(tempfile.mkdtemp(dir=self.kits_dir, prefix=f".{site}.", suffix=".tmp"))  # 0700
        archive_tmp: Path | None = None
        try:
            for name, (data, mode) in contents.items():
                _write_atomic(staging / name, data, mode=mode)
            archive_tmp = self._write_archive(site, staging)
            self._swap_in(staging, kit)
            os.replace(archive_tmp, self.kit_archive(site))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if archive_tmp is not None:
                archive_tmp.unlink(missing_ok=True)
            raise
        entry = {"public_key": public_line, "fingerprint": fingerprint, "enrolled": created, "kit": str(kit)}
        return kit, entry

    def _swap_in(self, staging: Path, kit: Path) -> None:
        """Replace the folder ``kit`` by ``staging``; on failure the old kit stays in place."""
        replace_dir(staging, kit)

    def _write_archive(self, site: str, folder: Path) -> Path:
        """A temporary file (0600) beside ``kits/<site>.tar.gz`` holding ``folder``'s files as
        ``<site>/<file>``; the caller renames it into place."""

        def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info

        archive = self.kit_archive(site)
        fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                with tarfile.open(fileobj=f, mode="w:gz") as tar:
                    tar.add(folder, arcname=site, recursive=False, filter=_anonymous)
                    for name in KIT_FILES:
                        tar.add(folder / name, arcname=f"{site}/{name}", filter=_anonymous)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)


def _check_address(value: str) -> str:
    return _valid_address(value, name="server-address")
