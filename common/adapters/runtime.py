"""Flower's Runtime API as fedrad's site worker speaks it (Flower 1.41.0), and Flower's FAB hash.

A SuperNode started with ``--isolation process`` keeps each message it receives
as a pending task on its Runtime API and waits for a process of ours to take it.
Flower's own taker (``flower-superexec``) starts a fresh ``flwr-clientapp`` per
task, which installs the run's FAB and imports the ClientApp in it. fedrad's
worker (:mod:`client.worker`) takes the task itself through the calls wrapped
here and never installs or imports the FAB: it only hashes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.adapters.flower import TESTED_VERSION
from common.adapters.version import require_version

if TYPE_CHECKING:
    from flwr.app import Context, Message

require_version("flwr", TESTED_VERSION, install="flwr[simulation]")

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the call the SuperNode guards with the shared secret


def _app_files(app_dir: Path) -> dict[str, Path]:
    """The files ``flwr run`` collects from ``app_dir`` (``flwr.cli.utils.collect_files``: no symlink, nothing
    outside the folder), without walking folders every file of which Flower's built-in rules exclude
    (``.venv/``, ``__pycache__/`` ...): a project with its virtual environment inside is read in a fraction of
    a second rather than in seconds, and bundles to the same bytes."""
    import os

    from flwr.common.constant import FAB_EXCLUDE_PATTERNS

    root = app_dir.expanduser().resolve()
    skipped_top = {p[:-3] for p in FAB_EXCLUDE_PATTERNS if p.endswith("/**") and "*" not in p[:-3]}
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (top and d in skipped_top)]
        for filename in filenames:
            path = Path(dirpath) / filename
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[path.relative_to(root).as_posix()] = path
    return files


def fab_hash(app_dir: Path) -> str:
    """The hash ``flwr run`` gives the FAB it builds from ``app_dir`` (SHA-256 of the bundle's bytes, built by
    Flower's own ``build_fab_from_files``).

    Raises
    ------
    ValueError
        When ``app_dir`` holds no Flower App (its pyproject.toml, or a file it includes, is missing).
    """
    import warnings

    from flwr.cli.build import build_fab_from_files

    with warnings.catch_warnings():  # pathspec warns about the pattern API Flower 1.41 calls
        warnings.simplefilter("ignore", DeprecationWarning)
        return hashlib.sha256(build_fab_from_files(dict(_app_files(app_dir)))[0]).hexdigest()


def stage_app(app_dir: Path, dest: Path) -> str:
    """Copy into ``dest`` (replaced) exactly the files of ``app_dir``'s FAB and its pyproject.toml; the FAB hash.

    ``flwr run dest`` then builds the same bundle as ``flwr run app_dir`` without walking the project's
    virtual environment and everything else the bundle leaves out.
    """
    import shutil
    import tomllib
    import warnings

    from flwr.cli.build import get_filtered_fab_paths

    files = _app_files(app_dir)
    config = tomllib.loads(files["pyproject.toml"].read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        keep = {*get_filtered_fab_paths(dict(files), config), "pyproject.toml"}
    shutil.rmtree(dest, ignore_errors=True)
    for name in sorted(keep):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[name], target)
    return fab_hash(dest)


def _client(address: str, *, secret: bytes | None = None, token: str | None = None) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None
                                                             else "flwr-clientapp")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE}))
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


class Tasks:
    """The SuperNode's pending ClientApp tasks, taken one at a time with the secret it shares with us."""

    def __init__(self, address: str, *, secret: bytes) -> None:
        self.address = address
        self._client = _client(address, secret=secret)

    def acquire(self) -> str | None:
        """The token of the oldest pending ClientApp task, claimed for us; None when none is pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return str(res.token) if res.HasField("task") and res.token else None

    def close(self) -> None:
        self._client.close()


@dataclass
class TaskInput:
    """What one task brings: the message, the run's context at this site, and its FAB's hash (never its code)."""

    message: Message
    context: Context
    run_id: int
    fab_hash: str


class TaskChannel:
    """One claimed task: pull its input, push its reply and its final status (with the context to keep)."""

    def __init__(self, address: str, token: str) -> None:
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

        self._client = _client(address, token=token)
        self._heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self._client))
        self._heartbeat.start()

    def pull(self) -> TaskInput:
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        message, context, run, fab = pull_task_input(self._client)
        # The hash of the bytes the SuperNode holds, not the hash the coordinator claims for them.
        return TaskInput(message, context, run.run_id, hashlib.sha256(fab.content).hexdigest())

    def reply(self, message: Message, context: Context) -> None:
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(self._client, message, context)

    def finish(self, context: Context | None, *, ok: bool, details: str = "") -> None:
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(self._client, context, SubStatus.COMPLETED if ok else SubStatus.FAILED, details)

    def close(self) -> None:
        if self._heartbeat.is_running:
            self._heartbeat.stop()
        self._client.close()


@contextmanager
def task_channel(address: str, token: str) -> Iterator[TaskChannel]:
    """A :class:`TaskChannel` for ``token``, closed (heartbeat stopped) on the way out."""
    channel = TaskChannel(address, token)
    try:
        yield channel
    finally:
        channel.close()


def exit_with_parent(pid: int) -> None:
    """End this process when process ``pid`` is gone, even after a SIGKILL (Flower's own monitor thread)."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(pid)


def error_reply(message: Message, reason: str, *, refused: bool = False) -> Message:
    """The error reply Flower's ClientApp process sends: the app could not be loaded (``refused``) or it raised."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if refused else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    return Message(Error(code=code, reason=reason), reply_to=message)
