"""The run folder ``<workdir>/runs/<run-id>/``: the one module that knows its file names.

The ServerApp writes it (``fl-server`` and ``fl-sim`` alike); ``fl-predict``, ``fl-audit``,
resume and the benchmarks read it. The names never change: older run folders must still load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS = "runs"  # the folder of a coordinator workdir with one run folder per run id
REPORT_JSON, REPORT_MD = "report.json", "report.md"  # the run report, rewritten after every round
STATE = "state.json"  # the coordinator's state after each completed round: the round's commit point
CHECKPOINTS = "checkpoints"  # the global weights of every round, ``round-NNNN.safetensors``
CHECKPOINT_FILES = f"{CHECKPOINTS}/round-NNNN.safetensors"  # in words, for messages and help texts
AUROC_PLOT, EPSILON_PLOT, PARTICIPATION_PLOT = "auroc.png", "epsilon.png", "participation.png"
PLOT_FILES = (AUROC_PLOT, EPSILON_PLOT, PARTICIPATION_PLOT)  # a finished run's plots, in drawing order
RUN_ID_KEY, ROUND_KEY, RUN_CONFIG_KEY = "run-id", "round", "run-config"  # a checkpoint's metadata, and
THRESHOLD_KEY, OPERATING_POINT_KEY = "threshold", "operating-point"  # a binary run's chosen threshold
_CHECKPOINT = re.compile(r"round-(\d+)\.safetensors")


def checkpoint_round(path: Path) -> int | None:
    """The round in a checkpoint file's name; ``None`` when it is not named ``round-NNNN.safetensors``."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


class _Entry:
    """A file or folder of every run folder, by its name (a read-only attribute of :class:`RunFolder`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: RunFolder, owner: type[RunFolder] | None = None) -> Path:
        return folder.path / self.name


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder (paths only: nothing is read or created until asked)."""

    path: Path

    @classmethod
    def of(cls, workdir: Path, run_id: str | int) -> RunFolder:
        """The folder of run ``run_id`` in a coordinator workdir."""
        return cls(workdir / RUNS / str(run_id))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder:
        """The run folder a checkpoint file sits in."""
        return cls(checkpoint.resolve().parent.parent)

    @classmethod
    def in_workdir(cls, workdir: Path) -> list[RunFolder]:
        """The run folders of a coordinator workdir, oldest first; ``[]`` when it has none."""
        found = [p for p in (workdir / RUNS).glob("*") if p.is_dir()]
        return [cls(p) for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]

    @property
    def workdir(self) -> Path | None:
        """The coordinator workdir; ``None`` when this is not a ``<workdir>/runs/<run-id>`` folder."""
        return self.path.parent.parent if self.path.parent.name == RUNS else None

    report_json = _Entry(REPORT_JSON)  # the run report for programs, rewritten after every round
    report_md = _Entry(REPORT_MD)  # the human-readable run report, rewritten after every round
    state = _Entry(STATE)  # the coordinator's state after each completed round: what resume starts from
    checkpoints = _Entry(CHECKPOINTS)  # the folder of the global weights of every round

    def checkpoint(self, server_round: int) -> Path:
        """The checkpoint of round ``server_round``, whether or not it was written."""
        return self.checkpoints / f"round-{server_round:04d}.safetensors"

    def saved_checkpoints(self) -> dict[int, Path]:
        """The checkpoint files there are, by round in ascending order; ``{}`` when there is none."""
        found = ((checkpoint_round(p), p) for p in self.checkpoints.glob("round-*") if p.is_file())
        return dict(sorted((r, p) for r, p in found if r is not None))

    def plot(self, name: str) -> Path:
        """The plot ``name``, one of :data:`PLOT_FILES` (else :class:`ValueError`)."""
        if name not in PLOT_FILES:
            raise ValueError(f"Expected one of {', '.join(PLOT_FILES)}, but got {name!r}")
        return self.path / name

    def read_report(self) -> dict[str, Any]:
        """The run report so far (:class:`OSError`: unreadable; :class:`ValueError`: not a JSON object)."""
        return _read_json(self.report_json)

    def read_state(self) -> dict[str, Any]:
        """The coordinator's state, unchecked (``server.app.resume.load_state`` checks it)."""
        return _read_json(self.state)
