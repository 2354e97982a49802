"""The site worker's decisions (which app runs, what a raising message does) and the site's app approvals.

The worker on real processes (a SuperNode's Runtime API, a coordinator that submits a foreign
app): ``tests/e2e/test_site_worker.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.worker as worker_module
from client.app import warm
from client.approval import APPROVALS_FILE, SiteApp, approve, approved_hashes, read_approvals
from client.worker import Worker
from common.adapters.runtime import TaskInput, fab_hash, stage_app
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = "a" * 64
OTHER = "b" * 64


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's task input sets in a ClientApp process (messages are made for the current task)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _message(run_id: int = 1) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_run_id"] = run_id
    msg.metadata.__dict__["_message_id"] = "m" * 64
    return msg


class FakeChannel:
    """What the worker says back to the SuperNode for one task."""

    def __init__(self, task: TaskInput) -> None:
        self.task = task
        self.replies: list[Message] = []
        self.finished: list[tuple[bool, str]] = []

    def pull(self) -> TaskInput:
        return self.task

    def reply(self, message: Message, context: Context) -> None:
        self.replies.append(message)

    def finish(self, context: Context | None, *, ok: bool, details: str = "") -> None:
        self.finished.append((ok, details))


class FakeTasks:
    address = "127.0.0.1:1"

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def acquire(self) -> str | None:
        return self.tokens.pop(0) if self.tokens else None


def _worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tasks: dict[str, TaskInput], app: Any) -> tuple[
        Worker, dict[str, FakeChannel]]:
    channels = {token: FakeChannel(task) for token, task in tasks.items()}

    from contextlib import contextmanager

    @contextmanager
    def channel(address: str, token: str) -> Any:
        yield channels[token]

    monkeypatch.setattr(worker_module, "task_channel", channel)
    worker = Worker(FakeTasks(list(tasks)), site="A", installed=INSTALLED, approvals=tmp_path / APPROVALS_FILE,
                    app=app, stats=tmp_path / "worker.jsonl")
    return worker, channels


def _task(fab: str, run_id: int = 1) -> TaskInput:
    return TaskInput(_message(run_id), Context(run_id, 7, {}, {}, {}), run_id, fab)


def test_a_run_of_an_app_the_site_did_not_approve_is_refused_before_anything_of_it_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Message] = []
    worker, channels = _worker(monkeypatch, tmp_path, {"t1": _task(OTHER)}, lambda message, context: calls.append(message))
    assert worker.poll_once() and not worker.poll_once()
    assert calls == []  # the installed app is not even called
    (reply,) = channels["t1"].replies
    assert reply.has_error() and reply.error.code == 1  # Flower's "could not load the ClientApp"
    assert f"site A refused run 1: its app {OTHER} is not approved" in reply.error.reason
    assert channels["t1"].finished == [(False, reply.error.reason)]
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [reply.error.reason]


def test_the_installed_app_and_approved_apps_run_and_a_raising_message_leaves_the_worker_serving(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    approve(tmp_path / APPROVALS_FILE, OTHER)

    def app(message: Message, context: Context) -> Message:
        if message.metadata.run_id == 2:
            raise ZeroDivisionError("division by zero")
        context.state["seen"] = ConfigRecord({"n": 1})  # what the app keeps goes back with the task's context
        return Message(RecordDict(), reply_to=message)

    tasks = {"t1": _task(INSTALLED), "t2": _task(OTHER, run_id=2), "t3": _task(OTHER, run_id=3)}
    worker, channels = _worker(monkeypatch, tmp_path, tasks, app)
    while worker.poll_once():
        pass
    assert worker.handled == 3
    assert channels["t1"].finished == [(True, "")] and not channels["t1"].replies[0].has_error()
    assert "seen" in tasks["t1"].context.state
    (failed,) = channels["t2"].replies
    assert failed.has_error() and failed.error.code == 2 and "division by zero" in failed.error.reason
    assert channels["t2"].finished[0][0] is False
    assert channels["t3"].finished == [(True, "")]
    rows = [json.loads(line) for line in (tmp_path / "worker.jsonl").read_text().splitlines()]
    assert [(r["run"], r["type"], r["ok"]) for r in rows] == [(1, "train", True), (2, "train", False), (3, "train", True)]
    assert all(r["take_cpu_s"] >= 0 and r["app_wall_s"] >= 0 and r["waited_s"] >= 0 for r in (rows[0], rows[2]))
    assert "take_cpu_s" not in rows[1]  # a message that raised: no timings


def test_a_message_of_another_run_drops_what_the_previous_run_kept_warm(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    builds: list[int] = []

    def app(message: Message, context: Context) -> Message:
        warm.kept("data", lambda: builds.append(message.metadata.run_id) or "opened")
        return Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(warm, "_enabled", True)
    monkeypatch.setattr(warm, "_kept", type(warm._kept)())
    tasks = {"a1": _task(INSTALLED, 1), "x": _task(OTHER, 9), "a2": _task(INSTALLED, 1), "b1": _task(INSTALLED, 2)}
    worker, _ = _worker(monkeypatch, tmp_path, tasks, app)
    while worker.poll_once():
        pass
    assert builds == [1, 2]  # opened once for run 1's two messages (a refused run between them ends nothing), again for run 2


def test_nothing_is_kept_between_calls_in_a_process_that_did_not_enable_it() -> None:
    builds: list[int] = []
    assert not warm._enabled
    for _ in range(2):
        warm.kept("k", lambda: builds.append(1))
    assert builds == [1, 1]


def test_fab_hash_is_the_hash_flwr_run_gives_the_bundle(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    for package in ("client", "common", "server"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    (app / ".venv" / "lib").mkdir(parents=True)  # walked by Flower, skipped by fedrad: the same bytes
    (app / ".venv" / "lib" / "big.py").write_text("x = 1\n")
    (app / "client" / "__pycache__").mkdir()
    (app / "client" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0")
    expected = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert fab_hash(app) == expected
    staged = tmp_path / "staged"  # what fl-server submits: the bundle's files only, the same bundle
    assert stage_app(app, staged) == expected == hashlib.sha256(build_fab_from_disk(staged)).hexdigest()
    assert not (staged / ".venv").exists() and not (staged / "client" / "__pycache__").exists()
    (app / "client" / "extra.py").write_text("import os\n")  # any change to the code is another app
    assert fab_hash(app) != expected


def test_approvals_are_validated_deduplicated_and_a_broken_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w" / APPROVALS_FILE
    assert approved_hashes(path, installed=INSTALLED) == {INSTALLED}
    assert approve(path, OTHER.upper()) and not approve(path, OTHER)
    assert [e["hash"] for e in read_approvals(path)] == [OTHER]
    assert approved_hashes(path, installed=INSTALLED) == {INSTALLED, OTHER}
    with pytest.raises(ConfigError, match="Expected `--approve-app` to be a FAB hash"):
        approve(path, "abc")
    for broken in ([{"hash": "not-a-hash"}], [{"hash": 1}], {"hash": OTHER}, [OTHER], "x"):
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match="is not a list of approved apps"):
            approved_hashes(path, installed=INSTALLED)
    path.write_text("{")
    with pytest.raises(ConfigError, match="is not a list of approved apps"):
        approve(path, OTHER)


def test_a_folder_without_a_flower_app_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Expected a Flower App"):
        SiteApp.load(tmp_path, work_dir=tmp_path / "w")
