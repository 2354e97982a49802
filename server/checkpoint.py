"""Per-round model checkpoints in safetensors format.

Each checkpoint carries its run's config in its metadata (``run-config``, JSON),
so ``fl-predict --model CHECKPOINT`` rebuilds the same model and preprocessing
from the file alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import write_atomic

if TYPE_CHECKING:
    import torch

    from server.report import RunReport

RUN_CONFIG_KEY = "run-config"


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors"


def checkpoint_metadata(report: RunReport, server_round: int) -> dict[str, str]:
    """Run id, round and the run config (numbers and settings only: no site data)."""
    return {"run-id": str(report.run_id), "round": str(server_round), RUN_CONFIG_KEY: json.dumps(report.config)}


def save_checkpoint(path: Path, state: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]) -> Path:
    """Write the global weights atomically (a crash never leaves a truncated checkpoint)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(path, save(tensors, metadata=dict(metadata)))
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata of a checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata
