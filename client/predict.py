"""``fl-predict``: score new DICOM files with a trained fedrad model, at the site.

``fl-predict --model RUN_DIR|CHECKPOINT --data DIR --out scores.csv [--threshold T]``

A binary model is labelled at the threshold the coordinator chose on that
round's pooled validation statistics (the run's ``operating-point``), kept in
the checkpoint's metadata (else in the run folder's ``report.json``), unless
``--threshold`` says otherwise.

Every file under ``DIR`` goes through the training ingest (the same decoder,
checks, preprocessing and cache, with the run's image size, window,
multi-frame, colour and enhancement settings), so a file is accepted or
rejected for the same reason it would be in training, and an accepted image
is exactly what the model saw in training. The model and its preprocessing
come from the checkpoint's own metadata (the run config), else from the run
folder's ``state.json`` or ``report.json``.

The CSV has one row per accepted image (frame) and one per rejected file; see
``docs/predict.md``. Scores stay on this machine; the log and the summary hold
counts only, never a file name or an identifier.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from common.cli import run_typer, setup_logging
from common.config import DEVICES, RunConfig, parse_operating_point
from common.errors import ConfigError, DataError
from common.files import write_atomic
from common.metrics import describe_operating_point
from common.runfolder import (
    CHECKPOINT_FILES,
    CHECKPOINTS,
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
    import torch
    from torch import nn

log = logging.getLogger("fl-predict")
cli = typer.Typer(add_completion=False, help=__doc__)

WORK_PREFIX = ".fedrad-predict-"
OK, REJECTED = "ok", "rejected"


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint and the run config that says how to build and feed its model."""

    checkpoint: Path
    run: RunConfig
    round: int | None
    run_id: str | None
    config_source: str  # "checkpoint", or the state.json / report.json it came from
    threshold: float | None = None
    """Binary: the threshold the coordinator chose on this round's pooled validation (None when unknown)."""
    threshold_rule: str = ""
    """How it was chosen, in words ("Youden's J", "target sensitivity 0.9")."""


def find_checkpoint(model: Path) -> tuple[Path, Path | None]:
    """``--model`` → (checkpoint file, its run folder: where an older checkpoint's run config is).

    A run folder gives the checkpoint its ``state.json`` names (``"checkpoint"``,
    relative to the folder), else its highest-numbered
    ``checkpoints/round-NNNN.safetensors``. A checkpoint file's run folder is
    ``<checkpoint>/../..``.

    Raises
    ------
    ConfigError
        When the path is missing, or a run folder names or holds no checkpoint.
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
    """The run config kept in the run folder: ``state.json``'s ``run_config``, else ``report.json``'s ``config``.

    ``None`` when the folder has neither file.
    """
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


def coordinator_threshold(
    metadata: dict[str, str], run_dir: Path | None, server_round: int | None
) -> tuple[float, str] | None:
    """The threshold the coordinator chose on ``server_round``'s pooled validation, and its rule in words.

    From the checkpoint's metadata (``threshold``, ``operating-point``), else from the run
    folder's ``report.json`` (the round's pooled ``threshold``; only when the report is of the
    checkpoint's run). ``None`` when neither has one (multi-class, no evaluation that round,
    a checkpoint from an older version).
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
        entry = next((r for r in report.get("rounds", []) if r.get("round") == server_round), {})
        value = _threshold(entry.get("evaluate", {}).get("pooled", {}).get(THRESHOLD_KEY))
        rule = _rule(report.get("config", {}).get(OPERATING_POINT_KEY))
    except (OSError, ValueError, AttributeError):
        return None  # the threshold is a default only: an unreadable report leaves the scores unlabelled
    return (value, rule) if value is not None else None


def resolve_model(model: Path) -> TrainedModel:
    """Find the checkpoint for ``--model`` and its run config; torch is not imported.

    Raises
    ------
    ConfigError
        When there is no checkpoint, it is not a readable safetensors file,
        neither it nor its run folder holds the run config, or the config
        names a model or setting this installation does not know.
    """
    from safetensors import SafetensorError, safe_open

    checkpoint, run_dir = find_checkpoint(model)
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
    chosen = coordinator_threshold(metadata, run_dir, server_round) if len(run.classes) == 2 else None
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


