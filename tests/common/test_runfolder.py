"""The run-folder schema: names on disk pinned (old run folders must load), checkpoints listed by round."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.runfolder import PLOT_FILES, RunFolder, checkpoint_round


def test_file_names_on_disk_never_change(tmp_path: Path) -> None:
    folder = RunFolder.of(tmp_path, 42)
    run = tmp_path / "runs" / "42"
    assert folder.path == run and folder.workdir == tmp_path
    assert (folder.report_json, folder.report_md, folder.state) == (
        run / "report.json", run / "report.md", run / "state.json")
    assert folder.checkpoints == run / "checkpoints"
    assert folder.checkpoint(7) == run / "checkpoints" / "round-0007.safetensors"
    assert folder.checkpoint(12345) == run / "checkpoints" / "round-12345.safetensors"
    assert PLOT_FILES == ("auroc.png", "epsilon.png", "participation.png")
    assert [folder.plot(name) for name in PLOT_FILES] == [run / name for name in PLOT_FILES]
    with pytest.raises(ValueError, match="report.json"):
        folder.plot("report.json")
    assert RunFolder(tmp_path / "elsewhere" / "42").workdir is None  # not <workdir>/runs/<run-id>


def test_saved_checkpoints_are_the_round_files_in_round_order(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert folder.saved_checkpoints() == {}  # no checkpoints/ folder yet
    for r in (2, 12345, 9999, 1):  # 12345 sorts before 9999 as text
        folder.checkpoint(r).parent.mkdir(exist_ok=True)
        folder.checkpoint(r).write_bytes(b"w")
    for decoy in ("round-0003.safetensors.tmp", ".round-0004.safetensors.x1y2.tmp", "round-x.safetensors",
                  "round-0005.pt", "notes.txt"):
        (folder.checkpoints / decoy).write_bytes(b"")
    (folder.checkpoints / "round-0006.safetensors").mkdir()  # a folder is not a checkpoint
    saved = folder.saved_checkpoints()
    assert list(saved) == [1, 2, 9999, 12345]
    assert saved == {r: folder.checkpoint(r) for r in (1, 2, 9999, 12345)}


def test_a_checkpoint_file_knows_its_round_and_run_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "runs" / "7")
    assert checkpoint_round(folder.checkpoint(3)) == 3
    assert checkpoint_round(Path("copied/round-0012.safetensors")) == 12
    assert [checkpoint_round(Path(n)) for n in ("round-3.pt", "final.safetensors", "round-.safetensors")] == [None] * 3
    assert RunFolder.of_checkpoint(folder.checkpoint(3)).path == folder.path.resolve()


def test_run_folders_of_a_workdir_oldest_first(tmp_path: Path) -> None:
    assert RunFolder.in_workdir(tmp_path) == []  # no runs/ yet
    for i, run_id in enumerate(("300", "100", "200")):
        RunFolder.of(tmp_path, run_id).path.mkdir(parents=True)
        os.utime(RunFolder.of(tmp_path, run_id).path, (1000 + i, 1000 + i))
    (tmp_path / "runs" / "stray.txt").write_text("")
    assert [f.path.name for f in RunFolder.in_workdir(tmp_path)] == ["300", "100", "200"]


def test_report_and_state_are_read_as_json_objects(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    with pytest.raises(FileNotFoundError):
        folder.read_report()
    folder.report_json.write_text(json.dumps({"run_id": 5, "rounds": []}))
    folder.state.write_text(json.dumps({"completed_round": 2}))
    assert folder.read_report() == {"run_id": 5, "rounds": []} and folder.read_state() == {"completed_round": 2}
    folder.state.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        folder.read_state()
    folder.report_json.write_text("{broken")
    with pytest.raises(ValueError):
        folder.read_report()
