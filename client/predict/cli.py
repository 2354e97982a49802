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
import logging
import math
import sys
import tempfile
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from client.predict.model import TrainedModel, resolve_model
from client.predict.scoring import OK, REJECTED, Predictions, labelled_auroc, score_folder
from common.cli import run_typer, setup_logging
from common.config import DEVICES
from common.errors import ConfigError, DataError
from common.files import write_atomic
from common.runfolder import CHECKPOINT_FILES, CHECKPOINTS

log = logging.getLogger("fl-predict")
cli = typer.Typer(add_completion=False, help=__doc__)

WORK_PREFIX = ".fedrad-predict-"


def _number(value: float) -> str:
    return format(float(value), ".8g")  # a float32 probability, to its precision


def _render_csv(predictions: Predictions, *, threshold: float | None) -> tuple[str, int]:
    """The scores CSV and the number of images labelled positive (``classes[1]``) at ``threshold``.

    ``label``: binary with a threshold, ``classes[1]`` when score >= threshold; multi-class, the most probable class.
    """
    classes = predictions.classes
    binary = len(classes) == 2
    with_label = threshold is not None or not binary
    scores = ["score"] if binary else [f"p_{c}" for c in classes]  # score = P(class 1)
    header = ["file", "frame", "status", "reason", "sop_instance_uid", *scores, *(["label"] if with_label else [])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    positives = 0
    for result in predictions.files:
        if result.probs is None:
            writer.writerow([result.file, "", REJECTED, result.reason, *[""] * (len(header) - 4)])
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
        from client.app.training import resolve_device

        resolve_device(device)  # fail now, not after decoding
    if not data.is_dir():
        raise DataError(f"Data folder {data} does not exist or is not a folder")
    out = out.resolve()
    _check_out(out)
    log.info("Model %s (round %s), config from %s", trained.run.model, trained.round, trained.config_source)
    print(f"Reading DICOM files under {data} ...", flush=True)
    workspace = (nullcontext(str(work_dir)) if work_dir is not None
                 else tempfile.TemporaryDirectory(dir=out.parent, prefix=WORK_PREFIX, ignore_cleanup_errors=True))
    with workspace as work:
        predictions, index = score_folder(trained=trained, data_dir=data, work_dir=Path(work), device=device,
                                          batch_size=batch_size, workers=workers)
    text, positives = _render_csv(predictions, threshold=threshold)
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
    """Run the ``fl-predict`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    run_typer(cli, argv if argv is not None else sys.argv[1:], prog_name="fl-predict")

