"""Tests for virtual-site partitioning (simulations.partition)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

import simulations.partition.folder as partition_module
from client.data.dataset import load_site_data
from common.config import PreprocessConfig
from common.errors import ConfigError, DataError
from simulations.partition import (
    MANIFEST,
    PartitionSummary,
    dirichlet_prevalences,
    partition_folder,
)
from simulations.synth import SiteSpec, synthesize_sites

POOL_IMAGES = 180


def _rows(labels_csv: Path) -> tuple[list[str], list[list[str]]]:
    with labels_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _site_files(site_dir: Path) -> dict[str, pydicom.Dataset]:
    """Relative path → header of every linked DICOM file of a site."""
    return {
        str(p.relative_to(site_dir)): pydicom.dcmread(p, stop_before_pixels=True)
        for p in sorted(site_dir.rglob("*.dcm"))
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One labelled folder of ~45 patients, plus a note and an unlabelled DICOM file."""
    root = tmp_path_factory.mktemp("pool")
    synthesize_sites(root, [SiteSpec("pool", POOL_IMAGES), SiteSpec("extra", 2)], seed=5, size=16)
    data = root / "pool"
    (data / "README.txt").write_text("not an image\n")
    (data / "stray").mkdir()
    shutil.copy(next((root / "extra").rglob("*.dcm")), data / "stray" / "IM0001.dcm")
    return data


def _labelled(data: Path) -> dict[str, str]:
    """SOPInstanceUID → label of the pool's labels.csv."""
    _, rows = _rows(data / "labels.csv")
    return {uid: label for uid, label in rows}


