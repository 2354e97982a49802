"""Tests for fl-synth (simulations.synth)."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from simulations.partition import dirichlet_prevalences
from simulations.synth import (
    CT_IMAGE_STORAGE,
    LABELS_FILENAME,
    SiteSpec,
    SiteSummary,
    SynthConfigError,
    app,
    site_profile,
    synthesize,
    synthesize_sites,
)

SITES = ("A", "B", "C")
N = 40
SIZE = 64
SEED = 3
REPO = Path(__file__).resolve().parents[2]

REQUIRED_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "PatientID", "PatientName", "PatientSex", "PatientAge",
    "StudyDate", "Modality", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "BodyPartExamined", "SliceThickness", "PixelSpacing", "ImagePositionPatient",
    "ImageOrientationPatient", "InstanceNumber", "SliceLocation", "KVP", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PhotometricInterpretation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "WindowCenter", "WindowWidth", "PixelData",
)


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _labels(site_dir: Path) -> dict[str, int]:
    with (site_dir / LABELS_FILENAME).open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["SOPInstanceUID", "label"]
        rows = list(reader)
    labels = {uid: int(label) for uid, label in rows}
    assert len(labels) == len(rows), "duplicate SOPInstanceUID in labels.csv"
    return labels


def _hyperdense_pixels(hu: np.ndarray) -> float:
    """Count blood-like pixels (55-120 HU) with neither bone nor air within 3 pixels."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(hu, 3, mode="edge"), (7, 7))
    interior = (windows.max(axis=(-1, -2)) < 300) & (windows.min(axis=(-1, -2)) > -200)
    return float(((hu > 55) & (hu < 120) & interior).sum())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SiteSummary]]:
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(out, sites=SITES, images_per_site=N, seed=SEED, size=SIZE)


@pytest.fixture(scope="module")
def slices(dataset: tuple[Path, dict[str, SiteSummary]]) -> dict[str, list[pydicom.Dataset]]:
    out, _ = dataset
    return {
        site: [pydicom.dcmread(path) for path in sorted((out / site).rglob("*.dcm"))]
        for site in SITES
    }


def test_files_are_valid_ct_image_storage(slices: dict[str, list[pydicom.Dataset]]) -> None:
    for datasets in slices.values():
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
            assert not missing
            assert ds.SOPClassUID == CT_IMAGE_STORAGE
            assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
            assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
            assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
            assert ds.HighBit == ds.BitsStored - 1
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
            assert ds.RescaleType == "HU"
            assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
            assert ds.pixel_array.shape == (SIZE, SIZE)


