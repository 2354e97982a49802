"""Scoring a folder of DICOM files for ``fl-predict``: the training ingest and cache, then the model."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.predict.model import TrainedModel, load_model
from common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("fl-predict")
OK, REJECTED = "ok", "rejected"


def _predict_probs(
    model: nn.Module, *, images: np.ndarray, device: torch.device, num_classes: int, batch_size: int
) -> np.ndarray:
    """Class probabilities ``(n, num_classes)`` float32 of ``model`` in eval mode, as evaluation computes them."""
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
        """Number of scored images (frames) over every accepted file."""
        return sum(len(f.probs) for f in self.files if f.probs is not None)

    def rejections(self) -> Counter[str]:
        """How many files were rejected for each reason."""
        return Counter(f.reason for f in self.files if f.status == REJECTED)


def score_folder(
    *, trained: TrainedModel, data_dir: Path, work_dir: Path, device: str = "auto", batch_size: int = 256,
    workers: int = 0,
) -> tuple[Predictions, dict[str, Any]]:
    """Ingest ``data_dir`` through the site cache (in ``work_dir``) and score every accepted image.

    Parameters
    ----------
    trained : TrainedModel
        The checkpoint and its run config; the run's preprocessing picks the cache.
    data_dir : Path
        The folder of DICOM files to score, recursively (``labels.csv`` aside).
    work_dir : Path
        fl-predict's work folder for the cache: one per data folder, never fl-client's.
    device, batch_size, workers
        ``auto``, ``cpu`` or ``cuda``; images per forward pass; decoding processes (0 = one per CPU core).

    Returns
    -------
    tuple[Predictions, dict[str, Any]]
        One result per file under ``data_dir`` (probabilities per frame, or why it was rejected), and the
        cache index (for :func:`labelled_auroc`).

    Raises
    ------
    ConfigError
        When ``work_dir`` is ``data_dir``, a file or another data folder's cache, ``device`` is ``cuda``
        without a GPU, or the checkpoint's weights cannot be loaded.
    DataError
        When the data folder is missing or holds no file, or the cache cannot be written.
    """
    from client.data.cache import cache_dir, check_folders, read_index, update_cache

    data_dir, work_dir = check_folders(data_dir, work_dir, option="--work-dir")
    earlier = read_index(cache_dir(work_dir, trained.run.preprocess))
    if earlier is not None and earlier.get("data_dir") != str(data_dir):
        # One cache per data folder: scoring another folder here would replace it (e.g. fl-client's).
        raise ConfigError(
            f"The work folder {work_dir} holds the cache of another data folder ({earlier.get('data_dir')}); "
            "use one --work-dir per data folder, never fl-client's work folder"
        )
    update = update_cache(data_dir=data_dir, work_dir=work_dir, config=trained.run.preprocess, workers=workers)
    index, store = update.index, update.store
    if not index["paths"]:
        raise DataError(f"No file in {data_dir} (labels.csv aside); point --data at the folder of DICOM files")
    classes = trained.run.classes
    probs = np.zeros((0, len(classes)), dtype=np.float32)
    if store.shape[0]:
        from client.app.training import resolve_device

        model = load_model(trained)
        probs = _predict_probs(
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

    Binary: ``BinaryAUROC`` of P(class 1); multi-class: macro one-vs-rest ``MulticlassAUROC``.

    Parameters
    ----------
    data_dir : Path
        The scored folder; its ``labels.csv``, if any, gives the true classes.
    predictions : Predictions
        :func:`score_folder`'s predictions for that folder.
    index : dict[str, Any]
        :func:`score_folder`'s cache index: each file's UIDs and path, which ``labels.csv`` is keyed by.

    Returns
    -------
    tuple[float, int] or None
        ``(auroc, labelled images)``; None when there is no ``labels.csv``, it cannot be read (logged),
        or the labelled images miss a class.
    """
    from client.data.labels import KEY_COLUMNS, LABELS_FILE, read_labels

    if not (data_dir / LABELS_FILE).is_file():
        return None
    classes = predictions.classes
    try:
        labels = read_labels(data_dir, classes=classes)
    except DataError as exc:
        log.warning("%s not used for AUROC: %s", LABELS_FILE, exc)
        return None
    targets: list[int] = []
    scores: list[np.ndarray] = []
    for result, key in zip(predictions.files, index[KEY_COLUMNS[labels.key]], strict=True):  # one file per path
        label = labels.by_key.get(key)
        if result.probs is not None and label is not None:
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

