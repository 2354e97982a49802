"""The per-file cache, labels joined on open, and the data report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.data import cache as cache_mod
from client.data.cache import cache_dir, update_cache
from client.data.dataset import load_site_data, patient_split
from common.config import PreprocessConfig
from common.errors import DataError

CONFIG = PreprocessConfig(image_size=32)


@pytest.fixture
def site(tiny_sites: Path, tmp_path: Path) -> Path:
    target = tmp_path / "A"
    shutil.copytree(tiny_sites / "A", target)
    return target


def _dicoms(site: Path) -> list[Path]:
    return sorted(site.rglob("*.dcm"))


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file the cache decodes (in-process: workers=1)."""
    from client.data import dicom

    seen: list[str] = []
    real = dicom.decode_file

    def spy(path: Path, config: PreprocessConfig, *, content: bytes | None = None) -> object:
        seen.append(path.name)
        return real(path, config, content=content)

    monkeypatch.setattr(dicom, "decode_file", spy)
    return seen


def _rows(site: Path) -> list[list[str]]:
    with (site / "labels.csv").open(newline="") as f:
        return list(csv.reader(f))


def _write_rows(site: Path, rows: list[list[str]]) -> None:
    with (site / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_warm_cache_decodes_nothing_and_is_memory_mapped(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    first = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert len(first) == 40 and first.images().shape == (40, 1, 32, 32)
    assert first.report["cache"] == {"decoded": 40, "reused": 0}
    decoded = _count_decodes(monkeypatch)
    second = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert decoded == []
    assert isinstance(second.store, np.memmap)
    np.testing.assert_array_equal(first.images(), second.images())
    assert second.fingerprint == first.fingerprint


def test_a_changed_file_is_the_only_one_decoded_again(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    before = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    files = _dicoms(site)
    changed = files[3]
    ds = pydicom.dcmread(changed)
    arr = ds.pixel_array.copy()
    arr[:8, :8] = arr.max()
    ds.PixelData = arr.tobytes()
    ds.save_as(changed)
    files[5].unlink()
    decoded = _count_decodes(monkeypatch)
    after = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert decoded == [changed.name]
    assert len(after) == len(before) - 1
    assert after.fingerprint != before.fingerprint
    assert after.report["cache"] == {"decoded": 1, "reused": 38}
    # ...and the updated cache is fresh: the next open neither decodes nor rewrites anything.
    index = cache_dir(work.resolve(), CONFIG) / "index.json"
    written = index.stat().st_mtime_ns
    again = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert again.report["cache"] == {"decoded": 0, "reused": 39}
    assert index.stat().st_mtime_ns == written


def test_touched_or_moved_file_is_recognised_by_content(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    before = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    files = _dicoms(site)
    files[0].touch()
    files[1].rename(files[1].with_name("renamed.dcm"))
    decoded = _count_decodes(monkeypatch)
    after = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert decoded == []  # read and hashed, but not decoded
    assert after.fingerprint == before.fingerprint


def test_each_config_has_its_own_cache(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    bigger = load_site_data(data_dir=site, work_dir=work, config=PreprocessConfig(image_size=48), workers=1)
    assert bigger.images().shape[-1] == 48
    assert cache_dir(work.resolve(), CONFIG) != cache_dir(work.resolve(), PreprocessConfig(image_size=48))
    decoded = _count_decodes(monkeypatch)
    load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert decoded == []  # the 32-px cache survived the 48-px one
    # ...and both are one dataset for the privacy ledger: preprocessing does not reset a budget.
    assert bigger.fingerprint == load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1).fingerprint


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_parallel_workers_give_the_same_cache(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str
) -> None:
    import multiprocessing

    monkeypatch.setattr(cache_mod, "POOL_MIN_FILES", 1)
    # fork before torch exists (fl-client --check), spawn inside a ClientApp (torch imported)
    monkeypatch.setattr(cache_mod, "_pool_context", lambda: multiprocessing.get_context(start_method))
    one = load_site_data(data_dir=site, work_dir=tmp_path / "w1", config=CONFIG, workers=1)
    two = load_site_data(data_dir=site, work_dir=tmp_path / "w2", config=CONFIG, workers=2)
    np.testing.assert_array_equal(one.images(), two.images())
    assert one.fingerprint == two.fingerprint
    assert two.report["cache"] == {"decoded": 40, "reused": 0}


def test_interrupted_update_leaves_the_previous_cache(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    seen_before = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1).report["files"]["seen"]
    _dicoms(site)[0].touch()
    shutil.copy(_dicoms(site)[2], site / "new.dcm")  # same bytes as a cached file
    ds = pydicom.dcmread(_dicoms(site)[4])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(site / "other.dcm")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "replace_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        update_cache(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    monkeypatch.undo()
    folder = cache_dir(work.resolve(), CONFIG)
    assert not list(folder.parent.glob(".build-*"))  # the half-written update was removed
    index = json.loads((folder / "index.json").read_text())
    assert "other.dcm" not in index["paths"]  # the old, complete cache is what is there
    again = load_site_data(data_dir=site, work_dir=work, config=CONFIG, workers=1)
    assert again.report["files"]["seen"] == seen_before + 2


def test_label_problems_are_reported_not_raised(site: Path, tmp_path: Path) -> None:
    rows = _rows(site)
    header, body = rows[0], rows[1:]
    first_uid, second_uid, third_uid = body[0][0], body[1][0], body[2][0]
    other = "1" if body[1][1] == "0" else "0"
    new = [header, *body[3:]]
    new.append([second_uid, body[1][1]])
    new.append([second_uid, other])  # conflicting
    new.append([third_uid, "maybe"])  # unknown class
    new.append(["1.2.3.4.5.404", "1"])  # no such file
    new.append(["", "1"])  # empty key
    _write_rows(site, new)  # first_uid has no label at all
    shutil.copy(next(p for p in _dicoms(site) if pydicom.dcmread(p).SOPInstanceUID == body[4][0]), site / "copy.dcm")
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    reasons = {g["reason"]: g["count"] for g in data.report["rejections"]}
    assert reasons["no label in labels.csv"] == 1
    assert reasons["conflicting labels in labels.csv"] == 1
    assert reasons["label in labels.csv is not one of the classes (0,1)"] == 1
    assert reasons["duplicate file (identical copy of another file)"] == 1
    labels = data.report["labels"]
    assert labels["conflicting"]["count"] == 1 and labels["unknown_class"]["values"] == ["maybe"]
    assert labels["unmatched_rows"]["count"] == 1 and labels["empty_key"]["count"] == 1
    assert len(data) == 40 - 3
    assert first_uid not in json.dumps(data.report)


def test_labels_by_path_and_multiclass(site: Path, tmp_path: Path) -> None:
    files = _dicoms(site)
    rows = [["path", "label"]] + [[f.relative_to(site).as_posix(), ("a", "b", "c")[i % 3]] for i, f in enumerate(files)]
    _write_rows(site, rows)
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, classes=("a", "b", "c"), workers=1)
    assert data.report["labels"]["key"] == "path"
    assert data.report["labels"]["classes"] == {"a": 14, "b": 13, "c": 13}
    assert sorted(set(data.labels.tolist())) == [0, 1, 2]


def test_report_has_counts_and_no_identifiers(site: Path, tmp_path: Path) -> None:
    (site / "notes.txt").write_text("not dicom")
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    report = data.report
    assert report["usable"] and report["files"] == {"seen": 41, "accepted": 40, "rejected": 1}
    assert report["rejections"][0]["files"] == ["notes.txt"]
    assert report["modalities"] == {"CT": 40} and report["patients"] == len(set(data.patients))
    split = report["split"]
    assert split["train"]["images"] + split["validation"]["images"] == 40
    assert report["pixel_spacing_mm"]["min"] > 0 and report["intensity"]["min"] < -500
    text = json.dumps(report)
    for path in _dicoms(site)[:5]:
        ds = pydicom.dcmread(path)
        for value in (ds.PatientID, str(ds.PatientName), ds.SOPInstanceUID, ds.StudyInstanceUID):
            assert value not in text


def test_only_unusable_files_is_a_data_error_with_reasons(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,1\n")
    (site / "a.dcm").write_bytes(b"")
    (site / "b.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no accepted labelled image \(2 files seen: 1 × empty file"):
        load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1, require_usable=False)
    assert not data.report["usable"] and len(data) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No labels.csv"),
        ("", "is empty"),
        ("uid,label\n1,0\n", "expected a first row naming"),
        ("SOPInstanceUID,label\n", "no labels"),
    ],
)
def test_unusable_labels_file_is_one_clear_error(site: Path, tmp_path: Path, content: str | None, message: str) -> None:
    if content is None:
        (site / "labels.csv").unlink()
    else:
        (site / "labels.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_site_data(data_dir=tmp_path / "nope", work_dir=tmp_path / "w", config=CONFIG)


def test_patient_split_never_shares_a_patient() -> None:
    patients = tuple(f"p{i // 3}" for i in range(60))
    train, val = patient_split(patients, val_fraction=0.3, seed=0)
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in val})
    assert len(train) + len(val) == 60 and 0 < len(val) < 60
    again = patient_split(patients, val_fraction=0.3, seed=0)
    np.testing.assert_array_equal(train, again[0])


