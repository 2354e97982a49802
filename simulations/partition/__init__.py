"""Virtual sites for ``fl-sim``: a labelled DICOM folder split by patient, or skewed prevalences."""

from simulations.partition.folder import MANIFEST, PartitionResult, PartitionSummary, partition_folder
from simulations.partition.skew import dirichlet_prevalences

__all__ = ["MANIFEST", "PartitionResult", "PartitionSummary", "dirichlet_prevalences", "partition_folder"]
