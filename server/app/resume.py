"""The coordinator's state after each completed round, and resuming from it.

After every completed round (trained, checkpointed, evaluated) the ServerApp writes ``RUN_DIR/state.json``
atomically, after the checkpoint it names and ``report.json``: the round's commit point, so a crash leaves
the previous round's state or this one's, never half of one. ``fl-server --resume RUN_DIR`` submits a new
Flower run with the same run config plus ``resume-run-id``; the ServerApp loads this state and goes on with
the next round. Sites book the resumed rounds under the original run id, so their DP plan stays the one
they started with (``docs/resilience.md``: how a repeated round is accounted).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from common.files import write_atomic
from common.runfolder import ROUND_KEY, STATE, RunFolder

if TYPE_CHECKING:
    from collections import OrderedDict

    import torch

    from server.app.report import RunReport

FORMAT = "fedrad-coordinator-1"


@dataclass
class CoordinatorState:
    """What the coordinator needs to go on after a crash (numbers and settings only)."""

    run_id: str
    completed_round: int
    num_rounds: int
    checkpoint: str | None  # the weights after ``completed_round``, relative to the run folder (None before round 1)
    run_config: dict[str, Any]
    strategy: dict[str, Any] = field(default_factory=dict)  # aggregation settings, node id → site name so far
    # site → {"trained"|"declined"|"failed"|"rejected": [rounds]}
    participation: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # one entry per Flower run that served this run: its id, its first round, when it started
    segments: list[dict[str, Any]] = field(default_factory=list)
    saved: float = 0.0
    format: str = FORMAT

    @property
    def finished(self) -> bool:
        """Whether all ``num_rounds`` rounds have completed, leaving nothing to resume."""
        return self.completed_round >= self.num_rounds


def participation(report: RunReport) -> dict[str, dict[str, list[int]]]:
    """Which rounds each site trained, declined, failed or had its update rejected in."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in sorted(report.rounds):
        train = report.rounds[r].get("train", {})
        for kind, key in (("trained", "sites"), ("declined", "declined"), ("failed", "failed"), ("rejected", "rejected")):
            for name in train.get(key, {}):
                out.setdefault(name, {}).setdefault(kind, []).append(r)
    return out


def save_state(run_dir: Path, state: CoordinatorState) -> Path:
    """Write ``state.json`` atomically (the commit point of a round)."""
    state.saved = time.time()
    path = RunFolder(run_dir).state
    write_atomic(path, (json.dumps(asdict(state), indent=2) + "\n").encode())
    return path


def load_state(run_dir: Path) -> CoordinatorState:
    """The state of a run folder; a clear :class:`ConfigError` when it cannot be resumed."""
    folder = RunFolder(run_dir)
    path = folder.state
    if not run_dir.is_dir():
        raise ConfigError(f"Expected a run folder to resume, but {run_dir} does not exist")
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {STATE}: it is not a fedrad run folder, or the run stopped before its first "
            "round completed (start a new run instead)"
        )
    try:
        data = folder.read_state()
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        state = CoordinatorState(**data)
        int(state.run_id)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from None
    if state.checkpoint is not None and not (run_dir / state.checkpoint).is_file():
        raise ConfigError(f"{path} names checkpoint {state.checkpoint}, which is missing from {run_dir}")
    return state


def load_weights(run_dir: Path, state: CoordinatorState) -> OrderedDict[str, torch.Tensor] | None:
    """The global weights after the last completed round (None: round 1 never completed)."""
    from collections import OrderedDict

    from server.app.checkpoint import load_checkpoint

    if state.checkpoint is None:
        return None
    from safetensors import SafetensorError

    try:
        tensors, metadata = load_checkpoint(run_dir / state.checkpoint)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"Cannot read checkpoint {run_dir / state.checkpoint}: {exc}") from None
    if metadata.get(ROUND_KEY) != str(state.completed_round):
        raise ConfigError(
            f"Checkpoint {state.checkpoint} is of round {metadata.get(ROUND_KEY)}, but {STATE} says round "
            f"{state.completed_round} completed"
        )
    return OrderedDict(tensors.items())