def test_patients_stay_whole_and_every_labelled_file_is_in_one_site(
    pool: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sites"
    result = partition_folder(pool, out, sites=4, alpha=0.5, seed=3)
    assert list(result) == ["site-001", "site-002", "site-003", "site-004"]
    sites_of_patient: dict[str, set[str]] = defaultdict(set)
    seen: dict[str, str] = {}
    for name, summary in result.items():
        files = _site_files(out / name)
        assert isinstance(summary, PartitionSummary) and summary.site == name
        assert summary.files == len(files) and summary.patients >= 1
        assert summary.patients == len({ds.PatientID for ds in files.values()})
        for rel, ds in files.items():
            assert rel not in seen, f"{rel} is in {seen.get(rel)} and {name}"
            seen[rel] = name
            sites_of_patient[ds.PatientID].add(name)
            link = out / name / rel
            assert link.is_symlink() and link.resolve() == (pool / rel).resolve()
    assert all(len(s) == 1 for s in sites_of_patient.values()), "a patient was split"
    labelled = {
        str(p.relative_to(pool))
        for p in pool.rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID in _labelled(pool)
    }
    assert set(seen) == labelled and len(labelled) == POOL_IMAGES
    # Not dropped silently: reported with a reason, not linked.
    assert result.skipped == {
        "README.txt": "not a DICOM file (no DICM preamble or DICOM header)",
        "stray/IM0001.dcm": "no label in labels.csv",
    }
    assert result.unmatched_rows == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["skipped"]["count"] == 2 and manifest["sites"] == 4
    assert not (out / "site-001" / "README.txt").exists()


def test_site_labels_are_exactly_its_original_rows(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "sites"
    result = partition_folder(pool, out, sites=3, seed=1)
    original_header, original_rows = _rows(pool / "labels.csv")
    by_uid = {row[0]: row for row in original_rows}
    union: list[list[str]] = []
    for name, summary in result.items():
        header, rows = _rows(out / name / "labels.csv")
        assert header == original_header
        uids = {ds.SOPInstanceUID for ds in _site_files(out / name).values()}
        assert sorted(row[0] for row in rows) == sorted(uids)
        assert all(by_uid[row[0]] == row for row in rows)
        assert summary.positives == sum(row[1] == "1" for row in rows)
        union += rows
    assert sorted(union) == sorted(original_rows)


def test_sizes_follow_the_fractions(pool: Path, tmp_path: Path) -> None:
    fractions = (0.5, 0.3, 0.2)
    result = partition_folder(pool, tmp_path / "sites", sites=3, sizes=fractions, seed=2)
    files = [s.files for s in result.values()]
    assert sum(files) == POOL_IMAGES
    for n, fraction in zip(files, fractions, strict=True):
        assert abs(n / POOL_IMAGES - fraction) < 0.05, files
    equal = partition_folder(pool, tmp_path / "equal", sites=4, seed=2)
    assert max(s.files for s in equal.values()) - min(s.files for s in equal.values()) <= 12


def test_small_alpha_skews_labels_more_than_large_alpha(pool: Path, tmp_path: Path) -> None:
    def spread(alpha: float, seed: int) -> tuple[float, list[int]]:
        result = partition_folder(
            pool, tmp_path / f"a{alpha}-{seed}", sites=5, alpha=alpha, seed=seed
        )
        prevalence = [s.positives / s.files for s in result.values()]
        return statistics.pstdev(prevalence), [s.files for s in result.values()]

    skewed, skewed_sizes = spread(0.1, 0)
    iid, _ = spread(1000.0, 0)
    assert skewed > 2 * iid and skewed > 0.2, (skewed, iid)
    # Sizes are still balanced as far as whole patients allow.
    assert max(skewed_sizes) - min(skewed_sizes) <= 16, skewed_sizes


def test_same_seed_same_partition(pool: Path, tmp_path: Path) -> None:
    def assignment(out: Path, seed: int) -> dict[str, str]:
        partition_folder(pool, out, sites=4, alpha=0.3, seed=seed)
        return {
            str(path.relative_to(site)): site.name
            for site in out.glob("site-*")
            for path in site.rglob("*.dcm")
        }

    first = assignment(tmp_path / "a", 7)
    assert assignment(tmp_path / "b", 7) == first
    assert assignment(tmp_path / "c", 8) != first


def test_partitioned_sites_load_like_the_whole_folder(pool: Path, tmp_path: Path) -> None:
    config = PreprocessConfig(image_size=16)
    whole = load_site_data(data_dir=pool, work_dir=tmp_path / "work-pool", config=config)
    result = partition_folder(pool, tmp_path / "sites", sites=3, alpha=1.0, seed=4)
    total = 0
    for name, summary in result.items():
        site = load_site_data(
            data_dir=tmp_path / "sites" / name, work_dir=tmp_path / f"work-{name}", config=config
        )
        assert len(site) == summary.files
        assert int(site.labels.sum()) == summary.positives
        assert len(set(site.patients)) == summary.patients
        report = site.report
        assert report["files"]["rejected"] == 0 and report["labels"]["unmatched_rows"]["count"] == 0
        total += len(site)
    assert total == len(whole) == POOL_IMAGES


def test_path_keys_and_several_classes(pool: Path, tmp_path: Path) -> None:
    """labels.csv keyed by relative path, three classes; a patient's class is its majority."""
    data = tmp_path / "data"
    rows = []
    for path in sorted(pool.rglob("*.dcm")):
        rel = path.relative_to(pool)
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / rel)
        patient = int(rel.parts[0].rsplit("-", 1)[1]) if rel.parts[0] != "stray" else 0
        rows.append([str(rel).replace("/", "\\"), "note", "abc"[patient % 3]])
    with (data / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "comment", "label"], *rows])
    out = tmp_path / "sites"
    result = partition_folder(data, out, sites=3, alpha=0.2, classes=("a", "b", "c"), seed=0)
    assert sum(s.files for s in result.values()) == POOL_IMAGES + 1 and not result.skipped
    for name in result:
        header, site_rows = _rows(out / name / "labels.csv")
        assert header == ["path", "comment", "label"]
        linked = set(_site_files(out / name))
        assert {row[0].replace("\\", "/") for row in site_rows} == linked
        patients = {rel.split("/")[0] for rel in linked}
        assert len(patients) == result[name].patients


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "fragment"),
    [
        ("missing", {}, DataError, "does not exist"),
        ("no-labels", {}, DataError, "No labels.csv"),
        ("too-few-patients", {"sites": 500}, DataError, "Expected at least 500 patients"),
        ("out-not-empty", {}, ConfigError, "to be absent or empty"),
        ("out-foreign-overwrite", {"overwrite": True}, ConfigError, "earlier partition"),
        ("out-inside-data", {}, ConfigError, "outside the data folder"),
        ("alpha-zero", {"alpha": 0}, ConfigError, "`alpha` to be a positive number"),
        ("alpha-negative", {"alpha": -1.0}, ConfigError, "`alpha`"),
        ("sizes-sum", {"sizes": (0.5, 0.3, 0.3)}, ConfigError, "`sizes` to sum to 1"),
        ("sizes-count", {"sizes": (0.5, 0.5)}, ConfigError, "one fraction per site"),
        ("sites-zero", {"sites": 0}, ConfigError, "`sites` to be a positive integer"),
        ("seed", {"seed": -2}, ConfigError, "`seed`"),
    ],
)
def test_bad_input_is_one_clear_error(
    pool: Path, tmp_path: Path, case: str, kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    out = tmp_path / "out"
    kwargs = {"sites": 3, **kwargs}
    data = pool
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "no-labels":
        data = tmp_path / "bare"
        data.mkdir()
        (data / "x.dcm").write_bytes(b"")
    elif case in ("out-not-empty", "out-foreign-overwrite"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out-inside-data":
        out = pool / "sites"
    before = sorted(tmp_path.iterdir())
    with pytest.raises(error) as info:
        partition_folder(data, out, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert sorted(tmp_path.iterdir()) == before, "nothing written, no temporary folder left"
    assert not (pool / "sites").exists()
    if case.startswith("out-"):
        assert out.exists() == (case != "out-inside-data")


def test_overwrite_replaces_an_earlier_partition(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "sites"
    partition_folder(pool, out, sites=4, seed=0)
    with pytest.raises(ConfigError, match="overwrite=True"):
        partition_folder(pool, out, sites=2, seed=0)
    result = partition_folder(pool, out, sites=2, seed=0, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "site-001", "site-002"]
    assert sum(s.files for s in result.values()) == POOL_IMAGES
    assert [p.name for p in tmp_path.iterdir()] == ["sites"], "no temporary folder left"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(partition_folder(pool, empty, sites=2)) == 2


def test_a_failure_leaves_no_half_written_site(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = os.symlink

    def failing(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(28, "No space left on device")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(partition_module.os, "symlink", failing)
    with pytest.raises(OSError, match="No space"):
        partition_folder(pool, tmp_path / "sites", sites=3)
    assert list(tmp_path.iterdir()) == []
    # An earlier partition survives a failed overwrite untouched.
    monkeypatch.setattr(partition_module.os, "symlink", real)
    partition_folder(pool, tmp_path / "sites", sites=3)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(partition_module.os, "symlink", failing)
    with pytest.raises(OSError):
        partition_folder(pool, tmp_path / "sites", sites=2, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- #
# dirichlet_prevalences
# --------------------------------------------------------------------------- #


def test_dirichlet_prevalences_are_deterministic_and_clipped() -> None:
    first = dirichlet_prevalences(50, alpha=0.05, seed=3)
    assert first == dirichlet_prevalences(50, alpha=0.05, seed=3)
    assert first != dirichlet_prevalences(50, alpha=0.05, seed=4)
    assert len(first) == 50 and all(isinstance(p, float) for p in first)
    assert min(first) == 0.05 and max(first) == 0.95, "tiny alpha: extremes, clipped"
    assert all(0.05 <= p <= 0.95 for p in dirichlet_prevalences(200, alpha=1e-4))


def test_dirichlet_prevalences_spread_shrinks_with_alpha() -> None:
    spreads = [float(np.std(dirichlet_prevalences(200, alpha=a, seed=0))) for a in (0.3, 3, 300)]
    assert spreads[0] > spreads[1] > spreads[2]
    near = dirichlet_prevalences(200, alpha=1e5, base=0.3, seed=0)
    assert all(abs(p - 0.3) < 0.02 for p in near)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_sites": 3, "alpha": 0.0}, "`alpha`"),
        ({"n_sites": 3, "alpha": -1.0}, "`alpha`"),
        ({"n_sites": 3, "alpha": float("nan")}, "`alpha`"),
        ({"n_sites": 0, "alpha": 1.0}, "`n_sites`"),
        ({"n_sites": 3, "alpha": 1.0, "base": 1.0}, "`base`"),
        ({"n_sites": 3, "alpha": 1.0, "seed": -1}, "`seed`"),
    ],
)
def test_dirichlet_prevalences_bad_input(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match="^Expected") as info:
        dirichlet_prevalences(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
