"""Loading a trained model for ``fl-predict``: its checkpoint, run config and chosen threshold from a run folder.

Where a run folder keeps what: :mod:`common.runfolder`. torch is imported only to build the model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunConfig, parse_operating_point
from common.errors import ConfigError
from common.metrics import describe_operating_point
from common.runfolder import (
    CHECKPOINT_FILES,
    OPERATING_POINT_KEY,
    REPORT_JSON,
    ROUND_KEY,
    RUN_CONFIG_KEY,
    RUN_ID_KEY,
    STATE,
    THRESHOLD_KEY,
    RunFolder,
    checkpoint_round,
)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("fl-predict")


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint and the run config that says how to build and feed its model."""

    checkpoint: Path
    run: RunConfig
    round: int | None
    run_id: str | None
    config_source: str  # "checkpoint", or the state.json / report.json it came from
    threshold: float | None = None  # binary: the coordinator's choice on this round's pooled validation
    threshold_rule: str = ""  # how it was chosen, in words ("Youden's J", "target sensitivity 0.9")


def _find_checkpoint(model: Path) -> tuple[Path, Path | None]:
    """``--model`` → (checkpoint file, its run folder: where an older checkpoint's run config is).

    A run folder gives the checkpoint its ``state.json`` names, else its highest-numbered one.
    """
    if not model.exists():
        raise ConfigError(f"Expected `--model` to be a run folder or a checkpoint file, but {model} does not exist")
    if model.is_file():
        return model, RunFolder.of_checkpoint(model).path
    if not model.is_dir():
        raise ConfigError(f"Expected `--model` to be a run folder or a checkpoint file, but {model} is neither")
    folder = RunFolder(model)
    if folder.state.exists():
        try:
            name = folder.read_state()["checkpoint"]
            if name is not None and (not isinstance(name, str) or not name):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{folder.state} cannot be read or names no checkpoint (expected JSON with a \"checkpoint\" path); "
                "pass a checkpoint file as --model instead"
            ) from None
        if name is None:
            raise ConfigError(f"{folder.state} says the run has not completed a round yet: there is no model to use")
        checkpoint = model / name
        if not checkpoint.is_file():
            raise ConfigError(
                f"{folder.state} names the checkpoint {name}, but {checkpoint} is not a file; "
                "pass a checkpoint file as --model instead"
            )
        return checkpoint, model
    saved = folder.saved_checkpoints()
    if not saved:
        what = "a run folder" if folder.report_json.is_file() else "not a fedrad run folder"
        raise ConfigError(
            f"No checkpoint in {folder.checkpoints} ({what}; the run may not have finished a round yet); "
            f"pass a run folder with {CHECKPOINT_FILES}, or a checkpoint file"
        )
    return saved[max(saved)], model


def _folder_config(run_dir: Path | None) -> tuple[dict[str, Any], Path] | None:
    """The run config in ``state.json`` (``run_config``), else ``report.json`` (``config``), and that file."""
    if run_dir is None:
        return None
    folder = RunFolder(run_dir)
    for path, read, key in ((folder.state, folder.read_state, "run_config"),
                            (folder.report_json, folder.read_report, "config")):
        if not path.is_file():
            continue
        try:
            config = read().get(key)
        except (OSError, ValueError):
            raise ConfigError(f"{path} cannot be read (expected JSON with a \"{key}\")") from None
        if isinstance(config, dict):
            return config, path
    return None


def _threshold(value: Any) -> float | None:
    """A usable threshold (a number strictly between 0 and 1), else None."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 1 else None


def _rule(value: Any) -> str:
    """The run config's ``operating-point`` in words; Youden's J when absent (the default)."""
    try:
        return describe_operating_point(parse_operating_point("youden" if value is None else value))
    except ConfigError:
        return f"operating-point {value!r}"


def _coordinator_threshold(
    metadata: dict[str, str], run_dir: Path | None, server_round: int | None
) -> tuple[float, str] | None:
    """The threshold the coordinator chose on ``server_round``'s pooled validation, and its rule in words.

    From the checkpoint's ``metadata``, else from the run folder's ``report.json`` when it is of the
    checkpoint's run. ``None`` when neither has one (multi-class, no evaluation that round, an older
    checkpoint) or ``server_round`` is unknown.
    """
    if THRESHOLD_KEY in metadata:
        value = _threshold(metadata[THRESHOLD_KEY])
        if value is None:
            log.warning("Ignoring the checkpoint's chosen threshold %r: not a number in (0, 1)", metadata[THRESHOLD_KEY])
            return None
        return value, _rule(metadata.get(OPERATING_POINT_KEY))
    folder = RunFolder(run_dir) if run_dir is not None else None
    if server_round is None or folder is None or not folder.report_json.is_file():
        return None
    try:
        report = folder.read_report()
        if RUN_ID_KEY in metadata and str(report.get("run_id")) != metadata[RUN_ID_KEY]:
            return None  # a report of another run
        entry: dict[str, Any] = next((r for r in report.get("rounds", []) if r.get("round") == server_round), {})
        value = _threshold(entry.get("evaluate", {}).get("pooled", {}).get(THRESHOLD_KEY))
        rule = _rule(report.get("config", {}).get(OPERATING_POINT_KEY))
    except (OSError, ValueError, AttributeError):
        return None  # the threshold is a default only: an unreadable report leaves the scores unlabelled
    return (value, rule) if value is not None else None


def resolve_model(model: Path) -> TrainedModel:
    """Find the checkpoint for ``--model`` (a run folder or a checkpoint file) and its run config; no torch.

    Raises
    ------
    ConfigError
        When there is no checkpoint, it is not a readable safetensors file, neither it nor its run folder
        holds the run config, or the config names a model or setting this installation does not know.
    """
    from safetensors import SafetensorError, safe_open

    checkpoint, run_dir = _find_checkpoint(model)
    try:
        with safe_open(str(checkpoint), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            if not list(f.keys()):
                raise ConfigError(f"{checkpoint} holds no weights; it is not a fedrad checkpoint")
    except SafetensorError as exc:
        raise ConfigError(
            f"{checkpoint} is not a readable safetensors checkpoint ({' '.join(str(exc).split())}); "
            f"pass a {CHECKPOINT_FILES} file or its run folder"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{checkpoint} cannot be read ({exc.strerror or type(exc).__name__})") from None
    source = "checkpoint"
    if RUN_CONFIG_KEY in metadata:
        try:
            config = json.loads(metadata[RUN_CONFIG_KEY])
            if not isinstance(config, dict):
                raise TypeError
        except (ValueError, TypeError):
            raise ConfigError(f"The run config in {checkpoint}'s metadata is not a JSON object; the file is damaged") from None
    else:
        found = _folder_config(run_dir)
        if found is None:
            raise ConfigError(
                f"{checkpoint} carries no run config (an older checkpoint) and its run folder {run_dir} has no "
                f"{REPORT_JSON} or {STATE} holding one; pass the run folder with the checkpoint and its report"
            )
        config, report_path = found
        source = str(report_path)
    try:
        run = RunConfig.from_flower(config)
    except ConfigError as exc:
        raise ConfigError(f"The run config of {checkpoint} (from {source}) cannot be used: {exc}") from None
    round_text = metadata.get(ROUND_KEY)
    server_round = int(round_text) if round_text and round_text.isdigit() else checkpoint_round(checkpoint)
    chosen = _coordinator_threshold(metadata, run_dir, server_round) if len(run.classes) == 2 else None
    return TrainedModel(
        checkpoint=checkpoint, run=run, round=server_round, run_id=metadata.get(RUN_ID_KEY), config_source=source,
        threshold=chosen[0] if chosen else None, threshold_rule=chosen[1] if chosen else "",
    )


def load_model(trained: TrainedModel) -> nn.Module:
    """Build the run's model and load the checkpoint's weights into it (strictly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from common.models import build_model

    run = trained.run
    try:
        weights = load_file(str(trained.checkpoint))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"The weights in {trained.checkpoint} cannot be read ({' '.join(str(exc).split())})") from None
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
        raise ConfigError(
            f"The weights in {trained.checkpoint} do not fit model `{run.model}` with {len(run.classes)} classes "
            f"({first.rstrip('.')}); the checkpoint and its run config do not belong together"
        ) from None
    return model.eval()

