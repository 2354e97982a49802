"""Per-round model checkpoints in safetensors format (where they live, their metadata keys: :mod:`common.runfolder`).

Each carries its run's config (``run-config``, JSON), so ``fl-predict --model CHECKPOINT`` rebuilds the model
and preprocessing from the file alone. A binary run's checkpoint of round ``r`` also carries the threshold
chosen on round ``r``'s pooled evaluation (fl-predict's default), added after that evaluation
(:func:`annotate_checkpoint`) and before the coordinator's state names the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import write_atomic
from common.runfolder import OPERATING_POINT_KEY, ROUND_KEY, RUN_CONFIG_KEY, RUN_ID_KEY, THRESHOLD_KEY, RunFolder

if TYPE_CHECKING:
    import torch

    from server.app.report import RunReport


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """Where round ``server_round``'s checkpoint goes in ``run_dir`` (``checkpoints/round-NNNN.safetensors``)."""
    return RunFolder(run_dir).checkpoint(server_round)


def checkpoint_metadata(report: RunReport, server_round: int) -> dict[str, str]:
    """Run id, round and the run config (numbers and settings only: no site data)."""
    return {RUN_ID_KEY: str(report.run_id), ROUND_KEY: str(server_round), RUN_CONFIG_KEY: json.dumps(report.config)}


def threshold_metadata(threshold: float, operating_point: str | float) -> dict[str, str]:
    """The chosen threshold (``repr``: exact round trip) and the rule that chose it (the run config's value)."""
    return {THRESHOLD_KEY: repr(float(threshold)), OPERATING_POINT_KEY: str(operating_point)}


def annotate_checkpoint(path: Path, metadata: Mapping[str, str]) -> Path:
    """Add ``metadata`` to a written checkpoint; the weights are unchanged, the file rewritten atomically."""
    tensors, existing = load_checkpoint(path)
    return save_checkpoint(path, tensors, metadata={**existing, **metadata})


def save_checkpoint(path: Path, state: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]) -> Path:
    """Write the global weights ``state`` to ``path`` atomically (a crash never leaves a truncated checkpoint).

    Parameters
    ----------
    path
        The checkpoint file (:func:`checkpoint_path`), returned once written; its folder is created if missing.
    state
        The model's state dict; tensors are detached and copied to the CPU (contiguous) before writing.
    metadata
        The safetensors header metadata: :func:`checkpoint_metadata` (binary runs later also
        :func:`threshold_metadata`).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(path, save(tensors, metadata=dict(metadata)))
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata of a checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensors(), dict(f.metadata() or {})
