"""A site's enrollment kit: what the coordinator hands a site so its SuperNode can join.

A kit is one folder (the coordinator writes it with :mod:`server.enroll.kits`)::

    <kit>/
        kit.toml    format, site, server (HOST:PORT), fingerprint, ca-fingerprint, created,
                    and a [data] table: the coordinator's data settings (:data:`DATA_KEYS`)
        site.key    the site's ECDSA P-384 private key, OpenSSH format, mode 0600
        site.pub    its OpenSSH public key line (what the coordinator registers)
        ca.crt      the consortium CA certificate (``--root-certificates``)

This module only reads and checks kits (the client side needs no server code); a kit that
would fail later is refused with one line naming the file and what to do.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunConfig, site_name
from common.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

KIT_FILE = "kit.toml"
PRIVATE_KEY_FILE = "site.key"
PUBLIC_KEY_FILE = "site.pub"
CA_CERT_FILE = "ca.crt"
KIT_FILES = (KIT_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, CA_CERT_FILE)
FORMAT = "fedrad-kit-1"
KIT_KEYS = ("format", "site", "server", "fingerprint", "ca-fingerprint", "created")
KEY_CURVE = "secp384r1"
DATA_TABLE = "data"
# Run-config keys that decide how a site reads, caches and splits its data: a kit carries the coordinator's.
DATA_KEYS = ("image-size", "window", "multiframe", "color", "enhance", "classes", "val-fraction", "seed")

_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+)$")


@dataclass(frozen=True)
class Kit:
    """A checked enrollment kit: the site's name, the coordinator's ``HOST:PORT`` and the kit's files."""

    site: str
    server: str
    ca_cert: Path  # the consortium CA certificate (PEM) the site trusts the coordinator by
    private_key: Path  # the site's OpenSSH ECDSA P-384 private key (mode 0600)
    public_key: Path  # the matching OpenSSH public key line
    fingerprint: str  # the public key's, as ``ssh-keygen -l`` prints it (``SHA256:…``)
    ca_fingerprint: str = ""  # the CA certificate's, as ``openssl x509 -fingerprint -sha256`` prints it
    data: dict[str, Any] | None = None  # every key of DATA_KEYS; None for a kit written before kits carried them


def ssh_fingerprint(public_key_line: str) -> str:
    """``SHA256:<unpadded base64>`` of the key blob of ``<type> <base64 blob> [comment]``, as ``ssh-keygen -l``."""
    parts = public_key_line.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"Expected an OpenSSH public key line, but got {public_key_line[:40]!r}") from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER as ``openssl x509 -noout -fingerprint -sha256`` prints it: ``SHA256:AB:…``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise ConfigError(f"Expected a PEM X.509 certificate, but could not parse it ({exc})") from exc
    return "SHA256:" + ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def server_address(value: Any, *, name: str = "server") -> str:
    """``value`` when it is a coordinator address ``HOST:PORT`` (an IPv6 host in brackets); ``name`` is for errors."""
    host, sep, port = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
    if (not sep or not host or not _HOST_RE.match(host) or not port.isdigit()
            or not 0 < int(port) < 65536 or (":" in host and not host.startswith("["))):
        raise ConfigError(f"Expected `{name}` to be an address like coordinator.example.org:9092, but got {value!r}")
    return str(value)


def check_data_settings(values: Mapping[str, Any], *, what: str = "data settings") -> dict[str, Any]:
    """Every key of :data:`DATA_KEYS`, in order, from ``values`` checked as the run checks them (defaults fill gaps).

    ``what`` names the settings in the error message.
    """
    unknown = sorted(set(values) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"Expected the keys of {what} among {', '.join(DATA_KEYS)}, but got {', '.join(unknown)}")
    run = RunConfig.from_flower(values)
    pre = run.preprocess
    return {"image-size": pre.image_size, "window": pre.window, "multiframe": pre.multiframe, "color": pre.color,
            "enhance": pre.enhance, "classes": ",".join(run.classes), "val-fraction": run.val_fraction,
            "seed": run.seed}


def parse_data_args(items: list[str] | None, *, option: str = "--run-config") -> dict[str, Any]:
    """Only the data settings the user gave with ``option`` as ``-c 'key=value ...'`` (Flower's syntax), checked."""
    from common.adapters.flower import parse_config_args

    try:
        given = parse_config_args(items or [])
    except (ValueError, OSError) as exc:
        raise ConfigError(f"Expected `{option}` as key=value pairs, but got {items!r} ({exc})") from None
    unknown = sorted(set(given) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"Expected `{option}` keys among {', '.join(DATA_KEYS)}, but got {', '.join(unknown)}")
    RunConfig.from_flower(given)
    return given


