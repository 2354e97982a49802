"""Writing a site's enrollment kit: ``<workdir>/kits/<site>/`` and ``<site>.tar.gz`` (mode 0600).

The kit's files are :data:`common.kit.KIT_FILES`; :func:`common.kit.load_kit` reads
them on the site. A kit is built in a private temporary folder and swapped in whole
(a failed swap puts the old one back), then its archive is renamed into place.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import replace_dir, write_atomic
from common.kit import (
    CA_CERT_FILE,
    FORMAT,
    KIT_FILE,
    KIT_FILES,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    cert_fingerprint,
    render_kit_toml,
    ssh_fingerprint,
)
from server.enroll.ca import new_key


def kit_archive(kits_dir: Path, site: str) -> Path:
    """The archive of ``site``'s kit, ``<kits_dir>/<site>.tar.gz`` (``site`` already checked)."""
    return kits_dir / f"{site}.tar.gz"


def write_kit(
    kits_dir: Path, site: str, *, address: str, ca_pem: bytes, data: Mapping[str, Any]
) -> tuple[Path, dict[str, str]]:
    """Write ``site``'s kit with a new key, and its archive, in place of any old ones (lock held).

    Parameters
    ----------
    kits_dir : Path
        ``<workdir>/kits``.
    site, address : str
        A checked site name and coordinator address (``HOST:PORT``).
    ca_pem : bytes
        The consortium CA certificate.
    data : Mapping[str, Any]
        The consortium's data settings (:data:`common.kit.DATA_KEYS`), the kit's ``[data]`` table.

    Returns
    -------
    tuple[Path, dict[str, str]]
        The kit folder and its registry entry (``public_key``, ``fingerprint``, ``enrolled``, ``kit``).
    """
    from cryptography.hazmat.primitives import serialization

    key = new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    public_line = f"{public.decode()} fedrad-site-{site}"
    fingerprint = ssh_fingerprint(public_line)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    toml = render_kit_toml({"format": FORMAT, "site": site, "server": address, "fingerprint": fingerprint,
                            "ca-fingerprint": cert_fingerprint(ca_pem), "created": created}, data=data)
    contents: dict[str, tuple[bytes, int]] = {
        KIT_FILE: (toml.encode(), 0o644),
        PRIVATE_KEY_FILE: (private, 0o600),
        PUBLIC_KEY_FILE: (public_line.encode() + b"\n", 0o644),
        CA_CERT_FILE: (ca_pem, 0o644),
    }
    assert set(contents) == set(KIT_FILES)

    # Leftovers of a crashed earlier attempt (which may hold a private key) go first.
    kits_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*kits_dir.glob(f".{site}.*.tmp"), *kits_dir.glob(f".{site}.*.old")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    kit = kits_dir / site
    staging = Path(tempfile.mkdtemp(dir=kits_dir, prefix=f".{site}.", suffix=".tmp"))  # 0700
    archive_tmp: Path | None = None
    try:
        for name, (payload, mode) in contents.items():
            write_atomic(staging / name, payload, mode=mode)
        archive_tmp = _write_archive(kit_archive(kits_dir, site), site, staging)
        replace_dir(staging, kit)
        os.replace(archive_tmp, kit_archive(kits_dir, site))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if archive_tmp is not None:
            archive_tmp.unlink(missing_ok=True)
        raise
    entry = {"public_key": public_line, "fingerprint": fingerprint, "enrolled": created, "kit": str(kit)}
    return kit, entry


def remove_kit(kits_dir: Path, site: str) -> None:
    """Delete ``site``'s kit folder and archive under ``kits_dir``, whichever exist."""
    shutil.rmtree(kits_dir / site, ignore_errors=True)
    kit_archive(kits_dir, site).unlink(missing_ok=True)


def _write_archive(archive: Path, site: str, folder: Path) -> Path:
    """A temporary file (0600) beside ``archive`` holding ``folder``'s files as ``<site>/<file>``;
    the caller renames it into place."""

    def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

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