def test_review_regressions_nasty_files_are_rejected_with_reasons(site: Path, tmp_path: Path) -> None:
    """A FIFO, a link to a device, a dangling link, a huge header, a NaN rescale, markup in names."""
    import os

    os.mkfifo(site / "pipe.dcm")
    (site / "zero.dcm").symlink_to("/dev/zero")
    (site / "gone.dcm").symlink_to(site / "nowhere.dcm")
    ds = pydicom.dcmread(_dicoms(site)[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = 65535
    ds.save_as(site / "huge.dcm")
    ds = pydicom.dcmread(_dicoms(site)[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.RescaleSlope = "NaN"
    (site / "scan[").mkdir()
    ds.save_as(site / "scan[" / "b].dcm")  # "scan[/b].dcm": rich markup if printed unescaped
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    reasons = {f: g["reason"] for g in data.report["rejections"] for f in g["files"]}
    assert reasons["pipe.dcm"].startswith("not a regular file")
    assert reasons["zero.dcm"].startswith("not a regular file")
    assert reasons["gone.dcm"].startswith("file cannot be read")
    assert reasons["huge.dcm"].startswith("image too large")
    assert reasons["scan[/b].dcm"].startswith("non-finite values")
    assert len(data) == 40 and np.isfinite(data.images()).all()


def test_review_regressions_duplicates_keep_the_labelled_copy(site: Path, tmp_path: Path) -> None:
    files = _dicoms(site)
    rows = [["path", "label"]] + [[f.relative_to(site).as_posix(), "1"] for f in files]
    _write_rows(site, rows)
    (site / "0backup").mkdir()
    shutil.copy(files[0], site / "0backup" / "copy.dcm")  # sorts first, has no label
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    assert len(data) == 40
    assert data.report["rejections"] == [
        {"reason": "duplicate file (identical copy of another file)", "count": 1, "files": ["0backup/copy.dcm"]}
    ]


def test_review_regressions_machine_dependent_rejections_are_retried(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.data import dicom

    real = dicom.decode_file
    victim = _dicoms(site)[0]

    def no_plugin(path: Path, config: PreprocessConfig, *, content: bytes | None = None) -> object:
        if path.resolve() == victim.resolve():
            raise dicom.DicomRejected("no decoder installed for JPEG-LS Lossless Image Compression")
        return real(path, config, content=content)

    monkeypatch.setattr(dicom, "decode_file", no_plugin)
    first = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    assert len(first) == 39
    monkeypatch.undo()
    second = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    assert len(second) == 40 and second.report["cache"]["decoded"] == 1


def test_review_regressions_unlistable_folder_and_bad_workdir(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from common.errors import ConfigError

    blocked = str(_dicoms(site)[0].parent)
    real = os.scandir

    def scandir(path: str) -> object:
        if str(path) == blocked:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(cache_mod.os, "scandir", scandir)
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, workers=1)
    rel = Path(blocked).relative_to(site).as_posix() + "/"
    assert {"reason": "folder cannot be listed (no access)", "count": 1, "files": [rel]} in data.report["rejections"]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="differ from the data folder"):
        load_site_data(data_dir=site, work_dir=site, config=CONFIG)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_site_data(data_dir=site, work_dir=tmp_path / "afile", config=CONFIG)


def test_review_regressions_labels_file_never_echoes_identifiers(site: Path, tmp_path: Path) -> None:
    rows = _rows(site)
    _write_rows(site, rows[1:])  # no header: the first row is a UID
    with pytest.raises(DataError) as excinfo:
        load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG)
    assert rows[1][0] not in str(excinfo.value)
    _write_rows(site, [["label", "SOPInstanceUID"]] + rows[1:])  # swapped: UIDs land in `label`
    data = load_site_data(data_dir=site, work_dir=tmp_path / "w", config=CONFIG, require_usable=False)
    assert data.report["labels"]["unknown_class"]["count"] == 40
    assert data.report["labels"]["unknown_class"]["values"] == []
