from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.data import cache as cache_mod
from client.data.cache import load_site_data, patient_split
from common.config import PreprocessConfig
from common.errors import DataError, DicomRejected

CONFIG = PreprocessConfig(image_size=32)


@pytest.fixture
def site(tiny_sites: Path, tmp_path: Path) -> Path:
    target = tmp_path / "A"
    shutil.copytree(tiny_sites / "A", target)
    return target


def _cache_dirs(work: Path) -> list[Path]:
    return sorted((work / "cache").iterdir()) if (work / "cache").exists() else []


def test_cache_is_built_once_and_reused(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    first = load_site_data(data_dir=site, work_dir=work, config=CONFIG)
    assert len(first) == 40 and first.images.shape == (40, 1, 32, 32)
    assert set(np.unique(first.labels)) == {0, 1}

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fresh cache must not decode DICOM again")

    monkeypatch.setattr(cache_mod, "read_dicom", no_decoding)
    second = load_site_data(data_dir=site, work_dir=work, config=CONFIG)
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.fingerprint == first.fingerprint


def test_changed_file_or_config_rebuilds(site: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    before = load_site_data(data_dir=site, work_dir=work, config=CONFIG)
    victim = next(p for p in sorted(site.rglob("*.dcm")))
    victim.unlink()
    after = load_site_data(data_dir=site, work_dir=work, config=CONFIG)
    assert len(after) == len(before) - 1 and after.fingerprint != before.fingerprint
    bigger = load_site_data(data_dir=site, work_dir=work, config=PreprocessConfig(image_size=48))
    assert bigger.images.shape[-1] == 48
    assert len(_cache_dirs(work)) == 2  # one cache per preprocessing config


def test_interrupted_build_leaves_no_cache(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    calls = {"n": 0}
    real = cache_mod.preprocess

    def crash_midway(values: np.ndarray, config: PreprocessConfig) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(values, config)

    monkeypatch.setattr(cache_mod, "preprocess", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        load_site_data(data_dir=site, work_dir=work, config=CONFIG)
    assert not any((work / "cache").rglob("manifest.json"))
    monkeypatch.setattr(cache_mod, "preprocess", real)
    assert len(load_site_data(data_dir=site, work_dir=work, config=CONFIG)) == 40


def test_unusable_and_unlabelled_files_are_reported_not_skipped(site: Path, tmp_path: Path) -> None:
    (site / "README.txt").write_text("export notes")
    (site / "empty.dcm").write_bytes(b"")
    data = load_site_data(data_dir=site, work_dir=tmp_path / "work", config=CONFIG)
    assert data.summary["files_seen"] == 42 and data.summary["accepted"] == 40
    assert data.summary["rejected"] == {"not a DICOM file (no DICM preamble)": 1, "empty file": 1}


def test_folder_without_usable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,1\n")
    (tmp_path / "junk.bin").write_bytes(os.urandom(256))
    with pytest.raises(DataError, match="No usable images"):
        load_site_data(data_dir=tmp_path, work_dir=tmp_path / "work", config=CONFIG)


def test_missing_data_or_labels_are_errors(tmp_path: Path, site: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_site_data(data_dir=tmp_path / "nope", work_dir=tmp_path / "w", config=CONFIG)
    (site / "labels.csv").unlink()
    with pytest.raises(DataError, match="No labels.csv"):
        load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG)


def test_bad_label_values_name_the_line(site: Path, tmp_path: Path) -> None:
    labels = site / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",maybe"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"labels.csv:4: expected `label` to be an integer"):
        load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG)


def test_split_is_by_patient_and_deterministic() -> None:
    patients = [f"p{i // 4}" for i in range(40)]  # 10 patients x 4 slices
    train, val = patient_split(patients, val_fraction=0.3, seed=0)
    assert len(train) + len(val) == 40
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in val})
    assert len({patients[i] for i in val}) == 3
    again = patient_split(patients, val_fraction=0.3, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])


def test_rejection_type_is_a_value_error() -> None:
    assert issubclass(DicomRejected, ValueError) and issubclass(DataError, ValueError)
