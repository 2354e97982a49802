"""What fedrad's own commands set in a run config, apart from what a user sets.

fl-server and fl-sim write these keys (Flower needs them in ``[tool.flwr.app.config]``
to accept them as overrides); :class:`Launch` reads them, in one place. A user who sets
one with ``fl-server --run-config`` or ``fl-sim --set run.KEY=`` is told which option
sets it (:func:`refuse_launch_keys`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.runfolder import RunFolder

WORKDIR_KEY = "workdir"  # the coordinator's folder (fl-server --workdir; fl-sim --workdir)
RUNS_DIR_KEY = "runs-dir"  # where run folders go; "" = <workdir>/runs (fl-sim --out)
TRANSPORT_KEY = "transport"  # "tls (...)", "insecure (...)" or "simulation (...)", for the report
SITE_NODES_KEY = "site-nodes"  # "node-id:site,..." of the enrolled sites, for the report
SIM_SITES_KEY = "sim-sites"  # fl-sim's table of virtual sites (JSON list of node configs)
RESUME_RUN_ID_KEY = "resume-run-id"  # fl-server --resume: the run being continued
INIT_WEIGHTS_KEY = "init-weights"  # absolute path of the round-0 weights ("" = seeded random weights)
INIT_WEIGHTS_SHA256_KEY = "init-weights-sha256"  # its SHA-256 when the launcher checked it

# Each key fedrad's commands set, and how a user sets it instead.
LAUNCH_KEYS: dict[str, str] = {
    WORKDIR_KEY: "use --workdir",
    RUNS_DIR_KEY: "fl-server writes runs to <--workdir>/runs, fl-sim to --out",
    TRANSPORT_KEY: "fl-server sets it (TLS for enrolled sites, or --insecure)",
    SITE_NODES_KEY: "fl-server sets it from the enrolled sites",
    SIM_SITES_KEY: "fl-sim sets it from the scenario's [sites]",
    RESUME_RUN_ID_KEY: "use fl-server --resume RUN_FOLDER",
    INIT_WEIGHTS_KEY: "use --init-weights FILE",
    INIT_WEIGHTS_SHA256_KEY: "use --init-weights FILE, which checks the file and sets it",
}


def refuse_launch_keys(keys: Iterable[str], *, option: str, allowed: Iterable[str] = ()) -> None:
    """Refuse the first key among ``keys`` that fedrad's commands set, naming the option that sets it.

    Parameters
    ----------
    keys, option
        Run-config keys a user gave, and where, for the message (``--run-config``, ``--set run.KEY``).
    allowed
        Launch keys this command takes from the user after all (fl-sim: ``init-weights``).
    """
    for key in keys:
        if key in LAUNCH_KEYS and key not in allowed:
            raise ConfigError(f"`{key}` is set by fedrad, not with {option}: {LAUNCH_KEYS[key]}")


@dataclass(frozen=True)
class InitWeightsConfig:
    """The file a run starts from (``--init-weights FILE``): its absolute path and the SHA-256 the launcher
    checked (:mod:`common.weights`); the ServerApp refuses it if that changed. Both empty: seeded random weights.
    """

    path: str = ""
    sha256: str = ""

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> InitWeightsConfig:
        """Build and validate from Flower's ``context.run_config`` (keys ``init-weights*``)."""
        path, sha256 = (run_config.get(k, "") for k in (INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY))
        if not isinstance(path, str) or (path and not Path(path).is_absolute()):
            raise ConfigError(f"Expected `init-weights` to be an absolute path or empty, but got {path!r}")
        if not isinstance(sha256, str) or (sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise ConfigError(f"Expected `init-weights-sha256` to be a SHA-256 in hex or empty, but got {sha256!r}")
        if bool(path) != bool(sha256):
            raise ConfigError(
                f"Expected `init-weights` and `init-weights-sha256` together, but got only "
                f"`{'init-weights' if path else 'init-weights-sha256'}`; give the file with `--init-weights FILE` "
                "(fl-server, fl-sim run), which checks it and sets both"
            )
        return cls(path=path, sha256=sha256)

    def to_flower(self) -> dict[str, str]:
        """The run-config entries (none for seeded random weights)."""
        return {INIT_WEIGHTS_KEY: self.path, INIT_WEIGHTS_SHA256_KEY: self.sha256} if self.path else {}


def _run_id(value: Any) -> str:
    text = str(value)
    if not isinstance(value, str | int) or isinstance(value, bool) or (text and not re.fullmatch(r"[0-9]+", text)):
        raise ConfigError(f"Expected `resume-run-id` to be a run id (digits) or empty, but got {value!r}")
    return text


def _site_nodes(value: Any) -> dict[int, str]:
    names = {}
    for item in str(value).split(","):
        node, _, name = item.partition(":")
        if node.strip().isdigit() and name.strip():
            names[int(node)] = name.strip()
    return names


@dataclass(frozen=True)
class Launch:
    """What fedrad's commands set in a run config; never what a user chose."""

    workdir: str = ""
    runs_dir: str = ""
    transport: str = ""
    site_nodes: dict[int, str] = field(default_factory=dict)  # Flower node id → enrolled site name
    sim_sites: str = ""
    resume_run_id: str = ""
    """fl-server --resume: the id of the run being continued ("" for a fresh run). Sites book
    the resumed rounds under this id, so their DP plan and ledger rows stay those of one run."""
    init_weights: InitWeightsConfig = InitWeightsConfig()

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> Launch:
        """Build and validate from Flower's ``context.run_config`` (the keys of :data:`LAUNCH_KEYS`)."""
        return cls(
            workdir=str(run_config.get(WORKDIR_KEY, "")),
            runs_dir=str(run_config.get(RUNS_DIR_KEY, "") or ""),
            transport=str(run_config.get(TRANSPORT_KEY, "")),
            site_nodes=_site_nodes(run_config.get(SITE_NODES_KEY, "")),
            sim_sites=str(run_config.get(SIM_SITES_KEY, "") or ""),
            resume_run_id=_run_id(run_config.get(RESUME_RUN_ID_KEY, "")),
            init_weights=InitWeightsConfig.from_flower(run_config),
        )

    def to_flower(self) -> dict[str, str]:
        """The run-config entries of what is set (empty values left out), in :data:`LAUNCH_KEYS` order."""
        nodes = ",".join(f"{n}:{s}" for n, s in sorted(self.site_nodes.items(), key=lambda item: item[1]))
        values = {WORKDIR_KEY: self.workdir, RUNS_DIR_KEY: self.runs_dir, TRANSPORT_KEY: self.transport,
                  SITE_NODES_KEY: nodes, SIM_SITES_KEY: self.sim_sites, RESUME_RUN_ID_KEY: self.resume_run_id,
                  **self.init_weights.to_flower()}
        return {k: v for k, v in values.items() if v}

    def run_id(self, flower_run_id: int) -> str:
        """The run's id for reports and ledgers: the resumed run's id, else Flower's."""
        return self.resume_run_id or str(flower_run_id)

    def run_folder(self, flower_run_id: int) -> RunFolder:
        """Where the ServerApp writes this run: ``<runs-dir>/<run-id>``, by default ``<workdir>/runs/<run-id>``."""
        if not self.workdir:
            raise ConfigError("Expected `workdir` in the run config (set by fl-server), but it is empty")
        run_id = self.run_id(flower_run_id)
        return RunFolder(Path(self.runs_dir) / run_id) if self.runs_dir else RunFolder.of(Path(self.workdir), run_id)