def test_hu_values_are_plausible(slices: dict[str, list[pydicom.Dataset]]) -> None:
    for datasets in slices.values():
        for ds in datasets:
            hu = _hu(ds)
            corner = hu[:4, :4]
            assert -1040 < corner.mean() < -960, "air should be about -1000 HU"
            centre = hu[SIZE // 2 - 6 : SIZE // 2 + 6, SIZE // 2 - 6 : SIZE // 2 + 6]
            assert 0 < np.median(centre) < 80, "brain should be 0-80 HU"
            assert hu.max() > 700, "skull should be bone"
            assert -1024 <= hu.min() and hu.max() <= 3071


def test_pixel_encodings_differ_between_sites(slices: dict[str, list[pydicom.Dataset]]) -> None:
    encodings = {
        site: (datasets[0].PixelRepresentation, float(datasets[0].RescaleIntercept))
        for site, datasets in slices.items()
    }
    assert encodings["A"] == (0, -1024.0)
    assert encodings["B"][0] == 1 and encodings["B"][1] in (0.0, -1000.0)
    for site, datasets in slices.items():
        for ds in datasets:
            stored = ds.pixel_array
            if ds.PixelRepresentation == 0:
                assert stored.dtype.kind == "u" and stored.max() < 2**ds.BitsStored
            else:
                assert stored.dtype.kind == "i"
            assert (ds.PixelRepresentation, float(ds.RescaleIntercept)) == encodings[site]


def test_counts_patients_and_series(
    dataset: tuple[Path, dict[str, SiteSummary]], slices: dict[str, list[pydicom.Dataset]]
) -> None:
    _, summaries = dataset
    assert list(summaries) == list(SITES)
    for site, datasets in slices.items():
        assert len(datasets) == N == summaries[site].files
        by_patient: dict[str, list[pydicom.Dataset]] = defaultdict(list)
        for ds in datasets:
            by_patient[ds.PatientID].append(ds)
        assert len(by_patient) == summaries[site].patients
        sizes = sorted(len(v) for v in by_patient.values())
        assert all(3 <= n <= 8 for n in sizes[1:]), "all but the last patient have 3-8 slices"
        assert 1 <= sizes[0] <= 8
        for patient_slices in by_patient.values():
            assert len({ds.StudyInstanceUID for ds in patient_slices}) == 1
            assert len({ds.SeriesInstanceUID for ds in patient_slices}) == 1
            ordered = sorted(patient_slices, key=lambda ds: int(ds.InstanceNumber))
            assert [int(ds.InstanceNumber) for ds in ordered] == list(range(1, len(ordered) + 1))
            z = np.array([float(ds.ImagePositionPatient[2]) for ds in ordered])
            assert np.allclose(np.diff(z), float(ordered[0].SliceThickness), atol=1e-3)
            assert np.allclose(z, [float(ds.SliceLocation) for ds in ordered])


def test_uids_are_unique(slices: dict[str, list[pydicom.Dataset]]) -> None:
    every = [ds for datasets in slices.values() for ds in datasets]
    assert len({ds.SOPInstanceUID for ds in every}) == len(every)
    patients = {(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in every}
    assert len({p[0] for p in patients}) == len({p[1] for p in patients}) == len(
        {p[2] for p in patients}
    ) == len(patients)
    for uid in {ds.SOPInstanceUID for ds in every} | {p[1] for p in patients}:
        assert uid.is_valid and uid.startswith("2.25.")


def test_labels_match_files_and_pixels(
    dataset: tuple[Path, dict[str, SiteSummary]], slices: dict[str, list[pydicom.Dataset]]
) -> None:
    out, summaries = dataset
    pooled: list[int] = []
    bright: dict[int, list[float]] = {0: [], 1: []}
    for site, datasets in slices.items():
        labels = _labels(out / site)
        assert set(labels) == {ds.SOPInstanceUID for ds in datasets}
        assert set(labels.values()) <= {0, 1}
        assert sum(labels.values()) == summaries[site].positives
        pooled += labels.values()
        by_patient: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for ds in datasets:
            label = labels[ds.SOPInstanceUID]
            by_patient[ds.PatientID].append((int(ds.InstanceNumber), label))
            hu = _hu(ds)
            bright[label].append(_hyperdense_pixels(hu))
        for rows in by_patient.values():
            positive = [n for n, label in sorted(rows) if label]
            if positive:  # a lesion spans consecutive slices
                assert positive == list(range(positive[0], positive[0] + len(positive)))
    assert 0 < sum(pooled) < len(pooled), "both classes present"
    # Lesion slices hold many more hyperdense (blood-like) pixels than the others.
    assert np.mean(bright[1]) > 4 * np.mean(bright[0]) + 10


def test_same_seed_same_bytes_different_seed_different(
    tmp_path: Path, dataset: tuple[Path, dict[str, SiteSummary]]
) -> None:
    out, summaries = dataset
    again = synthesize(tmp_path / "same", sites=["B"], images_per_site=N, seed=SEED, size=SIZE)
    assert again["B"] == summaries["B"]
    synthesize(tmp_path / "other", sites=["B"], images_per_site=N, seed=SEED + 1, size=SIZE)
    first = sorted(p.relative_to(out) for p in (out / "B").rglob("*") if p.is_file())
    same = tmp_path / "same"
    second = sorted(p.relative_to(same) for p in (same / "B").rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (out / rel).read_bytes() == (tmp_path / "same" / rel).read_bytes()

    other_labels = _labels(tmp_path / "other" / "B")
    assert not set(other_labels) & set(_labels(out / "B")), "new seed gives new UIDs"
    a = pydicom.dcmread(out / "B" / "SYN-B-0001" / "SE001" / "IM0001.dcm")
    b = pydicom.dcmread(tmp_path / "other" / "B" / "SYN-B-0001" / "SE001" / "IM0001.dcm")
    assert a.PixelData != b.PixelData


def test_sites_differ_like_scanners(slices: dict[str, list[pydicom.Dataset]]) -> None:
    manufacturers = {site: {ds.Manufacturer for ds in ds_list} for site, ds_list in slices.items()}
    assert all(len(m) == 1 for m in manufacturers.values())
    assert len({next(iter(m)) for m in manufacturers.values()}) == len(SITES)
    spacings = {float(ds_list[0].PixelSpacing[0]) for ds_list in slices.values()}
    assert len(spacings) == len(SITES)
    # Noise measured in the air around the head (pure noise there).
    noise = {
        site: float(np.median([_hu(ds)[:6, :6].std() for ds in ds_list]))
        for site, ds_list in slices.items()
    }
    assert noise["A"] < noise["B"] < noise["C"]
    assert noise["C"] > 1.8 * noise["A"]


def test_unknown_site_names_get_a_stable_profile(tmp_path: Path) -> None:
    profile = site_profile("hospital-x_7")
    assert profile == site_profile("hospital-x_7")
    assert profile != site_profile("hospital-y_7")
    assert 0.40 * 512 <= profile.fov_mm <= 0.50 * 512
    summary = synthesize(tmp_path, sites=["hospital-x_7"], images_per_site=5, size=32)
    assert summary["hospital-x_7"].files == 5
    ds = pydicom.dcmread(next((tmp_path / "hospital-x_7").rglob("*.dcm")))
    assert ds.Manufacturer == profile.manufacturer


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"images_per_site": 0}, "--images-per-site"),
        ({"sites": []}, "--sites"),
        ({"sites": ["A", "a"]}, "distinct"),
        ({"sites": ["A", "A"]}, "distinct"),
        ({"sites": ["A/B"]}, "site names"),
        ({"sites": ["x" * 33]}, "at most"),
        ({"size": 15}, "--size"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_invalid_input_raises(tmp_path: Path, kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"sites": ["A"], "images_per_site": 3, "seed": 0, "size": 32}
    args.update(kwargs)
    with pytest.raises(SynthConfigError, match="Expected") as info:
        synthesize(tmp_path, **args)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing is written for invalid input"


def test_refuses_non_empty_site_folder_unless_overwrite(tmp_path: Path) -> None:
    synthesize(tmp_path, sites=["A"], images_per_site=4, size=32)
    with pytest.raises(SynthConfigError, match="--overwrite"):
        synthesize(tmp_path, sites=["A"], images_per_site=4, size=32)
    summary = synthesize(tmp_path, sites=["A"], images_per_site=3, size=32, overwrite=True)
    assert summary["A"].files == len(list((tmp_path / "A").rglob("*.dcm"))) == 3
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "precious.txt").write_text("not ours")
    with pytest.raises(SynthConfigError, match="fl-synth output"):
        synthesize(tmp_path, sites=["B"], images_per_site=3, size=32, overwrite=True)
    assert (tmp_path / "B" / "precious.txt").exists()


def test_cli_success(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--sites", "A,B", "--images-per-site", "7", "--out", str(tmp_path), "--size", "32"]
    )
    assert result.exit_code == 0, result.output
    for site in ("A", "B"):
        assert len(list((tmp_path / site).rglob("*.dcm"))) == 7
        assert site in result.stdout
    assert "GE MEDICAL SYSTEMS" in result.stdout and "SIEMENS" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--sites", "A,B", "--images-per-site", "0"],
        ["--sites", "A,A", "--images-per-site", "3"],
        ["--sites", "", "--images-per-site", "3"],
        ["--sites", "A,,B", "--images-per-site", "3"],
        ["--sites", "A", "--images-per-site", "three"],
        ["--sites", "A", "--images-per-site", "3", "--size", "8"],
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Expected")
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.output


def test_cli_out_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    args = ["--sites", "A", "--images-per-site", "2", "--out", str(target)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Expected --out to be a folder")


@pytest.mark.parametrize(
    "args",
    [
        ["--sites", "A", "--images-per-site", "-1", "--out", "{out}"],
        ["--images-per-site", "3", "--out", "{out}"],  # missing --sites
    ],
)
def test_module_entry_point_bad_input(tmp_path: Path, args: list[str]) -> None:
    argv = [a.format(out=tmp_path / "out") for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.synth", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr + proc.stdout


def test_module_entry_point_success(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.synth", "--sites", "D", "--images-per-site", "4",
         "--out", str(tmp_path), "--size", "32", "--seed", "9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TOSHIBA" in proc.stdout
    assert len(list((tmp_path / "D").rglob("*.dcm"))) == 4


# --------------------------------------------------------------------------- #
# synthesize_sites: per-site specs, parallel writing, the fast encoder
# --------------------------------------------------------------------------- #


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _patient_positive_fraction(site_dir: Path) -> float:
    labels = _labels(site_dir)
    positive: dict[str, bool] = {}
    for path in site_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        positive[ds.PatientID] = positive.get(ds.PatientID, False) or bool(
            labels[ds.SOPInstanceUID]
        )
    return sum(positive.values()) / len(positive)


def test_site_specs_set_images_prevalence_and_scanner(tmp_path: Path) -> None:
    specs = [
        SiteSpec("few", 5, scanner="PHILIPS"),
        SiteSpec("high", 120, prevalence=0.9),
        SiteSpec("low", 120, prevalence=0.1, scanner="Ge"),
        SiteSpec("D", 7),
    ]
    summaries = synthesize_sites(tmp_path, specs, seed=2, size=16)
    assert list(summaries) == ["few", "high", "low", "D"]
    for spec in specs:
        files = sorted((tmp_path / spec.name).rglob("*.dcm"))
        assert len(files) == spec.images == summaries[spec.name].files
        assert len(_labels(tmp_path / spec.name)) == spec.images
    # Scanner override: manufacturer, model, kernel and encoding; the rest is the site's own.
    own = site_profile("few")
    ds = pydicom.dcmread(next((tmp_path / "few").rglob("*.dcm")))
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel) == (
        "Philips", "Brilliance 64", "UB"
    )
    assert (ds.PixelRepresentation, ds.BitsStored, float(ds.RescaleIntercept)) == (0, 16, -1024.0)
    assert float(ds.PixelSpacing[0]) == pytest.approx(own.fov_mm / 16, abs=1e-5)
    assert float(ds.SliceThickness) == own.slice_thickness_mm
    low = pydicom.dcmread(next((tmp_path / "low").rglob("*.dcm")))
    assert low.Manufacturer == "GE MEDICAL SYSTEMS" and low.PixelRepresentation == 0
    assert float(low.RescaleIntercept) == -1024.0
    assert pydicom.dcmread(next((tmp_path / "D").rglob("*.dcm"))).Manufacturer == "TOSHIBA"
    # Prevalence override: the share of patients with a lesion follows it.
    assert _patient_positive_fraction(tmp_path / "high") > 0.7
    assert _patient_positive_fraction(tmp_path / "low") < 0.3
    assert summaries["high"].positives > 3 * summaries["low"].positives


def test_site_profile_overrides_keep_the_rest() -> None:
    for name in ("A", "hospital-x_7"):
        own = site_profile(name)
        other = site_profile(name, scanner="toshiba", prevalence=0.2)
        assert (other.manufacturer, other.model, other.kernel) == (
            "TOSHIBA", "Aquilion ONE", "FC26"
        )
        assert other.prevalence == 0.2
        keep = ("fov_mm", "slice_thickness_mm", "noise_hu", "hu_offset", "kvp", "institution")
        assert all(getattr(other, f) == getattr(own, f) for f in keep)
    assert site_profile("A", scanner="GE") == site_profile("A")


def test_synthesize_is_synthesize_sites(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", sites=["A", "site-9"], images_per_site=6, seed=4, size=16)
    synthesize_sites(
        tmp_path / "b", [SiteSpec("A", 6), SiteSpec("site-9", 6)], seed=4, size=16
    )
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")


def test_workers_write_the_same_bytes(tmp_path: Path) -> None:
    specs = [
        SiteSpec("A", 6),
        SiteSpec("B", 4, prevalence=0.8),
        SiteSpec("x-1", 5, scanner="siemens"),
        SiteSpec("x-2", 3),
    ]
    one = synthesize_sites(tmp_path / "one", specs, seed=7, size=16)
    two = synthesize_sites(tmp_path / "two", specs, seed=7, size=16, workers=2)
    assert one == two and list(two) == [s.name for s in specs]
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def test_fast_encoder_writes_what_save_as_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file is byte for byte what ``Dataset.save_as(enforce_file_format=True)`` writes."""
    import io

    from simulations.synth import write

    class SaveAs:
        def __init__(self, ds: pydicom.Dataset) -> None:
            pass

        def encode(self, ds: pydicom.Dataset) -> bytes:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            return buffer.getvalue()

    specs = [SiteSpec(name, 9) for name in ("A", "B", "C", "D", "odd_1")]
    synthesize_sites(tmp_path / "fast", specs, seed=11, size=17)
    monkeypatch.setattr(write, "_SeriesEncoder", SaveAs)
    synthesize_sites(tmp_path / "slow", specs, seed=11, size=17)
    fast, slow = _tree_bytes(tmp_path / "fast"), _tree_bytes(tmp_path / "slow")
    assert len(fast) == 5 * 10 and fast == slow


@pytest.mark.parametrize(
    ("specs", "kwargs", "fragment"),
    [
        ([], {}, "at least one"),
        (["A"], {}, "SiteSpec objects"),
        ([SiteSpec("A", 0)], {}, "`images` of site A"),
        ([SiteSpec("A", 2, prevalence=1.5)], {}, "`prevalence` of site A to be between 0 and 1"),
        ([SiteSpec("A", 2, prevalence=0.0)], {}, "`prevalence` of site A"),
        ([SiteSpec("A", 2, prevalence=True)], {}, "`prevalence` of site A"),
        ([SiteSpec("A", 2, scanner="canon")], {}, "`scanner` of site A to be one of ge, siemens"),
        ([SiteSpec("A", 2), SiteSpec("a", 2)], {}, "distinct"),
        ([SiteSpec("A/B", 2)], {}, "site names"),
        ([SiteSpec("A", 2)], {"workers": 0}, "`workers`"),
        ([SiteSpec("A", 2)], {"size": 8}, "`size`"),
        ([SiteSpec("A", 2)], {"seed": -1}, "`seed`"),
    ],
)
def test_invalid_specs_raise(
    tmp_path: Path, specs: list[object], kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(SynthConfigError, match="^Expected") as info:
        synthesize_sites(tmp_path, specs, **{"size": 16, **kwargs})  # type: ignore[arg-type]
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing is written for invalid input"


def test_synthetic_label_skew_with_dirichlet_prevalences(tmp_path: Path) -> None:
    prevalences = dirichlet_prevalences(3, alpha=0.2, seed=1)
    specs = [SiteSpec(f"s{i}", 3, prevalence=p) for i, p in enumerate(prevalences)]
    summaries = synthesize_sites(tmp_path, specs, size=16)
    assert [s.files for s in summaries.values()] == [3, 3, 3]