def render_kit_toml(values: dict[str, str], *, data: Mapping[str, Any] | None = None) -> str:
    """The TOML text of a ``kit.toml``: ``values`` of exactly :data:`KIT_KEYS`, in order, and ``data`` checked
    as its ``[data]`` table (None: no table)."""
    import tomli_w

    missing = [key for key in KIT_KEYS if key not in values]
    if missing:
        raise ConfigError(f"Cannot write kit.toml without {', '.join(missing)}")
    document: dict[str, Any] = {key: str(values[key]) for key in KIT_KEYS}
    if data is not None:
        document[DATA_TABLE] = check_data_settings(data, what="the kit's data settings")
    return tomli_w.dumps(document)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {path} ({exc}); ask the coordinator for a new kit") from exc


def read_kit_toml(path: Path) -> dict[str, str]:
    """The checked fields of the ``kit.toml`` at ``path``: every key of :data:`KIT_KEYS`, as strings."""
    data = _read_toml(path)
    missing = [key for key in KIT_KEYS if not isinstance(data.get(key), str) or not data[key]]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; ask the coordinator for a new kit (fl-server rekey)")
    if data["format"] != FORMAT:
        raise ConfigError(f"Expected {path} to be of format {FORMAT!r}, but got {data['format']!r}")
    return {key: str(data[key]) for key in KIT_KEYS}


def _read_kit_data(path: Path) -> dict[str, Any] | None:
    """The checked ``[data]`` table of the ``kit.toml`` at ``path``; None when it has none (an older kit)."""
    table = _read_toml(path).get(DATA_TABLE)
    if table is None:
        return None
    where = f"{path} [{DATA_TABLE}]"
    if not isinstance(table, dict):
        raise ConfigError(f"Expected {where} to be a table of data settings, but got {table!r}; "
                          "ask the coordinator for a new kit")
    try:
        return check_data_settings(table, what="the table")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}; ask the coordinator for a new kit") from None


def check_private_mode(path: Path) -> None:
    """Raise :class:`ConfigError` when the private key file ``path`` is readable by others than its owner."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"The private key {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`")


def load_certificate(path: Path, *, what: str = "certificate", fix: str = "restore it from backup") -> x509.Certificate:
    """The first PEM certificate at ``path`` (dates and signature unchecked).

    Parameters
    ----------
    path : Path
        The certificate file.
    what, fix : str
        How the error message names the file (``"CA certificate"``), and what it tells the user to do:
        "Cannot parse the <what> <path> (<why>); <fix>".
    """
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot parse the {what} {path} ({exc}); {fix}") from exc


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's ECDSA P-384 key from an OpenSSH private key file, or a one-line error."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    expected = "an unencrypted OpenSSH ECDSA P-384 private key (as `ssh-keygen -t ecdsa -b 384` writes)"
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"Expected {expected} in {path}, but could not read it ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"Expected {expected} in {path}, but got a {type(key).__name__}")
    if key.curve.name != KEY_CURVE:
        raise ConfigError(f"Expected {expected} in {path}, but got an ECDSA key on {key.curve.name}")
    return key


def load_kit(kit_dir: Path) -> Kit:
    """The kit in ``kit_dir``, every file checked; a :class:`ConfigError` names the file at fault and what to do."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    kit_dir = Path(kit_dir)
    if not kit_dir.is_dir():
        raise ConfigError(f"No enrollment kit at {kit_dir}; unpack the kit the coordinator made for this site")
    for name in KIT_FILES:
        if not (kit_dir / name).is_file():
            raise ConfigError(f"The enrollment kit {kit_dir} lacks {name}; ask the coordinator for a new kit")
    fields = read_kit_toml(kit_dir / KIT_FILE)
    site = site_name(fields["site"])
    server = server_address(fields["server"])

    key_path = kit_dir / PRIVATE_KEY_FILE
    check_private_mode(key_path)
    private_key = _load_private_key(key_path)

    pub_path = kit_dir / PUBLIC_KEY_FILE
    try:
        line = pub_path.read_text(encoding="ascii").strip()
        public_key = serialization.load_ssh_public_key(line.encode())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"Expected an OpenSSH public key line in {pub_path}, but could not read it ({exc})") from exc
    if public_key != private_key.public_key():
        raise ConfigError(f"The public key {pub_path} does not belong to {key_path}; ask the coordinator for a new kit")
    fingerprint = ssh_fingerprint(line)
    if fingerprint != fields["fingerprint"]:
        raise ConfigError(
            f"{kit_dir / KIT_FILE} names key {fields['fingerprint']}, but {key_path} is {fingerprint}; "
            "ask the coordinator for a new kit"
        )

    ca_path = kit_dir / CA_CERT_FILE
    load_certificate(ca_path, what="CA certificate", fix="ask the coordinator for a new kit")
    ca_fingerprint = cert_fingerprint(ca_path.read_bytes())
    if ca_fingerprint != fields["ca-fingerprint"]:
        raise ConfigError(
            f"{ca_path} is not the CA certificate this kit was issued with ({fields['ca-fingerprint']}); "
            "ask the coordinator for a new kit"
        )
    return Kit(site=site, server=server, ca_cert=ca_path, private_key=key_path, public_key=pub_path,
               fingerprint=fingerprint, ca_fingerprint=ca_fingerprint, data=_read_kit_data(kit_dir / KIT_FILE))
