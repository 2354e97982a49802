"""``fl-predict``: same ingest as training, scores equal to the model's, one line per bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from client.data.dataset import load_site_data
from client.data.dicom import decode_file
from client.predict import main
from common.config import RunConfig
from common.errors import DicomRejected
from common.models import build_model
from server.app.checkpoint import (
    annotate_checkpoint,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    threshold_metadata,
)

BINARY = {"model": "fedrad-cnn", "image-size": 32, "window": "brain", "classes": "0,1", "seed": 0}
MULTI = {"model": "fedrad-cnn", "image-size": 32, "window": "voi", "color": "grey", "classes": "a,b,c"}
BAD_FILES = {  # relative path → the ingest's reason (checked against training below, not only these words)
    "extra/notes.txt": "not a DICOM file",
    "extra/MR_small.dcm": "needs CT Hounsfield units",
    "extra/empty.dcm": "empty file",
}


def _metadata(config: dict[str, object], server_round: int) -> dict[str, str]:
    return {"run-id": "42", "round": str(server_round), "run-config": json.dumps(config)}


def _save(run_dir: Path, server_round: int, config: dict[str, object], *, seed: int, with_config: bool = True) -> Path:
    run = RunConfig.from_flower(config)
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=seed)
    metadata = _metadata(config, server_round) if with_config else {"run-id": "42", "round": str(server_round)}
    return save_checkpoint(checkpoint_path(run_dir, server_round), model.state_dict(), metadata=metadata)


def _state(checkpoint: str | None, config: dict[str, object]) -> dict[str, object]:
    """``state.json`` as the coordinator writes it after a completed round (server/app/resume.py)."""
    return {"run_id": "42", "completed_round": 1 if checkpoint else 0, "num_rounds": 2, "checkpoint": checkpoint,
            "run_config": config, "format": "fedrad-coordinator-1"}


def _write_report(run_dir: Path, config: dict[str, object]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps({"run_id": 42, "config": config, "rounds": []}))


@pytest.fixture(scope="module")
def site(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Site A's 40 synthetic CT slices (labels.csv included), CT_small.dcm and three files training rejects."""
    target = tmp_path_factory.mktemp("predict-site") / "A"
    shutil.copytree(tiny_sites / "A", target)
    (target / "extra").mkdir()
    (target / "extra/notes.txt").write_text("not an image\n")
    shutil.copy(get_testdata_file("MR_small.dcm"), target / "extra/MR_small.dcm")
    (target / "extra/empty.dcm").write_bytes(b"")
    shutil.copy(get_testdata_file("CT_small.dcm"), target / "extra/CT_small.dcm")
    return target


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with report.json and two checkpoints of different weights."""
    folder = tmp_path_factory.mktemp("run") / "runs" / "42"
    _write_report(folder, BINARY)
    _save(folder, 1, BINARY, seed=1)
    _save(folder, 2, BINARY, seed=2)
    return folder


def _run(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def _predict(capsys: pytest.CaptureFixture[str], model: Path, data: Path, out: Path, *extra: object) -> list[dict[str, str]]:
    code, stdout, err = _run(["--model", model, "--data", data, "--out", out, "--workers", 1, *extra], capsys)
    assert code == 0, err
    assert f"Scores written to {out.resolve()}" in stdout
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def _files(data: Path) -> set[str]:
    return {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file() and p.name != "labels.csv"}


def _direct_probs(checkpoint: Path, path: Path) -> np.ndarray:
    """The model run by hand on the training decoder's output: (frames, classes)."""
    state, metadata = load_checkpoint(checkpoint)
    run = RunConfig.from_flower(json.loads(metadata["run-config"]))
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes))
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(decode_file(path, run.preprocess).images))
    if len(run.classes) == 2:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1).numpy()
    return torch.softmax(logits, dim=1).numpy()


# ---------------------------------------------------------------- what it writes


