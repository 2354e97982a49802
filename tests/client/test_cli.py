"""fl-client --check: the data settings come from the kit (the coordinator's), -c overrides, an old kit still works."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.cli import main
from client.data.cache import cache_dir
from common.config import PreprocessConfig
from common.kit import KIT_FILE, read_kit_toml, render_kit_toml
from server.enroll import Consortium

DEFAULTS = PreprocessConfig()


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    """Site A's kit from a coordinator that enrolled it with its run's data settings."""
    consortium = Consortium(tmp_path / "coordinator")
    return consortium.enroll("A", server_address="127.0.0.1:9092", data={"image-size": 32, "window": "voi"})


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``fl-client ARGS --check`` in-process; its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--check", "--workers", "1"])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def _check_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = _check(capsys, *args, "--json")
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def _sources(report: dict[str, Any]) -> dict[str, str]:
    return {key: setting["from"] for key, setting in report["settings"].items()}


def test_check_with_a_kit_caches_with_the_coordinators_settings(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "site-A"
    report = _check_json(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"), "--workdir", str(work))
    expected = PreprocessConfig(image_size=32, window="voi")
    assert report["preprocess"] == expected.key()
    assert (cache_dir(work, expected) / "images.npy").is_file()
    assert not cache_dir(work, DEFAULTS).exists()
    assert report["settings"]["image-size"] == {"value": 32, "from": "kit"}
    assert report["settings"]["window"] == {"value": "voi", "from": "kit"}
    assert set(_sources(report).values()) == {"kit"}  # the kit carries every data setting


def test_run_config_overrides_the_kit(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "site-A"
    report = _check_json(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"), "--workdir", str(work),
                         "-c", "image-size=48 seed=7")
    assert report["preprocess"] == PreprocessConfig(image_size=48, window="voi").key()
    assert report["settings"]["image-size"] == {"value": 48, "from": "-c"}
    assert report["settings"]["seed"] == {"value": 7, "from": "-c"}
    assert _sources(report)["window"] == "kit"


def test_a_kit_without_data_settings_checks_with_the_defaults(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (kit / KIT_FILE).write_text(render_kit_toml(read_kit_toml(kit / KIT_FILE)))  # as kits were written before
    work = tmp_path / "site-A"
    report = _check_json(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"), "--workdir", str(work))
    assert report["preprocess"] == DEFAULTS.key()
    assert set(_sources(report).values()) == {"default"}
    assert report["settings"]["image-size"]["value"] == DEFAULTS.image_size


def test_without_a_kit_run_config_and_defaults_as_before(
    tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _check_json(capsys, "--site", "B", "--data", str(tiny_sites / "B"), "--workdir", str(tmp_path / "w"),
                         "-c", "image-size=32")
    assert report["preprocess"] == PreprocessConfig(image_size=32).key()
    assert _sources(report) == {"image-size": "-c"} | {k: "default" for k in report["settings"] if k != "image-size"}


def test_the_printed_report_says_which_settings_and_where_from(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _check(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"), "--workdir", str(tmp_path / "w"),
                          "-c", "seed=3")
    assert code == 0
    text = " ".join(out.split())  # rich may wrap the row
    assert 'image-size=32 window="voi"' in text and "(the kit)" in text and "seed=3 (-c)" in text


@pytest.mark.parametrize(("table", "message"), [
    ('window = "liver"', "Expected `window` to be one of brain, subdural, bone, lung, soft-tissue, voi, "
                         "but got 'liver'"),
    ('image-size = "big"', "Expected `image-size` to be an integer, but got 'big'"),
])
def test_a_bad_value_in_the_kit_is_one_error_line(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, message: str
) -> None:
    key = table.split(" =")[0]
    text = (kit / KIT_FILE).read_text()
    lines = [table if line.startswith(f"{key} =") else line for line in text.splitlines()]
    (kit / KIT_FILE).write_text("\n".join(lines) + "\n")
    code, out, err = _check(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"),
                            "--workdir", str(tmp_path / "w"))
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{kit / KIT_FILE} [data]: {message}; ask the coordinator for a new kit" in err
    assert not (tmp_path / "w").exists()


def test_an_unknown_run_config_key_is_still_refused(
    kit: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _check(capsys, "--kit", str(kit), "--data", str(tiny_sites / "A"), "--workdir", str(tmp_path / "w"),
                          "-c", "batch-size=8")
    assert code != 0
    assert "error: Expected `--run-config` keys among image-size, window, multiframe" in err and "batch-size" in err
