"""Tests of ``client.data.dicom.decode_file`` against pydicom's own test files,
an independent pydicom + torch reference, re-encoded synthetic CT and broken files."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

import client.data.dicom.decode as decode_module
from client.data.dicom import DecodedFile, decode_file, hash_identifier
from common.config import PreprocessConfig
from common.errors import DicomRejected
from simulations.synth import synthesize

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PYDICOM_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
VOI_GREY = PreprocessConfig(window="voi", color="grey")
BRAIN = PreprocessConfig()
CONFIGS: dict[str, PreprocessConfig] = {"voi-grey": VOI_GREY, "brain": BRAIN}
# Hounsfield presets as documented (center, width), kept here so the reference is independent.
PRESETS = {"brain": (40.0, 80.0), "bone": (600.0, 2800.0), "lung": (-600.0, 1500.0)}
LUMA = np.array([0.299, 0.587, 0.114])


def _rel(path: Path) -> str:
    return path.relative_to(TEST_FILES).as_posix()


def _td(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not among the locally installed pydicom test files")
    return path


@cache
def _outcome(path: Path, config_name: str) -> DecodedFile | BaseException:
    """decode_file's result, or the exception it raised (cached: each file is decoded once)."""
    try:
        return decode_file(path, CONFIGS[config_name])
    except Exception as exc:  # noqa: BLE001 - test 1 re-raises anything that is not DicomRejected
        return exc


def _accepted(config_name: str, reader: str | None = None) -> list[Path]:
    return [
        p
        for p in PYDICOM_FILES
        if isinstance(out := _outcome(p, config_name), DecodedFile)
        and (reader is None or out.reader == reader)
    ]


# Every (file, config) pair by name only: the files are decoded inside the tests (once each,
# through ``_outcome``'s cache), never while pytest collects.
ALL_PARAMS = [pytest.param(p, c, id=f"{c}:{_rel(p)}") for c in CONFIGS for p in PYDICOM_FILES]


# ------------------------------------------------------------------ reference


