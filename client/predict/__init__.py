"""``fl-predict``: score new DICOM files with a trained fedrad model, at the site."""

from client.predict.cli import main
from client.predict.model import TrainedModel, resolve_model
from client.predict.scoring import Predictions, score_folder

__all__ = ["Predictions", "TrainedModel", "main", "resolve_model", "score_folder"]
