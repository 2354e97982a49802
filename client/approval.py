"""Which apps a site runs: its installed app, and the FAB hashes its operator approved.

An app is named by its FAB hash, the SHA-256 ``flwr run`` gives the bundle it builds
from a project folder; the same fedrad version gives the same hash at the coordinator
and at every site. The site's installed app is the project folder its worker runs
(by default the folder fedrad is installed from). Hashes approved with
``fl-client --approve-app HASH`` sit in ``approved-apps.json`` in the site's work
folder; a run of an approved app is still executed by the installed code.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import write_atomic

APPROVALS_FILE = "approved-apps.json"
_HASH = re.compile(r"[0-9a-f]{64}")


def default_app_dir() -> Path:
    """The project folder fedrad runs from (holding its pyproject.toml and the Flower App it names)."""
    return Path(__file__).resolve().parents[1]


def installed_hash(app_dir: Path) -> str:
    """The FAB hash of the app in ``app_dir``, as the coordinator's ``flwr run`` would compute it.

    Raises
    ------
    ConfigError
        When ``app_dir`` holds no Flower App (no pyproject.toml with ``[tool.flwr.app]``, or a file it names is missing).
    """
    from common.adapters.runtime import fab_hash

    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"Expected a Flower App in {app_dir} (its pyproject.toml), but found none; "
                          "pass the folder fedrad was installed from with --app-dir")
    try:
        return fab_hash(app_dir)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"Could not build the app in {app_dir} to hash it ({exc})") from None


def check_hash(value: str) -> str:
    """``value`` as a FAB hash (64 lower-case hex digits), or a :class:`ConfigError` saying what is wrong."""
    value = value.strip().lower()
    if not _HASH.fullmatch(value):
        raise ConfigError(f"Expected `--approve-app` to be a FAB hash (64 hex digits, as `fl-client apps` "
                          f"prints), but got {value!r}")
    return value


def read_approvals(path: Path) -> list[dict[str, Any]]:
    """The approvals in ``path`` (``[{"hash": ..., "approved-at": ...}]``); none when the file does not exist.

    Raises
    ------
    ConfigError
        When the file is not a list of approvals with valid hashes: the site then runs its installed app only
        once the file is repaired or removed.
    """
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("hash"), str)
                                                    for e in entries):
            raise ValueError('expected a JSON list of {"hash": "..."} objects')
        for entry in entries:
            check_hash(entry["hash"])
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a list of approved apps ({exc}); fix or remove it, then approve "
                          "again with `fl-client --approve-app HASH`") from None
    return list(entries)


def approved_hashes(path: Path, *, installed: str) -> set[str]:
    """The hashes a run's app may have at this site: the installed app's and every approved one."""
    return {installed, *(entry["hash"] for entry in read_approvals(path))}


def approve(path: Path, value: str) -> bool:
    """Add ``value`` to the approvals in ``path`` (atomically); False when it was approved already."""
    value = check_hash(value)
    entries = read_approvals(path)
    if any(entry["hash"] == value for entry in entries):
        return False
    entries.append({"hash": value, "approved-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(entries, indent=2) + "\n").encode())
    return True


@dataclass(frozen=True)
class SiteApp:
    """The app a site runs (its project folder and FAB hash) and every hash it accepts a run's app to have."""

    folder: Path
    installed: str
    approvals: Path
    approved: frozenset[str]

    @classmethod
    def load(cls, app_dir: Path | None, *, work_dir: Path) -> SiteApp:
        """The site's app: ``app_dir`` (default: fedrad's own project folder), hashed, with ``work_dir``'s approvals.

        Raises
        ------
        ConfigError
            When the folder holds no Flower App, or the approvals file is broken.
        """
        folder = (app_dir or default_app_dir()).resolve()
        installed = installed_hash(folder)
        approvals = work_dir / APPROVALS_FILE
        return cls(folder, installed, approvals, frozenset(approved_hashes(approvals, installed=installed)))