def _reference_fit(unit: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving torch antialiased bilinear resize, centred on a zero canvas, → [-1, 1]."""
    rows, cols = unit.shape
    longer = max(rows, cols)
    out_rows, out_cols = max(1, round(rows * size / longer)), max(1, round(cols * size / longer))
    tensor = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None]
    if (out_rows, out_cols) != (rows, cols):
        tensor = F.interpolate(
            tensor, size=(out_rows, out_cols), mode="bilinear", antialias=True, align_corners=False
        )
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - out_rows) // 2, (size - out_cols) // 2
    canvas[top : top + out_rows, left : left + out_cols] = tensor[0, 0].numpy()
    return np.clip(canvas, 0.0, 1.0) * 2.0 - 1.0


def _reference_voi(modality: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's VOI LUT / window normalised by its output range; min-max without either."""
    values = np.asarray(modality, dtype=np.float64)
    if ds.get("VOILUTSequence"):
        out = apply_voi_lut(modality, ds, prefer_lut=True)
        low, high = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = apply_voi_lut(modality, ds, prefer_lut=True)
        bits = int(ds.BitsStored)
        if ds.get("ModalityLUTSequence"):
            low, high = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        elif int(ds.PixelRepresentation) == 0:
            low, high = 0.0, 2.0**bits - 1
        else:
            low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            low, high = sorted((low * slope + intercept, high * slope + intercept))
    else:
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return np.clip((np.asarray(out, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def _reference(
    ds: Dataset,
    config: PreprocessConfig,
    *,
    invert: bool = True,
    units: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(frames, S, S) reference inputs and the per-frame modality values (or luminance).

    ``units`` (if given) receives the per-frame [0, 1] display images before resizing.
    """
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    stack = pixels if frames > 1 else pixels[None]
    colour = int(ds.get("SamplesPerPixel", 1)) != 1
    palette = ds.PhotometricInterpretation == "PALETTE COLOR"
    images, values = [], []
    for frame in stack:
        if palette:
            rgb = apply_color_lut(frame, ds)
            unit = np.clip((rgb.astype(np.float64) @ LUMA) / np.iinfo(rgb.dtype).max, 0.0, 1.0)
            value = unit * (2.0 ** int(ds.BitsStored) - 1)
        elif colour:
            value = frame.astype(np.float64) @ LUMA
            unit = np.clip(value / (2.0 ** int(ds.BitsStored) - 1), 0.0, 1.0)
        else:
            modality = apply_modality_lut(frame, ds)
            value = np.asarray(modality, dtype=np.float64)
            if config.window == "voi":
                unit = _reference_voi(modality, ds)
                if invert and ds.PhotometricInterpretation == "MONOCHROME1":
                    unit = 1.0 - unit
            else:
                center, width = PRESETS[config.window]
                unit = np.clip((value - (center - width / 2)) / width, 0.0, 1.0)
        images.append(_reference_fit(unit, config.image_size))
        values.append(value)
        if units is not None:
            units.append(unit)
    return np.stack(images), values


def _check_shape(decoded: DecodedFile, config: PreprocessConfig) -> None:
    images = decoded.images
    size = config.image_size
    assert images.dtype == np.float32
    assert images.ndim == 4 and images.shape[1:] == (1, size, size)
    assert images.shape[0] == decoded.info.frames >= 1
    assert np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
    assert decoded.reader in ("light", "full")
    assert set(decoded.stats) == {"mean", "min", "max", "in_window"}
    assert all(np.isfinite(v) for v in decoded.stats.values())
    assert decoded.stats["min"] <= decoded.stats["mean"] <= decoded.stats["max"]
    assert 0.0 <= decoded.stats["in_window"] <= 1.0


def _force_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "read_light", lambda content: None)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One 64x64 CT slice per synthetic site: unsigned 12/16-bit and signed 16-bit encodings."""
    out = tmp_path_factory.mktemp("synth64")
    synthesize(out, sites=["A", "B", "C", "D"], images_per_site=3, seed=0, size=64)
    return [min((out / site).rglob("*.dcm")) for site in "ABCD"]


# ------------------------------------------------- 1-3: pydicom's test files


def _check_against_reference(path: Path, decoded: DecodedFile, config: PreprocessConfig) -> None:
    """An accepted pydicom test file: its header and images against pydicom + torch."""
    _check_shape(decoded, config)
    ds = pydicom.dcmread(path)
    info = decoded.info
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.modality == str(ds.get("Modality", "")).upper()
    assert info.photometric == ds.PhotometricInterpretation
    assert (info.rows, info.columns) == (ds.Rows, ds.Columns)
    assert info.frames == int(ds.get("NumberOfFrames") or 1)
    assert info.transfer_syntax == ds.file_meta.TransferSyntaxUID.name
    if ds.get("PixelSpacing"):
        assert info.pixel_spacing == pytest.approx(float(ds.PixelSpacing[0]))
    if config.window != "voi":
        assert info.modality == "CT"
    functional_groups = (
        "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    )
    if functional_groups:
        return  # shape and range only (checked above)
    units: list[np.ndarray] = []
    expected, values = _reference(ds, config, units=units)
    np.testing.assert_allclose(decoded.images[:, 0], expected, atol=1e-4, rtol=0)
    edge = 1e-5  # pixels this close to a window edge count as clipped
    inside = np.mean([np.mean((u > edge) & (u < 1.0 - edge)) for u in units])
    assert decoded.stats["in_window"] == pytest.approx(inside, abs=1e-9)
    assert decoded.stats["mean"] == pytest.approx(
        np.mean([v.mean() for v in values]), rel=1e-6, abs=1e-9
    )
    assert decoded.stats["min"] == pytest.approx(min(v.min() for v in values), rel=1e-9)
    assert decoded.stats["max"] == pytest.approx(max(v.max() for v in values), rel=1e-9)


@pytest.mark.parametrize(("path", "config_name"), ALL_PARAMS)
def test_pydicom_file_is_rejected_with_a_reason_or_matches_the_reference(
    path: Path, config_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pydicom test file under both configs: a one-line rejection reason, or (accepted)
    the independent reference's header and images, and, where the light reader took it, the
    full reader's result too."""
    config = CONFIGS[config_name]
    outcome = _outcome(path, config_name)
    if isinstance(outcome, DicomRejected):
        reason = str(outcome)
        assert reason.strip(), "empty rejection reason"
        assert "\n" not in reason and "\r" not in reason, f"reason is not one line: {reason!r}"
        return  # which files must be accepted: test_enough_pydicom_files_are_accepted
    if isinstance(outcome, BaseException):
        raise outcome  # anything but DicomRejected is a bug
    _check_against_reference(path, outcome, config)
    if outcome.reader == "light":
        _assert_readers_agree(path, config, monkeypatch)


def test_enough_pydicom_files_are_accepted() -> None:
    voi = _accepted("voi-grey")
    brain = _accepted("brain")
    assert len(voi) >= 60, [_rel(p) for p in voi]
    assert len(brain) >= 10, [_rel(p) for p in brain]
    assert set(brain) <= set(voi)
    assert {_outcome(p, "brain").info.modality for p in brain} == {"CT"}  # type: ignore[union-attr]
    # Both readers and many transfer syntaxes are exercised.
    assert {_outcome(p, "voi-grey").reader for p in voi} == {"light", "full"}  # type: ignore[union-attr]
    syntaxes = {_outcome(p, "voi-grey").info.transfer_syntax for p in voi}  # type: ignore[union-attr]
    assert len(syntaxes) >= 8, syntaxes


# (config, the reason's words) → pydicom test files rejected for it
KNOWN_REJECTIONS = {
    ("brain", 'window = "voi"'): ["MR_small.dcm"],
    ("voi-grey", "truncated"): ["MR_truncated.dcm"],
    ("voi-grey", "no pixel data"): ["dicomdirtests/DICOMDIR", "test-SR.dcm", "rtplan.dcm"],
    ("voi-grey", "not an image to classify"): ["rtdose.dcm", "liver_1frame.dcm"],
    ("voi-grey", "localizer"): ["dicomdirtests/98892001/CT2N/6293"],
    ("voi-grey", "not a DICOM file"): ["README.txt"],
    ("brain", "colour"): ["SC_rgb_jpeg.dcm", "examples_palette.dcm"],
    ("voi-grey", "cannot be decoded"): ["JPEG-lossy.dcm"],
}


@pytest.mark.parametrize(
    ("name", "config_name", "reason"),
    [(name, config_name, reason) for (config_name, reason), names in KNOWN_REJECTIONS.items() for name in names],
)
def test_known_pydicom_rejections(name: str, config_name: str, reason: str) -> None:
    path = _td(name)
    with pytest.raises(DicomRejected) as caught:
        decode_file(path, CONFIGS[config_name])
    assert reason in str(caught.value)


def test_ct_small_is_accepted_under_the_brain_window() -> None:
    decoded = decode_file(_td("CT_small.dcm"), BRAIN)
    assert decoded.info.modality == "CT"
    assert decoded.info.frames == 1 and decoded.images.shape == (1, 1, 64, 64)
    assert decoded.reader == "light"


def test_monochrome1_is_inverted_in_voi_mode() -> None:
    path = _td("dicomdirtests/77654033/CR1/6154")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    decoded = decode_file(path, VOI_GREY)
    plain, _ = _reference(ds, VOI_GREY, invert=False)
    # 1 - u in [0, 1] is -(2u - 1) in [-1, 1]; the resize is linear with weights summing to 1.
    np.testing.assert_allclose(decoded.images[:, 0], -plain, atol=1e-4)
    assert np.abs(decoded.images[:, 0] - plain).max() > 0.5  # the inversion is not a no-op here


def test_multiframe_colour_file_gives_one_input_per_frame() -> None:
    path = _td("examples_ybr_color.dcm")
    decoded = decode_file(path, VOI_GREY)
    assert decoded.info.frames == 30 and decoded.images.shape == (30, 1, 64, 64)
    assert not np.allclose(decoded.images[0], decoded.images[-1])
    reject = PreprocessConfig(window="voi", color="grey", multiframe="reject")
    with pytest.raises(DicomRejected, match="multi-frame"):
        decode_file(path, reject)
    with pytest.raises(DicomRejected, match='color = "grey"'):
        decode_file(path, PreprocessConfig(window="voi"))


# ----------------------------------------------------- 4: light vs full reader


def _assert_readers_agree(
    path: Path, config: PreprocessConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    light = decode_file(path, config)
    assert light.reader == "light"
    with monkeypatch.context() as patch:
        _force_full(patch)
        full = decode_file(path, config)
    assert full.reader == "full"
    assert light.info == full.info
    np.testing.assert_allclose(light.images, full.images, atol=1e-5, rtol=0)
    assert light.stats == pytest.approx(full.stats, rel=1e-6)


def test_light_reader_handles_enough_pydicom_files() -> None:
    light = [(p, c) for c in CONFIGS for p in _accepted(c, reader="light")]
    assert len(light) >= 30, [f"{c}:{_rel(p)}" for p, c in light]


@pytest.mark.parametrize(
    "config",
    [
        BRAIN,
        VOI_GREY,
        PreprocessConfig(window="bone", image_size=32),
        PreprocessConfig(window="lung", enhance="equalize"),
        PreprocessConfig(window="voi", enhance="denoise", image_size=48),
    ],
    ids=["brain", "voi", "bone-32", "lung-equalize", "voi-denoise-48"],
)
def test_light_and_full_readers_agree_on_synthetic_files(
    config: PreprocessConfig,
    synthetic: list[Path],
    tiny_sites: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = [
        *synthetic,
        min((tiny_sites / "A").rglob("*.dcm")),
        min((tiny_sites / "B").rglob("*.dcm")),
    ]
    for path in paths:
        _assert_readers_agree(path, config, monkeypatch)


@pytest.mark.parametrize("site", [0, 1], ids=["unsigned-12bit", "signed-16bit"])
def test_readers_agree_when_unused_high_bits_are_set(
    site: int, synthetic: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bits above BitsStored must be cleared (unsigned) or sign-extended (signed) like pydicom does."""
    ds = pydicom.dcmread(synthetic[site])
    raw = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    raw[:200] |= 0xF000
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelData = raw.tobytes()
    path = _save(ds, tmp_path / "highbits.dcm")
    for config in (BRAIN, VOI_GREY):
        _assert_readers_agree(path, config, monkeypatch)
        expected, _ = _reference(pydicom.dcmread(path), config)
        np.testing.assert_allclose(decode_file(path, config).images[:, 0], expected, atol=1e-4)


@pytest.mark.parametrize("signed", [0, 1], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits_stored", [8, 7])
def test_readers_agree_on_8bit_odd_sized_images(
    signed: int,
    bits_stored: int,
    synthetic: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8-bit pixels, odd Rows x Columns (pixel data padded to even length), non-square."""
    ds = pydicom.dcmread(synthetic[0])
    stored = (ds.pixel_array[:63, :41] >> 5).astype(np.int16) - (64 if signed else 0)
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        8,
        bits_stored,
        bits_stored - 1,
        signed,
    )
    ds.PixelData = stored.astype(np.int8 if signed else np.uint8).tobytes() + b"\0"
    ds["PixelData"].VR = "OB"
    ds.RescaleSlope, ds.RescaleIntercept = 32, -1024 + (64 * 32 if signed else 0)
    path = _save(ds, tmp_path / "eight.dcm")
    for config in (BRAIN, VOI_GREY):
        _assert_readers_agree(path, config, monkeypatch)
        expected, _ = _reference(pydicom.dcmread(path), config)
        np.testing.assert_allclose(decode_file(path, config).images[:, 0], expected, atol=1e-4)


def test_readers_agree_on_in_window_for_pixels_on_the_window_edges(
    synthetic: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(synthetic[1])  # signed 16-bit
    hu = np.arange(-1024.0, 3072.0)[: 64 * 64].reshape(64, 64)  # every HU once, edges included
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
    ds.PixelData = (hu + 1000).astype("<i2").tobytes()
    path = _save(ds, tmp_path / "edges.dcm")
    _assert_readers_agree(path, PreprocessConfig(window="bone"), monkeypatch)


# ------------------------------------------------ 5: re-encoded synthetic CT

_COMPRESSED = {
    "rle": dcm_uid.RLELossless,
    "jpeg-ls": dcm_uid.JPEGLSLossless,
    "j2k": dcm_uid.JPEG2000Lossless,
}


def _reencode(source: Path, kind: str, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    if kind in _COMPRESSED:
        from pydicom.pixels import get_encoder

        syntax = _COMPRESSED[kind]
        encoder = get_encoder(syntax)
        if not encoder.is_available:
            pytest.skip(f"no {syntax.name} encoder installed: {encoder.missing_dependencies}")
        ds.compress(syntax, generate_instance_uid=False)
        return _save(ds, out)
    if kind == "deflate":
        ds.file_meta.TransferSyntaxUID = dcm_uid.DeflatedExplicitVRLittleEndian
        return _save(ds, out)
    if kind == "implicit":
        ds.file_meta.TransferSyntaxUID = dcm_uid.ImplicitVRLittleEndian
        return _save(ds, out)
    assert kind == "big-endian"
    # dcmwrite does not byteswap OW data: swap the 16-bit pixel words ourselves.
    assert ds.BitsAllocated == 16 and ds["PixelData"].VR == "OW"
    ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = dcm_uid.ExplicitVRBigEndian
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out


_SYNTAX_NAMES = {
    "rle": "RLE Lossless",
    "jpeg-ls": "JPEG-LS Lossless Image Compression",
    "j2k": "JPEG 2000 Image Compression (Lossless Only)",
    "deflate": "Deflated Explicit VR Little Endian",
    "implicit": "Implicit VR Little Endian",
    "big-endian": "Explicit VR Big Endian",
}


@pytest.mark.parametrize("kind", list(_SYNTAX_NAMES))
def test_reencoded_synthetic_ct_decodes_like_the_original(
    kind: str, synthetic: list[Path], tmp_path: Path
) -> None:
    for index, source in enumerate(synthetic):
        path = _reencode(source, kind, tmp_path / f"{index}.dcm")
        # pydicom itself reads back the very same stored values.
        np.testing.assert_array_equal(
            pydicom.dcmread(path).pixel_array, pydicom.dcmread(source).pixel_array
        )
        for config in (BRAIN, VOI_GREY):
            original = decode_file(source, config)
            encoded = decode_file(path, config)
            assert encoded.info.transfer_syntax == _SYNTAX_NAMES[kind]
            assert replace(encoded.info, transfer_syntax="") == replace(
                original.info, transfer_syntax=""
            )
            np.testing.assert_allclose(encoded.images, original.images, atol=1e-5, rtol=0)
            assert encoded.stats == pytest.approx(original.stats, rel=1e-6)


# --------------------------------------------------------- 6: broken files


def _valid_bytes(synthetic: list[Path]) -> bytes:
    return synthetic[0].read_bytes()


def _broken_truncated(synthetic: list[Path], tmp: Path) -> Path:
    data = _valid_bytes(synthetic)
    (tmp / "half.dcm").write_bytes(data[: len(data) // 2])
    return tmp / "half.dcm"


def _broken_preamble(synthetic: list[Path], tmp: Path) -> Path:
    data = bytearray(_valid_bytes(synthetic))
    assert data[128:132] == b"DICM"
    data[128:132] = b"XXXX"
    (tmp / "preamble.dcm").write_bytes(bytes(data))
    return tmp / "preamble.dcm"


def _broken_garbage(synthetic: list[Path], tmp: Path) -> Path:
    (tmp / "garbage.dcm").write_bytes(np.random.default_rng(1234).bytes(4096))
    return tmp / "garbage.dcm"


def _broken_garbage_after_preamble(synthetic: list[Path], tmp: Path) -> Path:
    body = np.random.default_rng(99).bytes(2048)
    (tmp / "garbage2.dcm").write_bytes(b"\0" * 128 + b"DICM" + body)
    return tmp / "garbage2.dcm"


def _broken_empty(synthetic: list[Path], tmp: Path) -> Path:
    (tmp / "empty.dcm").write_bytes(b"")
    return tmp / "empty.dcm"


def _broken_no_pixels(synthetic: list[Path], tmp: Path) -> Path:
    ds = pydicom.dcmread(synthetic[0])
    del ds.PixelData
    return _save(ds, tmp / "nopixels.dcm")


def _broken_text(synthetic: list[Path], tmp: Path) -> Path:
    (tmp / "x.dcm").write_text("PatientID,label\nSYN-A-0001,1\n" * 20)
    return tmp / "x.dcm"


def _broken_directory(synthetic: list[Path], tmp: Path) -> Path:
    (tmp / "folder.dcm").mkdir()
    return tmp / "folder.dcm"


def _broken_missing(synthetic: list[Path], tmp: Path) -> Path:
    return tmp / "does-not-exist.dcm"


BROKEN: dict[str, tuple[Callable[[list[Path], Path], Path], str]] = {
    "truncated-half": (_broken_truncated, "truncated"),
    "wrong-preamble": (_broken_preamble, "not a DICOM file"),
    "garbage": (_broken_garbage, "not a DICOM file"),
    "garbage-after-DICM": (_broken_garbage_after_preamble, ""),
    "empty": (_broken_empty, "empty"),
    "no-pixel-data": (_broken_no_pixels, "no pixel data"),
    "text-file": (_broken_text, "not a DICOM file"),
    "directory": (_broken_directory, "not a regular file"),
    "missing": (_broken_missing, "cannot be read"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_is_rejected_with_a_reason(
    case: str, synthetic: list[Path], tmp_path: Path
) -> None:
    make, reason = BROKEN[case]
    path = make(synthetic, tmp_path)
    for config in (BRAIN, VOI_GREY):
        with pytest.raises(DicomRejected) as caught:
            decode_file(path, config)
        message = str(caught.value)
        assert message.strip() and "\n" not in message
        assert reason in message, message


def test_unreadable_file_is_rejected(
    synthetic: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.dcm"
    path.write_bytes(_valid_bytes(synthetic))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads mode-000 files: fail as for a site's user

            def denied(self: Path) -> bytes:
                raise PermissionError(13, "Permission denied", str(self))

            monkeypatch.setattr(Path, "read_bytes", denied)
        with pytest.raises(DicomRejected, match=r"^file cannot be read \(permission denied\)$"):
            decode_file(path, BRAIN)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("reader", ["light", "full"])
@pytest.mark.parametrize(
    "drop", [("RescaleSlope", "RescaleIntercept"), ("RescaleIntercept",)], ids=["both", "intercept"]
)
def test_ct_without_rescale_needs_voi(
    reader: str,
    drop: tuple[str, ...],
    synthetic: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stored values without Rescale Slope/Intercept are not Hounsfield units: no preset window."""
    ds = pydicom.dcmread(synthetic[0])
    for keyword in drop:
        delattr(ds, keyword)
    path = _save(ds, tmp_path / "norescale.dcm")
    if reader == "full":
        _force_full(monkeypatch)
    with pytest.raises(DicomRejected, match="Rescale"):
        decode_file(path, BRAIN)
    decoded = decode_file(path, VOI_GREY)
    assert decoded.reader == reader
    expected, _ = _reference(pydicom.dcmread(path), VOI_GREY)
    np.testing.assert_allclose(decoded.images[:, 0], expected, atol=1e-4)


def test_content_argument_is_used_instead_of_reading_the_path(
    synthetic: list[Path], tmp_path: Path
) -> None:
    from_path = decode_file(synthetic[1], BRAIN)
    from_bytes = decode_file(
        tmp_path / "never-written.dcm", BRAIN, content=synthetic[1].read_bytes()
    )
    assert from_bytes.info == from_path.info
    np.testing.assert_array_equal(from_bytes.images, from_path.images)


def test_truncated_compressed_file_says_truncated(tmp_path: Path) -> None:
    data = _td("MR_small_RLE.dcm").read_bytes()
    with pytest.raises(DicomRejected) as caught:
        decode_file(tmp_path / "x.dcm", VOI_GREY, content=data[: len(data) // 2])
    assert "truncated" in str(caught.value)


# ------------------------------------------------------------------ 7: privacy


def test_patient_id_is_hashed_never_kept_in_clear() -> None:
    path = _td("CT_small.dcm")
    patient_id = str(pydicom.dcmread(path).PatientID)
    assert len(patient_id) >= 3
    for config in (BRAIN, VOI_GREY):
        decoded = decode_file(path, config)
        assert patient_id not in repr(decoded.info) and patient_id not in repr(decoded.stats)
        assert decoded.info.patient_hash == hash_identifier(f"patient:{patient_id}")
        assert decoded.info.patient_id_missing is False


@pytest.mark.parametrize("reader", ["light", "full"])
@pytest.mark.parametrize("how", ["empty", "absent"])
def test_missing_patient_id_hashes_the_study(
    reader: str, how: str, synthetic: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(synthetic[0])
    if how == "empty":
        ds.PatientID = ""
    else:
        del ds.PatientID
    path = _save(ds, tmp_path / "anon.dcm")
    if reader == "full":
        _force_full(monkeypatch)
    decoded = decode_file(path, BRAIN)
    assert decoded.reader == reader
    assert decoded.info.patient_id_missing is True
    assert decoded.info.patient_hash == hash_identifier(f"study:{ds.StudyInstanceUID}")
    assert decoded.info.patient_hash != hash_identifier("patient:")


def _identifiers(path: Path) -> list[str]:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return [str(ds.get(k, "") or "") for k in ("PatientID", "PatientName")]
    except Exception:  # noqa: BLE001 - unreadable files carry no identifier we can check
        return []


def test_rejection_reasons_never_contain_patient_identifiers() -> None:
    checked = 0
    for path in PYDICOM_FILES:
        for config_name in CONFIGS:
            outcome = _outcome(path, config_name)
            if not isinstance(outcome, DicomRejected):
                continue
            for value in _identifiers(path):
                if len(value) >= 4:
                    checked += 1
                    assert value not in str(outcome), (_rel(path), str(outcome))
    assert checked >= 20


# --------------------------------------------- synthetic LUT / multi-frame cases


def _with_voi_lut(tmp_path: Path, photometric: str, depth: int) -> tuple[Path, Dataset]:
    ds = pydicom.dcmread(_td("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, depth]
    item.LUTData = [int(v) for v in np.round((2**depth - 1) * np.sqrt(np.linspace(0.0, 1.0, 4096)))]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    ds.PhotometricInterpretation = photometric
    return _save(ds, tmp_path / f"voilut-{photometric}-{depth}.dcm"), ds


@pytest.mark.parametrize("depth", [16, 12])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence_is_preferred_and_normalised_by_its_depth(
    photometric: str, depth: int, tmp_path: Path
) -> None:
    path, _ = _with_voi_lut(tmp_path, photometric, depth)
    decoded = decode_file(path, VOI_GREY)
    assert decoded.reader == "full"
    ds = pydicom.dcmread(path)
    expected, _ = _reference(ds, VOI_GREY)
    np.testing.assert_allclose(decoded.images[:, 0], expected, atol=1e-4)
    # The LUT, not the file's 600/1600 window, was used.
    del ds.VOILUTSequence
    windowed, _ = _reference(ds, VOI_GREY)
    assert np.abs(windowed - expected).max() > 0.1


def _enhanced_ct(
    sources: list[Path], tmp_path: Path
) -> tuple[Path, list[tuple[float, float, float]]]:
    """A 3-frame Enhanced CT with per-frame rescale intercept and window in functional groups."""
    stored = [pydicom.dcmread(p).pixel_array for p in sources]
    ds = pydicom.dcmread(sources[0])
    for keyword in (
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = len(stored)
    ds.PixelData = np.stack(stored).astype(stored[0].dtype.newbyteorder("<")).tobytes()
    shared = Dataset()
    transform = Dataset()
    transform.RescaleSlope = 1
    transform.RescaleIntercept = -1024
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = [(-1024.0, 40.0, 80.0), (-1000.0, 300.0, 1500.0), (-1100.0, -600.0, 1500.0)]
    per_frame = []
    for intercept, center, width in frames:
        group = Dataset()
        pvt = Dataset()
        pvt.RescaleSlope = 1
        pvt.RescaleIntercept = intercept
        pvt.RescaleType = "HU"
        group.PixelValueTransformationSequence = [pvt]
        voi = Dataset()
        voi.WindowCenter = center
        voi.WindowWidth = width
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return _save(ds, tmp_path / "enhanced.dcm"), frames


def test_enhanced_multiframe_uses_per_frame_functional_groups(
    synthetic: list[Path], tmp_path: Path
) -> None:
    site_a = sorted(synthetic[0].parent.glob("*.dcm"))
    path, frames = _enhanced_ct(site_a, tmp_path)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    assert stored.shape[0] == 3
    brain = decode_file(path, BRAIN)
    voi = decode_file(path, VOI_GREY)
    assert brain.reader == voi.reader == "full" and brain.info.frames == voi.info.frames == 3
    for index, (intercept, center, width) in enumerate(frames):
        hu = stored[index].astype(np.float64) + intercept
        unit = np.clip(hu / 80.0, 0.0, 1.0)  # brain: 40 / 80
        np.testing.assert_allclose(brain.images[index, 0], _reference_fit(unit, 64), atol=1e-4)
        view = Dataset()
        view.PhotometricInterpretation = "MONOCHROME2"
        view.BitsStored, view.PixelRepresentation = ds.BitsStored, ds.PixelRepresentation
        view.RescaleSlope, view.RescaleIntercept = 1, intercept
        view.WindowCenter, view.WindowWidth = center, width
        np.testing.assert_allclose(
            voi.images[index, 0], _reference_fit(_reference_voi(hu, view), 64), atol=1e-4
        )
    assert brain.stats["min"] == pytest.approx(
        min(float(stored[i].min()) + f[0] for i, f in enumerate(frames))
    )
    with pytest.raises(DicomRejected, match="multi-frame"):
        decode_file(path, PreprocessConfig(multiframe="reject"))


def test_empty_window_attributes_fall_back_to_min_max_in_both_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(_td("MR_small.dcm"))
    ds.WindowCenter = None
    ds.WindowWidth = None
    path = _save(ds, tmp_path / "empty-window.dcm")
    values = ds.pixel_array.astype(np.float64)
    expected = _reference_fit((values - values.min()) / (values.max() - values.min()), 64)
    light = decode_file(path, VOI_GREY)
    np.testing.assert_allclose(light.images[0, 0], expected, atol=1e-4)
    _force_full(monkeypatch)
    full = decode_file(path, VOI_GREY)
    np.testing.assert_allclose(full.images[0, 0], expected, atol=1e-4)


def _with_raw_attribute(
    tmp_path: Path, attribute: str, raw: bytes, **valid: object
) -> tuple[Path, Dataset]:
    """CT_small.dcm with the ``valid`` attributes set and ``attribute`` holding ``raw`` bytes as
    they are (no conversion on write); and the file without ``attribute``."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(_td("CT_small.dcm"))
    for keyword, value in valid.items():
        setattr(ds, keyword, value)
    clean = copy.deepcopy(ds)
    if attribute in clean:
        delattr(clean, attribute)
    tag = Tag(tag_for_keyword(attribute))
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    assert raw in path.read_bytes()  # the malformed value really is in the file
    return path, clean


@pytest.mark.parametrize(
    ("attribute", "raw"),
    [("RescaleSlope", b"abc"), ("RescaleSlope", b"1\\2"), ("RescaleIntercept", b"1,5")],
)
def test_malformed_attributes_are_rejected_not_raised(
    tmp_path: Path, attribute: str, raw: bytes
) -> None:
    """A Rescale value pydicom cannot convert fails deep inside numpy; decode_file turns it into
    its one-line rejection (never another exception, never an accepted file)."""
    path, _ = _with_raw_attribute(tmp_path, attribute, raw)
    for config in (BRAIN, VOI_GREY):
        with pytest.raises(DicomRejected) as caught:
            decode_file(path, config)
        # the numpy/pydicom exception's class name in brackets, nothing of the value itself
        message = str(caught.value)
        assert re.fullmatch(r"invalid image attributes or pixel data \(\w+\)", message), message


def _with_window(ds: Dataset) -> Dataset:
    """``ds`` with a usable 40/400 window."""
    out = copy.deepcopy(ds)
    out.WindowCenter, out.WindowWidth = 40, 400
    return out


@pytest.mark.parametrize(
    ("attribute", "other"),
    [("WindowWidth", {"WindowCenter": 40}), ("WindowCenter", {"WindowWidth": 400})],
)
def test_malformed_window_falls_back_to_min_max(
    tmp_path: Path, attribute: str, other: dict[str, object]
) -> None:
    """An unusable window is no reason to reject a file: VOI mode falls back to the value range
    (as with no window at all), and a preset window never reads the file's window."""
    path, clean = _with_raw_attribute(tmp_path, attribute, b"x", **other)
    voi = decode_file(path, VOI_GREY)
    assert voi.reader == "full"  # the light reader leaves an unparsable value to the full one
    expected, _ = _reference(clean, VOI_GREY)  # half a window: min-max of the modality values
    np.testing.assert_allclose(voi.images[:, 0], expected, atol=1e-4)
    windowed, _ = _reference(_with_window(clean), VOI_GREY)
    assert np.abs(windowed - expected).max() > 0.1  # a usable window would have changed it
    brain = decode_file(path, BRAIN)
    preset, _ = _reference(clean, BRAIN)
    np.testing.assert_allclose(brain.images[:, 0], preset, atol=1e-4)


def test_print_report_escapes_markup_in_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import print_report

    report = {
        "site": "A", "usable": False, "summary": "x", "files": {"seen": 1, "accepted": 0, "rejected": 1}, "images": 0,
        "labels": {"key": "path", "classes": {}, "unmatched_rows": {"count": 0}, "conflicting": {"count": 0},
                   "unknown_class": {"count": 0}, "empty_key": {"count": 0}},
        "patients": 0, "studies": 0, "series": 0, "modalities": {}, "manufacturers": {"ACME [/x] CT": 1},
        "transfer_syntaxes": {}, "photometric": {}, "image_sizes": {}, "pixel_spacing_mm": {}, "intensity": {},
        "split": {"train": {}, "validation": {}}, "cache": {"decoded": 0, "reused": 0},
        "rejections": [{"reason": "empty file (0 bytes)", "count": 1, "files": ["scan[/b].dcm"]}],
        "warnings": [], "problems": ["no accepted labelled image"],
    }
    print_report(report)
    out = capsys.readouterr().out
    assert "scan[/b].dcm" in out and "ACME [/x] CT" in out