def predict_probs(
    model: nn.Module, *, images: np.ndarray, device: torch.device, num_classes: int, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities ``(n, num_classes)`` of ``model`` in eval mode, as evaluation computes them.

    Binary models have one logit: ``P(class 1) = sigmoid(logit)``; otherwise softmax over the logits.
    """
    import torch

    model = model.to(device).eval()
    out = np.zeros((len(images), num_classes), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))  # a copy: the cache is read-only
            logits = model(x.to(device)).float().cpu()
            if num_classes == 2:
                p = torch.sigmoid(logits.squeeze(1))
                probs = torch.stack([1 - p, p], dim=1)
            else:
                probs = torch.softmax(logits, dim=1)
            out[start : start + len(x)] = probs.numpy()
    return out


# ------------------------------------------------------------------ the data


@dataclass(frozen=True)
class FileResult:
    """One file under ``--data``: its frames' probabilities, or why it was rejected."""

    file: str  # relative to --data, ``/``-separated
    status: str  # "ok" or "rejected"
    reason: str = ""
    sop_instance_uid: str = ""
    probs: np.ndarray | None = None  # (frames, classes) when ok


@dataclass(frozen=True)
class Predictions:
    files: list[FileResult]
    classes: tuple[str, ...]

    @property
    def images(self) -> int:
        return sum(len(f.probs) for f in self.files if f.probs is not None)

    def rejections(self) -> Counter[str]:
        return Counter(f.reason for f in self.files if f.status == REJECTED)


def score_folder(
    *,
    trained: TrainedModel,
    data_dir: Path,
    work_dir: Path,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[Predictions, dict[str, Any]]:
    """Ingest ``data_dir`` through the site cache (in ``work_dir``) and score every accepted image.

    Returns the predictions and the cache index (for :func:`labelled_auroc`).

    Raises
    ------
    DataError
        When the data folder is missing or holds no file, or the cache cannot be written.
    """
    from client.data.cache import cache_dir, read_index, update_cache

    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist or is not a folder")
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    if work_dir == data_dir:
        raise ConfigError(f"Expected the work folder to differ from the data folder {data_dir}; pick another --work-dir")
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"Expected the work folder {work_dir} to be a folder, but it is a file")
    earlier = read_index(cache_dir(work_dir, trained.run.preprocess))
    if earlier is not None and earlier.get("data_dir") != str(data_dir):
        # One cache per data folder: scoring another folder here would replace it (e.g. fl-client's).
        raise ConfigError(
            f"The work folder {work_dir} holds the cache of another data folder ({earlier.get('data_dir')}); "
            "use one --work-dir per data folder, never fl-client's work folder"
        )
    try:
        update = update_cache(data_dir=data_dir, work_dir=work_dir, config=trained.run.preprocess, workers=workers)
    except OSError as exc:
        raise DataError(f"Cannot write the cache under {work_dir} ({exc.strerror or type(exc).__name__})") from None
    index, store = update.index, update.store
    if not index["paths"]:
        raise DataError(f"No file in {data_dir} (labels.csv aside); point --data at the folder of DICOM files")
    classes = trained.run.classes
    probs = np.zeros((0, len(classes)), dtype=np.float32)
    if store.shape[0]:
        from client.training import resolve_device

        model = load_model(trained)
        probs = predict_probs(
            model, images=store, device=resolve_device(device), num_classes=len(classes), batch_size=batch_size
        )
    files: list[FileResult] = []
    for i, rel in enumerate(index["paths"]):
        if index["status"][i] == OK:
            start, count = index["rows"][i]
            files.append(FileResult(rel, OK, sop_instance_uid=index["sop"][i], probs=probs[start : start + count]))
        else:
            files.append(FileResult(rel, REJECTED, reason=index["reasons"][rel]))
    return Predictions(files=files, classes=classes), index


def labelled_auroc(data_dir: Path, predictions: Predictions, index: dict[str, Any]) -> tuple[float, int] | None:
    """AUROC of the scores against ``data_dir/labels.csv`` when it labels images of every class.

    Returns ``(auroc, labelled images)``, or ``None`` (no labels.csv, or too few classes).
    Binary: ``BinaryAUROC`` of P(class 1); multi-class: macro one-vs-rest ``MulticlassAUROC``.
    """
    from client.data.labels import LABELS_FILE, read_labels

    if not (data_dir / LABELS_FILE).is_file():
        return None
    classes = predictions.classes
    try:
        labels = read_labels(data_dir, classes=classes)
    except DataError as exc:
        log.warning("%s not used for AUROC: %s", LABELS_FILE, exc)
        return None
    keys = {"SOPInstanceUID": index["sop"], "StudyInstanceUID": index["study"],
            "SeriesInstanceUID": index["series"], "path": index["paths"]}[labels.key]
    by_path = {rel: i for i, rel in enumerate(index["paths"])}
    targets: list[int] = []
    scores: list[np.ndarray] = []
    for result in predictions.files:
        if result.probs is None:
            continue
        label = labels.by_key.get(keys[by_path[result.file]])
        if label is not None:
            targets += [label] * len(result.probs)
            scores.append(result.probs)
    if not targets or len(set(targets)) < len(classes):
        return None
    import torch
    from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

    y = torch.tensor(targets)
    p = torch.from_numpy(np.concatenate(scores))
    if len(classes) == 2:
        value = BinaryAUROC()(p[:, 1], y)
    else:
        value = MulticlassAUROC(num_classes=len(classes), average="macro")(p, y)
    return float(value), len(targets)


# ------------------------------------------------------------------ the output


def score_columns(classes: tuple[str, ...]) -> list[str]:
    """``score`` (= P(class 1)) for a binary model, else ``p_<class>`` per class."""
    return ["score"] if len(classes) == 2 else [f"p_{c}" for c in classes]


def _number(value: float) -> str:
    return format(float(value), ".8g")  # a float32 probability, to its precision


def render_csv(predictions: Predictions, *, threshold: float | None) -> tuple[str, int]:
    """The scores CSV and the number of images labelled positive (``classes[1]``) at ``threshold``.

    Columns: ``file, frame, status, reason, sop_instance_uid``, the score
    column(s), then ``label`` (binary with a threshold: ``classes[1]`` when
    score >= threshold, else ``classes[0]``; multi-class: the most probable class).
    """
    classes = predictions.classes
    binary = len(classes) == 2
    with_label = threshold is not None or not binary
    header = ["file", "frame", "status", "reason", "sop_instance_uid", *score_columns(classes)]
    if with_label:
        header.append("label")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    positives = 0
    for result in predictions.files:
        if result.probs is None:
            writer.writerow([result.file, "", REJECTED, result.reason, "", *[""] * len(score_columns(classes)),
                             *([""] if with_label else [])])
            continue
        for frame, p in enumerate(result.probs, start=1):
            values = [_number(p[1])] if binary else [_number(x) for x in p]
            row = [result.file, str(frame), OK, "", result.sop_instance_uid, *values]
            if binary and threshold is not None:
                positive = float(values[0]) >= threshold  # the written score decides: the CSV is consistent
                positives += positive
                row.append(classes[1] if positive else classes[0])
            elif not binary:
                row.append(classes[int(np.argmax(p))])
            writer.writerow(row)
    return buffer.getvalue(), positives


def _check_out(out: Path) -> None:
    """Fail before any decoding when ``--out`` cannot be written."""
    if out.is_dir():
        raise ConfigError(f"Expected `--out` to be a CSV file path, but {out} is a folder")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"Cannot write `--out` {out}: {blocking} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(f"Cannot write `--out` {out} ({exc.strerror or type(exc).__name__})") from None


def _summary(
    trained: TrainedModel, predictions: Predictions, *, out: Path, threshold: float | None, positives: int,
    auroc: tuple[float, int] | None, chosen_by: str = "",
) -> str:
    files = predictions.files
    ok = sum(f.status == OK for f in files)
    rejected = predictions.rejections()
    run = trained.run
    server_round = trained.round if trained.round is not None else "?"
    lines = [
        f"Model: {run.model}, classes {','.join(run.classes)}, round {server_round} ({trained.checkpoint}); "
        + f"preprocessing {run.preprocess.key()}",
        f"Scored {predictions.images} image(s) from {ok} of {len(files)} file(s); {sum(rejected.values())} file(s) rejected",
    ]
    lines += [f"  {n} × {reason}" for reason, n in sorted(rejected.items(), key=lambda x: (-x[1], x[0]))]
    if len(run.classes) == 2 and threshold is not None:
        why = f" (chosen by the coordinator on pooled validation, {chosen_by})" if chosen_by else ""
        lines.append(
            f"Positive ({run.classes[1]}) at threshold {threshold:g}{why}: {positives} of {predictions.images} image(s)"
        )
    elif len(run.classes) > 2:
        counts = Counter(run.classes[int(np.argmax(p))] for f in files if f.probs is not None for p in f.probs)
        lines.append("Most probable class: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in run.classes))
    if auroc is not None:
        lines.append(f"AUROC against labels.csv: {auroc[0]:.4f} ({auroc[1]} labelled images)")
    lines.append(f"Scores written to {out}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the command


@cli.command()
def predict(
    model: Annotated[Path, typer.Option(help=f"A run folder (runs/<run-id>/, with {CHECKPOINTS}/) or one "
                                        f"{CHECKPOINT_FILES} file.")],
    data: Annotated[Path, typer.Option(help="Folder of DICOM files to score (searched recursively).")],
    out: Annotated[Path, typer.Option(help="CSV file to write (atomically): one row per image and per rejected file.")],
    threshold: Annotated[float | None, typer.Option(help="Binary models: add a `label` column, the positive class "
                                                    "when score >= T (0 < T < 1). Default: the threshold the "
                                                    "coordinator chose for this round, when the run has one.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Keep the preprocessed-image cache here, so a re-run decodes "
                                                  "only new or changed files. Default: a temporary folder next to "
                                                  "--out, removed at exit.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="Processes decoding DICOM (0 = one per CPU core).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (counts only) to stderr.")] = False,
) -> int:
    """Score every DICOM file under --data with a trained fedrad model; write one CSV."""
    if verbose:
        setup_logging()  # INFO: progress in counts; stderr stays quiet otherwise
    if device not in DEVICES:
        raise ConfigError(f"Expected `--device` to be one of {', '.join(DEVICES)}, but got {device!r}")
    if threshold is not None and not (math.isfinite(threshold) and 0 < threshold < 1):
        raise ConfigError(f"Expected `--threshold` to be a number strictly between 0 and 1, but got {threshold!r}")
    trained = resolve_model(model)
    classes = trained.run.classes
    if threshold is not None and len(classes) > 2:
        raise ConfigError(
            f"`--threshold` applies to binary models only; this model has {len(classes)} classes "
            f"({','.join(classes)}) and is labelled by its most probable class without one"
        )
    chosen_by = ""
    if threshold is None and trained.threshold is not None:
        threshold, chosen_by = trained.threshold, trained.threshold_rule
    if device == "cuda":
        from client.training import resolve_device

        resolve_device(device)  # fail now, not after decoding
    if not data.is_dir():
        raise DataError(f"Data folder {data} does not exist or is not a folder")
    out = out.resolve()
    _check_out(out)
    log.info("Model %s (round %s), config from %s", trained.run.model, trained.round, trained.config_source)
    print(f"Reading DICOM files under {data} ...", flush=True)
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=WORK_PREFIX)) if work_dir is None else work_dir
    try:
        predictions, index = score_folder(
            trained=trained, data_dir=data, work_dir=work, device=device, batch_size=batch_size, workers=workers
        )
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    text, positives = render_csv(predictions, threshold=threshold)
    try:
        write_atomic(out, text)
    except OSError as exc:
        raise ConfigError(f"Cannot write `--out` {out} ({exc.strerror or type(exc).__name__})") from None
    auroc = labelled_auroc(data.resolve(), predictions, index)
    rejected = predictions.rejections()
    log.info("%d images scored, %d files rejected (%d reasons)", predictions.images, sum(rejected.values()), len(rejected))
    print(_summary(trained, predictions, out=out, threshold=threshold, positives=positives, auroc=auroc,
                   chosen_by=chosen_by), flush=True)
    if predictions.images == 0:
        top = "; ".join(f"{n} × {r}" for r, n in rejected.most_common(3))
        raise DataError(f"No usable file in {data}: {len(predictions.files)} file(s), all rejected ({top}); "
                        f"the reason per file is in {out}")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_typer(cli, argv if argv is not None else sys.argv[1:], prog_name="fl-predict")


if __name__ == "__main__":
    main()
