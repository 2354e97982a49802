"""The DICOM content of a synthetic series: CT Image Storage tags, per-slice elements, UIDs.

UIDs are ``2.25.`` UUID-derived (:func:`uuid.uuid5`): the same inputs give the same UIDs.
"""

from __future__ import annotations

import uuid

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from simulations.synth.anatomy import _Patient
from simulations.synth.profiles import SiteProfile, _stable_int

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
BRAIN_WINDOW = (40.0, 80.0)  # (center, width) in HU
# Fixed namespace: UIDs are uuid5(namespace, "<seed>/<site>/<size>/...") as 2.25.<int>.
_UID_NAMESPACE = uuid.UUID("6f1c1d8e-5b7a-4f0e-9a51-3c0de5a7f3b2")
_Key = tuple[int, str, int, int]  # (seed, site, size, patient index): what makes a series' UIDs


def _uid(*parts: object) -> UID:
    """Return a deterministic ``2.25.`` UUID-derived UID for ``parts``."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}")


def _ds_number(value: float) -> str:
    """Format a number for a DS element (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _series_dataset(patient: _Patient, *, profile: SiteProfile, key: _Key, spacing_text: str) -> Dataset:
    """Build the dataset shared by a patient's slices; :func:`_set_slice` fills in the rest."""
    size = key[2]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    spacing = float(spacing_text)
    origin = _ds_number(-(size - 1) / 2.0 * spacing)
    study_date = patient.study_date.strftime("%Y%m%d")
    enc = profile.encoding

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2"  # per slice
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = patient.study_time
    ds.AccessionNumber = f"A{_stable_int(*key, 'accession', bits=32):010d}"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = f"AXIAL {_ds_number(profile.slice_thickness_mm)}MM BRAIN"
    ds.ManufacturerModelName = profile.model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = f"{patient.study_date.year - patient.age:04d}0101"
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds_number(profile.slice_thickness_mm)
    ds.KVP = _ds_number(profile.kvp)
    ds.ConvolutionKernel = profile.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(*key, "study")
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.StudyID = f"{patient.index + 1}"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1  # per slice
    ds.ImagePositionPatient = [origin, origin, "0"]  # z per slice
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(*key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"  # per slice
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [spacing_text, spacing_text]
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = enc.pixel_representation
    ds.WindowCenter = _ds_number(BRAIN_WINDOW[0])
    ds.WindowWidth = _ds_number(BRAIN_WINDOW[1])
    ds.WindowCenterWidthExplanation = "BRAIN"
    ds.RescaleIntercept = _ds_number(enc.rescale_intercept)
    ds.RescaleSlope = _ds_number(enc.rescale_slope)
    ds.RescaleType = "HU"
    ds.add_new(0x7FE00010, "OW", b"")  # per slice
    return ds


def _set_slice(ds: Dataset, key: _Key, *, slice_index: int, z: float, pixels: np.ndarray) -> None:
    """Fill in the slice-specific elements of a series dataset; ``z`` is the table position."""
    sop_uid = _uid(*key, "image", slice_index)
    table_z = _ds_number(z)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = slice_index + 1
    position = list(ds.ImagePositionPatient)
    ds.ImagePositionPatient = [position[0], position[1], table_z]
    ds.SliceLocation = table_z
    ds.PixelData = pixels.tobytes()


# What _set_slice changes; the file meta's MediaStorageSOPInstanceUID follows SOPInstanceUID.
_SLICE_TAGS = frozenset(
    Tag(k) for k in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")
)