def test_every_file_once_with_the_training_ingests_reasons(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _predict(capsys, run_dir, site, tmp_path / "scores.csv")
    assert [r["file"] for r in rows] == sorted(_files(site))  # each file once, nothing skipped
    assert (tmp_path / "scores.csv").stat().st_mode & 0o777 == 0o600  # it links files to scores
    rejected = {r["file"]: r["reason"] for r in rows if r["status"] == "rejected"}
    assert set(rejected) == set(BAD_FILES)
    for rel, words in BAD_FILES.items():
        assert words in rejected[rel]
        with pytest.raises(DicomRejected) as caught:
            decode_file(site / rel, RunConfig.from_flower(BINARY).preprocess)
        assert rejected[rel] == str(caught.value)
    run = RunConfig.from_flower(BINARY)
    training = load_site_data(data_dir=site, work_dir=tmp_path / "train-work", config=run.preprocess,
                              classes=run.classes, workers=1, require_usable=False).report
    by_file = {f: group["reason"] for group in training["rejections"] for f in group["files"]}
    for rel, reason in rejected.items():
        assert by_file[rel] == reason
    # Training also rejects CT_small.dcm, but only for its missing label: prediction needs none.
    assert by_file["extra/CT_small.dcm"] == "no label in labels.csv"
    assert {r["status"] for r in rows if r["file"] not in rejected} == {"ok"}
    assert all(r["frame"] == "1" and r["sop_instance_uid"] for r in rows if r["status"] == "ok")
    assert all(r["frame"] == r["score"] == r["sop_instance_uid"] == "" for r in rows if r["status"] == "rejected")
    assert "label" not in rows[0]  # no threshold, no label column


def test_scores_are_the_models_output_on_the_preprocessed_image(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [r for r in _predict(capsys, run_dir, site, tmp_path / "scores.csv") if r["status"] == "ok"]
    latest = checkpoint_path(run_dir, 2)  # no state.json: the highest round
    scores = np.array([float(r["score"]) for r in rows])
    expected = np.array([_direct_probs(latest, site / r["file"])[0, 1] for r in rows])
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.std() > 1e-3  # not a constant: the comparison means something


def test_threshold_labels_and_summary(site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = [float(r["score"]) for r in _predict(capsys, run_dir, site, tmp_path / "a.csv") if r["score"]]
    threshold = float(np.median(scores))
    code, stdout, err = _run(["--model", run_dir, "--data", site, "--out", tmp_path / "b.csv", "--workers", 1,
                              "--threshold", threshold], capsys)
    assert code == 0, err
    with (tmp_path / "b.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["label"] == ("1" if float(r["score"]) >= threshold else "0") for r in ok)
    assert all(r["label"] == "" for r in rows if r["status"] == "rejected")
    positives = sum(r["label"] == "1" for r in ok)
    assert 0 < positives < len(ok)
    assert f"Positive (1) at threshold {threshold:g}: {positives} of {len(ok)} image(s)" in stdout
    assert f"Scored {len(ok)} image(s) from {len(ok)} of {len(rows)} file(s); 3 file(s) rejected" in stdout
    assert "1 × not a DICOM file" in stdout and "1 × empty file (0 bytes)" in stdout
    assert "AUROC against labels.csv" in stdout  # site A has labels.csv


def _labels(out: Path) -> list[tuple[float, str]]:
    with out.open(newline="") as f:
        return [(float(r["score"]), r["label"]) for r in csv.DictReader(f) if r["status"] == "ok"]


def test_the_coordinators_threshold_is_the_default(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _predict(capsys, run_dir, site, tmp_path / "plain.csv")
    assert "label" not in plain[0]  # no chosen threshold in the run: no label column, as before
    chosen = round(float(np.median([float(r["score"]) for r in plain if r["score"]])) * 200) / 200  # a grid value
    assert 0 < chosen < 1
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    annotate_checkpoint(checkpoint_path(run, 2), threshold_metadata(chosen, "youden"))
    code, stdout, err = _run(["--model", run, "--data", site, "--out", tmp_path / "a.csv", "--workers", 1], capsys)
    assert code == 0, err
    labels = _labels(tmp_path / "a.csv")
    assert all(label == ("1" if score >= chosen else "0") for score, label in labels)
    positives = sum(label == "1" for _, label in labels)
    assert 0 < positives < len(labels)
    assert (f"Positive (1) at threshold {chosen:g} (chosen by the coordinator on pooled validation, Youden's J): "
            f"{positives} of {len(labels)} image(s)") in stdout
    # --threshold still decides
    code, stdout, err = _run(["--model", run, "--data", site, "--out", tmp_path / "b.csv", "--workers", 1,
                              "--threshold", 0.999], capsys)
    assert code == 0, err
    assert "Positive (1) at threshold 0.999: " in stdout and "chosen by" not in stdout
    assert all(label == ("1" if score >= 0.999 else "0") for score, label in _labels(tmp_path / "b.csv"))


def test_the_threshold_of_an_unannotated_checkpoint_comes_from_its_runs_report(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rounds = [{"round": r, "evaluate": {"pooled": {"threshold": t}}} for r, t in ((1, 0.3), (2, 0.45))]
    report = {"run_id": 42, "config": {**BINARY, "operating-point": 0.9}, "rounds": rounds}
    (run / "report.json").write_text(json.dumps(report))
    rule = "(chosen by the coordinator on pooled validation, target sensitivity 0.9)"
    for model, threshold in ((run, 0.45), (checkpoint_path(run, 1), 0.3)):  # each checkpoint its own round's
        code, stdout, err = _run(["--model", model, "--data", site, "--out", tmp_path / "o.csv", "--workers", 1], capsys)
        assert code == 0, err
        assert f"at threshold {threshold:g} {rule}: " in stdout
    (run / "report.json").write_text(json.dumps({**report, "run_id": 7}))  # another run's report: not used
    assert "label" not in _predict(capsys, run, site, tmp_path / "other.csv")[0]


def test_run_folder_and_checkpoint_give_identical_scores_and_state_json_picks(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_dir = _predict(capsys, run_dir, site, tmp_path / "dir.csv")
    by_file = _predict(capsys, checkpoint_path(run_dir, 2), site, tmp_path / "file.csv")
    assert (tmp_path / "dir.csv").read_bytes() == (tmp_path / "file.csv").read_bytes()
    assert by_dir == by_file
    first = _predict(capsys, checkpoint_path(run_dir, 1), site, tmp_path / "first.csv")
    assert first != by_dir  # other weights, other scores

    chosen = tmp_path / "run"
    shutil.copytree(run_dir, chosen)
    (chosen / "state.json").write_text(json.dumps(_state("checkpoints/round-0001.safetensors", BINARY)))
    _predict(capsys, chosen, site, tmp_path / "state.csv")
    assert (tmp_path / "state.csv").read_bytes() == (tmp_path / "first.csv").read_bytes()
    _, stdout, _ = _run(["--model", chosen, "--data", site, "--out", tmp_path / "again.csv", "--workers", 1], capsys)
    assert "round 1 (" in stdout


def test_older_checkpoint_takes_the_run_config_from_report_json(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old-run"
    _write_report(old, BINARY)
    bare = _save(old, 2, BINARY, seed=2, with_config=False)
    assert "run-config" not in load_checkpoint(bare)[1]
    reference = _predict(capsys, run_dir, site, tmp_path / "new.csv")
    assert _predict(capsys, old, site, tmp_path / "old-dir.csv") == reference
    assert _predict(capsys, bare, site, tmp_path / "old-file.csv") == reference  # <checkpoint>/../../report.json
    (old / "report.json").unlink()
    (old / "state.json").write_text(json.dumps(_state("checkpoints/round-0002.safetensors", BINARY)))
    assert _predict(capsys, old, site, tmp_path / "old-state.csv") == reference  # state.json's run_config


def test_multiframe_multiclass_rows(tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted((tiny_sites / "A").rglob("*.dcm"))[:3]:
        shutil.copy(path, data / path.name)
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), data / "us.dcm")  # 30 frames, YBR colour
    checkpoint = _save(tmp_path / "run", 1, MULTI, seed=3)
    rows = _predict(capsys, checkpoint, data, tmp_path / "scores.csv")
    assert list(rows[0]) == ["file", "frame", "status", "reason", "sop_instance_uid", "p_a", "p_b", "p_c", "label"]
    frames = [r for r in rows if r["file"] == "us.dcm"]
    assert [int(r["frame"]) for r in frames] == list(range(1, 31))
    assert len(rows) == 33 and all(r["status"] == "ok" for r in rows)
    probs = np.array([[float(r[f"p_{c}"]) for c in "abc"] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert [r["label"] for r in rows] == ["abc"[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(probs[-30:], _direct_probs(checkpoint, data / "us.dcm"), atol=1e-6, rtol=0)

    code, _, err = _run(["--model", checkpoint, "--data", data, "--out", tmp_path / "t.csv", "--threshold", 0.5], capsys)
    assert code == 2 and err.count("\n") == 1 and "binary models only" in err


def test_work_dir_keeps_the_cache_and_the_default_one_is_removed(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "scores.csv"
    first = _predict(capsys, run_dir, site, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.csv"]  # no cache or temporary file left
    work = tmp_path / "work"
    assert _predict(capsys, run_dir, site, tmp_path / "w1.csv", "--work-dir", work) == first
    assert list((work / "cache").iterdir())
    from client.data import dicom

    decoded: list[Path] = []
    real = dicom.decode_file
    monkeypatch.setattr(dicom, "decode_file", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    assert _predict(capsys, run_dir, site, tmp_path / "w2.csv", "--work-dir", work) == first
    assert decoded == []  # the second run reads the cache only
    other = tmp_path / "other"
    shutil.copytree(site / "extra", other)
    code, _, err = _run(["--model", run_dir, "--data", other, "--out", tmp_path / "w3.csv", "--work-dir", work], capsys)
    assert code == 2 and err.count("\n") == 1 and "one --work-dir per data folder" in err  # a cache is never replaced


def test_no_file_name_or_identifier_in_the_summary_or_log(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    code, stdout, err = _run(["--model", run_dir, "--data", site, "--out", tmp_path / "s.csv", "--workers", 1,
                              "--threshold", 0.5, "-v"], capsys)
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open(newline="")))
    secrets = {"SYN-A-", "IM0001", "MR_small", "notes.txt", *(r["sop_instance_uid"] for r in rows if r["sop_instance_uid"])}
    for text in (stdout, err, caplog.text):
        assert not [s for s in secrets if s in text]


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "text.safetensors").write_text("hello")
    good = checkpoint_path(run_dir, 1).read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "no-checkpoints" / "checkpoints").mkdir(parents=True)
    _write_report(root / "no-checkpoints", BINARY)
    shutil.copytree(run_dir, root / "stale-state")
    (root / "stale-state" / "state.json").write_text(json.dumps({"checkpoint": "checkpoints/round-0009.safetensors"}))
    shutil.copytree(run_dir, root / "broken-state")
    (root / "broken-state" / "state.json").write_text("{")
    shutil.copytree(run_dir, root / "no-round-yet")
    (root / "no-round-yet" / "state.json").write_text(json.dumps(_state(None, BINARY)))
    unknown = dict(BINARY, model="resnet-9000")
    save_checkpoint(root / "unknown.safetensors", build_model("fedrad-cnn").state_dict(), metadata=_metadata(unknown, 1))
    _save(root / "orphan", 1, BINARY, seed=0, with_config=False)  # no run-config and no report.json
    save_checkpoint(root / "misfit.safetensors", build_model("plain-cnn").state_dict(), metadata=_metadata(BINARY, 1))
    (root / "empty-data").mkdir()
    (root / "rejects-only").mkdir()
    (root / "rejects-only" / "a.txt").write_text("no")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "rejects-only" / "mr.dcm")
    (root / "a-file").write_text("x")
    return root


@pytest.mark.parametrize(
    ("model", "data", "out", "extra", "code", "words"),
    [
        ("missing", "site", "o.csv", [], 2, "does not exist"),
        ("bad:text.safetensors", "site", "o.csv", [], 2, "not a readable safetensors checkpoint"),
        ("bad:truncated.safetensors", "site", "o.csv", [], 2, "not a readable safetensors checkpoint"),
        ("bad:no-checkpoints", "site", "o.csv", [], 2, "No checkpoint in"),
        ("bad:stale-state", "site", "o.csv", [], 2, "round-0009.safetensors"),
        ("bad:broken-state", "site", "o.csv", [], 2, "state.json"),
        ("bad:no-round-yet", "site", "o.csv", [], 2, "not completed a round"),
        ("bad:unknown.safetensors", "site", "o.csv", [], 2, "resnet-9000"),
        ("bad:orphan/checkpoints/round-0001.safetensors", "site", "o.csv", [], 2, "carries no run config"),
        ("bad:misfit.safetensors", "site", "o.csv", [], 2, "do not fit model `fedrad-cnn`"),
        ("run", "bad:missing-data", "o.csv", [], 3, "does not exist"),
        ("run", "bad:a-file", "o.csv", [], 3, "not a folder"),
        ("run", "bad:empty-data", "o.csv", [], 3, "No file in"),
        ("run", "bad:rejects-only", "written.csv", [], 3, "No usable file"),
        ("run", "site", "bad:a-file/o.csv", [], 2, "is a file, not a folder"),
        ("run", "site", "bad:empty-data", [], 2, "is a folder"),
        ("run", "site", "o.csv", ["--threshold", "0"], 2, "strictly between 0 and 1"),
        ("run", "site", "o.csv", ["--threshold", "1"], 2, "strictly between 0 and 1"),
        ("run", "site", "o.csv", ["--threshold", "-0.5"], 2, "strictly between 0 and 1"),
        ("run", "site", "o.csv", ["--threshold", "nan"], 2, "strictly between 0 and 1"),
        ("run", "site", "o.csv", ["--threshold", "high"], 2, "--threshold"),
        ("run", "site", "o.csv", ["--device", "gpu"], 2, "--device"),
        ("run", "site", "o.csv", ["--batch-size", "0"], 2, "--batch-size"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    model: str, data: str, out: str, extra: list[str], code: int, words: str,
    site: Path, run_dir: Path, bad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    def path(value: str) -> Path:
        if value.startswith("bad:"):
            return bad / value[4:]
        return {"site": site, "run": run_dir, "missing": tmp_path / "missing"}.get(value, tmp_path / value)

    got, _, err = _run(["--model", path(model), "--data", path(data), "--out", path(out), "--workers", 1, *extra],
                            capsys)
    assert got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert not list(tmp_path.glob(".fedrad-predict-*"))
    if out == "written.csv":  # nothing usable: the CSV still says why, file by file
        rows = list(csv.DictReader((tmp_path / out).open(newline="")))
        assert {r["file"]: r["status"] for r in rows} == {"a.txt": "rejected", "mr.dcm": "rejected"}
    else:
        assert not (tmp_path / out).exists()


def test_console_script_in_a_subprocess(site: Path, run_dir: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("fl-predict")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "client.predict"]
    out = tmp_path / "scores.csv"
    proc = subprocess.run([*command, "--model", str(run_dir), "--data", str(site), "--out", str(out),
                           "--threshold", "0.5", "--device", "cpu"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # quiet without -v
    assert f"Scores written to {out}" in proc.stdout
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == len(_files(site)) and {r["label"] for r in rows if r["status"] == "ok"} <= {"0", "1"}
    proc = subprocess.run([*command, "--model", str(run_dir), "--data", str(site), "--out", str(out),
                           "--threshold", "2"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


# ---------------------------------------------------------------- a trained model


def test_a_trained_model_ranks_held_out_synthetic_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Trained for a few epochs on one synthetic site, scored on another's files (AUROC ≈ 0.75)."""
    from sklearn.metrics import roc_auc_score

    from client.app.training import train_plain
    from simulations.synth import SiteSpec, synthesize_sites

    synthesize_sites(tmp_path / "synth", [SiteSpec("A", 600), SiteSpec("B", 200)], seed=5, size=32)
    config = dict(BINARY, **{"image-size": 32})
    run = RunConfig.from_flower(config)
    train = load_site_data(data_dir=tmp_path / "synth/A", work_dir=tmp_path / "work", config=run.preprocess,
                           workers=1, val_fraction=0.01)
    model = build_model(run.model, image_size=32, seed=0)
    train_plain(model, images=train.images(), labels=train.labels, epochs=3, batch_size=16, learning_rate=0.03,
                device=torch.device("cpu"), seed=0, optimizer="adam")
    save_checkpoint(checkpoint_path(tmp_path / "run", 1), model.state_dict(), metadata=_metadata(config, 1))

    code, stdout, err = _run(["--model", tmp_path / "run", "--data", tmp_path / "synth/B",
                              "--out", tmp_path / "scores.csv", "--workers", 1], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "scores.csv").open(newline="")))
    with (tmp_path / "synth/B/labels.csv").open(newline="") as f:
        truth = {r["SOPInstanceUID"]: int(r["label"]) for r in csv.DictReader(f)}
    assert len(rows) == 200 and all(r["status"] == "ok" for r in rows)
    auroc = roc_auc_score([truth[r["sop_instance_uid"]] for r in rows], [float(r["score"]) for r in rows])
    assert auroc > 0.6
    assert f"AUROC against labels.csv: {auroc:.4f} (200 labelled images)" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_fails_before_decoding(
    site: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["--model", run_dir, "--data", site, "--out", tmp_path / "o.csv", "--device", "cuda"], capsys)
    assert code == 2 and err.count("\n") == 1 and "CUDA" in err
    assert not list(tmp_path.iterdir())
