from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from client.data.dicom import hash_identifier, preprocess, read_dicom
from common.config import PreprocessConfig
from common.errors import DicomRejected


def _first_dicom(site_dir: Path) -> Path:
    return next(p for p in sorted(site_dir.rglob("*")) if p.is_file() and p.name != "labels.csv")


def test_synthetic_ct_is_read_in_hounsfield_units(tiny_sites: Path) -> None:
    values, info = read_dicom(_first_dicom(tiny_sites / "A"))
    assert values.dtype == np.float32
    assert values.min() == pytest.approx(-1000, abs=150)  # air
    assert info.modality == "CT" and info.sop_instance_uid


def test_real_ct_matches_pydicoms_own_modality_lut() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    values, info = read_dicom(path)
    np.testing.assert_allclose(values, apply_modality_lut(ds.pixel_array, ds))
    assert info.sop_instance_uid == ds.SOPInstanceUID


def test_patient_id_is_never_kept_in_clear() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    _, info = read_dicom(path)
    assert info.patient_hash == hash_identifier(pydicom.dcmread(path).PatientID)
    assert pydicom.dcmread(path).PatientID not in repr(info)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_other_transfer_syntaxes_decode_like_pydicom(name: str) -> None:
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    values, _ = read_dicom(path)
    np.testing.assert_allclose(values, apply_modality_lut(ds.pixel_array, ds))


def test_preprocess_gives_a_normalised_square_image() -> None:
    hu = np.full((100, 80), 40.0, dtype=np.float32)  # brain window centre
    hu[:10] = -1000.0
    out = preprocess(hu, PreprocessConfig(image_size=32, window="brain"))
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out[0, 20, 16] == pytest.approx(0.0, abs=1e-5)  # centre of the window → 0
    assert out[0, 0, 0] == pytest.approx(-1.0)  # air is below the window


def test_rejections_have_reasons(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DicomRejected, match="not a DICOM file"):
        read_dicom(tmp_path / "notes.txt")
    rtplan = Path(get_testdata_file("rtplan.dcm"))
    with pytest.raises(DicomRejected, match="no pixel data"):
        read_dicom(rtplan)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
    with pytest.raises(DicomRejected):
        read_dicom(truncated)
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ok.dcm")
    read_dicom(tmp_path / "ok.dcm")
