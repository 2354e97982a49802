"""The consortium the coordinator keeps: its CA, the registry of enrolled sites and their kits.

Everything lives under the coordinator's work dir::

    <workdir>/pki/ca.key         consortium CA key, ECDSA P-384, PKCS#8 PEM, mode 0600
    <workdir>/pki/ca.crt         self-signed CA certificate (10 years)
    <workdir>/pki/server.key     the coordinator's TLS key, mode 0600
    <workdir>/pki/server.crt     its certificate, signed by the CA (2 years, serverAuth)
    <workdir>/pki/sites.json     registry: site → public_key, fingerprint, enrolled, kit
    <workdir>/pki/data.toml      the consortium's data settings, once given (``enroll``/``rekey`` with ``data``)
    <workdir>/kits/<site>/       the site's kit (see :mod:`common.kit`)
    <workdir>/kits/<site>.tar.gz the same kit as one file to hand over (mode 0600)

Every file is written whole to a temporary file in its folder and renamed into
place, so a crash leaves the old file or the new one, never half of one. Changes
are serialised by an ``flock`` on ``pki/.lock``. The registry is the source of
truth and is written last: kit folder, then archive, then registry entry, so a
crash in between leaves at worst a kit whose key is not registered, which the
next ``enroll``/``rekey`` replaces.

Every kit carries the consortium's data settings (:data:`common.kit.DATA_KEYS`: how a
site reads, caches and splits its data), so a site checks and caches what the run
uses without being told. They are the run config's defaults until an ``enroll`` or
``rekey`` gives others, which are recorded and go into every later kit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import site_name
from common.errors import ConfigError
from common.files import write_atomic
from common.kit import check_data_settings
from common.kit import server_address as check_address
from server.enroll.ca import CertificateAuthority, cert_pem, san_entries
from server.enroll.kits import kit_archive, remove_kit, write_kit

logger = logging.getLogger(__package__)  # "server.enroll", as the log has always said

PKI_DIR = "pki"
KITS_DIR = "kits"
REGISTRY = "sites.json"
DATA_FILE = "data.toml"


@dataclass(frozen=True)
class Rekeyed:
    """What :meth:`Consortium.rekey` returns: the site's new kit, and its old key for the caller to unregister."""

    kit: Path  # the new kit folder
    old_public_key: str  # the OpenSSH public key line the site had before
    old_fingerprint: str  # its fingerprint (``SHA256:…``)


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
        self.registry_path = self.pki_dir / REGISTRY
        self.data_path = self.pki_dir / DATA_FILE
        self.ca = CertificateAuthority(self.pki_dir)

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

    def ensure_ca(self) -> Path:
        """Create the consortium CA once; afterwards check and reuse it. Returns ``pki/ca.crt``.

        Raises
        ------
        ConfigError
            The CA certificate exists without its key, or either is unreadable.
        """
        with self._locked():
            self.ca.load_or_create()
        return self.ca.cert_path

    def ensure_server_cert(self, hosts: list[str]) -> tuple[Path, Path]:
        """Issue the coordinator's TLS certificate, or reuse the one that fits; ``(pki/server.crt, pki/server.key)``.

        The certificate names ``127.0.0.1`` and ``localhost`` plus every host in
        ``hosts`` (an IP address as an IP SAN, anything else as a DNS SAN). It is
        re-issued, with a new key, when the names differ from the existing
        certificate's, when it is not signed by the current CA, does not match its
        key, or expires within 30 days.
        """
        wanted = san_entries(hosts)
        with self._locked():
            self.ca.ensure_server_cert(wanted)
        return self.ca.server_cert_path, self.ca.server_key_path

    def sites(self) -> dict[str, dict[str, str]]:
        """The enrolled sites: name → ``{"public_key", "fingerprint", "enrolled", "kit"}`` (none: empty)."""
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
        write_atomic(self.registry_path, text, mode=0o644)

    def kit_dir(self, site: str) -> Path:
        """The folder of ``site``'s kit, ``<workdir>/kits/<site>``."""
        return self.kits_dir / site_name(site)

    def kit_archive(self, site: str) -> Path:
        """The archive of ``site``'s kit, ``<workdir>/kits/<site>.tar.gz``."""
        return kit_archive(self.kits_dir, site_name(site))

    def enroll(self, site: str, *, server_address: str, data: Mapping[str, Any] | None = None) -> Path:
        """Enroll a new site: a fresh key pair, its kit and archive, a registry entry.

        Parameters
        ----------
        site : str
            The site's name (letters, digits, ``_``, ``-``).
        server_address : str
            The coordinator's address as the site reaches it, ``HOST:PORT``.
        data : Mapping[str, Any] or None
            Data settings (keys of :data:`common.kit.DATA_KEYS`) that change the consortium's
            (see :meth:`data_settings`); None keeps them. The kit carries the result.

        Returns
        -------
        Path
            The kit folder ``<workdir>/kits/<site>`` (the archive lies beside it).

        Raises
        ------
        ConfigError
            A bad name, address or data setting, or the site is already enrolled.
        """
        return self._issue(site, server_address, data, rekey=False)[0]

    def rekey(self, site: str, *, server_address: str, data: Mapping[str, Any] | None = None) -> Rekeyed:
        """Give an enrolled site a new key pair and a new kit, replacing the old ones.

        Parameters
        ----------
        site, server_address, data
            As for :meth:`enroll`.

        Raises
        ------
        ConfigError
            A bad name, address or data setting, or the site is not enrolled.
        """
        kit, old = self._issue(site, server_address, data, rekey=True)
        return Rekeyed(kit=kit, old_public_key=old.get("public_key", ""), old_fingerprint=old.get("fingerprint", ""))

    def _issue(
        self, site: str, server_address: str, data: Mapping[str, Any] | None, *, rekey: bool
    ) -> tuple[Path, dict[str, str]]:
        """A new key pair and kit for ``site`` (enrolled already exactly when ``rekey``); the kit, the old entry."""
        site = site_name(site)
        address = check_address(server_address, name="server-address")
        with self._locked():
            sites = self.sites()
            if site in sites and not rekey:
                raise ConfigError(
                    f"Site {site!r} is already enrolled (key {sites[site].get('fingerprint', '?')}); "
                    f"to give it a new key use `fl-server rekey --site {site}`"
                )
            if site not in sites and rekey:
                raise ConfigError(f"Site {site!r} is not enrolled; use `fl-server enroll --site {site}`")
            old = sites.get(site, {})
            settings = self._settings(data, others=sorted(set(sites) - {site}))
            _, ca_cert = self.ca.load_or_create()
            kit, sites[site] = write_kit(self.kits_dir, site, address=address, ca_pem=cert_pem(ca_cert), data=settings)
            self._save_sites(sites)
            if data is not None:  # recorded as the consortium's: every later kit carries them
                write_atomic(self.data_path, tomli_w.dumps(settings), mode=0o644)
        if rekey:
            logger.info("Re-keyed site %s: key %s replaces %s", site, sites[site]["fingerprint"],
                        old.get("fingerprint"))
        else:
            logger.info("Enrolled site %s (key %s); kit %s", site, sites[site]["fingerprint"], kit)
        return kit, old

    def remove(self, site: str) -> str:
        """Remove an enrolled site: its registry entry, kit folder and archive; returns its OpenSSH public key line.

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
            remove_kit(self.kits_dir, site)
        logger.info("Removed site %s (key %s)", site, entry.get("fingerprint"))
        return entry.get("public_key", "")

    def data_settings(self) -> dict[str, Any]:
        """The consortium's data settings, which every new kit carries.

        Every key of :data:`common.kit.DATA_KEYS`: as last given to :meth:`enroll` or :meth:`rekey`, else the run
        config's defaults.
        """
        if not self.data_path.exists():
            return check_data_settings({})
        fix = "restore it from backup, or delete it and give the data settings again"
        try:
            values = tomllib.loads(self.data_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read the data settings {self.data_path} ({exc}); {fix}") from exc
        try:
            return check_data_settings(values, what="the file")
        except ConfigError as exc:
            raise ConfigError(f"{self.data_path}: {exc}; {fix}") from None

    def _settings(self, data: Mapping[str, Any] | None, *, others: list[str]) -> dict[str, Any]:
        """The data settings for a new kit: ``data`` over the consortium's; warns when that changes
        what the kits of ``others`` (enrolled sites) say. Call with the lock held."""
        current = self.data_settings()
        if data is None:
            return current
        settings = check_data_settings({**current, **data})
        changed = {key: value for key, value in settings.items() if current[key] != value}
        if changed and others:
            pairs = " ".join(f"{key}={json.dumps(value)}" for key, value in changed.items())
            logger.warning(
                "The consortium's data settings change (%s); the kits of %s carry the old ones: those sites "
                "check and cache their data with -c '%s', or get new kits (fl-server rekey)",
                pairs, ", ".join(others), pairs,
            )
        return settings
