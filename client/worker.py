"""The site worker: one long-lived process that runs this site's installed ClientApp for every message.

``fl-client`` starts the site's SuperNode with ``--isolation process`` and this
worker beside it (``python -m client.worker``, in the site's app folder). For each
message the SuperNode receives, the worker claims the task on the SuperNode's
Runtime API (with the secret the two share), pulls the message, the run's context
at this site and the FAB's bytes, and checks the FAB's hash against the apps this
site approved (:mod:`client.approval`). An approved run is executed by the
*installed* ClientApp, imported once at start; the FAB is hashed, never unpacked,
imported or executed. Any other run is refused: one line in the site's log and an
error reply naming the site and the reason, which the coordinator's report shows.

torch and Opacus are imported once; what a run keeps warm between its messages
(the mapped cache) is dropped when a message of another run arrives. A message
that raises gets an error reply, as Flower's own ClientApp process gives, and the
worker takes the next one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from client.approval import approved_hashes
from common.adapters.runtime import TaskInput, Tasks, error_reply, task_channel

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger("fedrad.worker")
POLL = 0.25  # s between looks at the SuperNode's pending tasks while idle (each look costs ~2 ms of CPU, both sides)


def load_client_app(app_dir: Path) -> ClientApp:
    """The ClientApp the project in ``app_dir`` names (``[tool.flwr.app.components] clientapp``), imported."""
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    module, _, attr = project["tool"]["flwr"]["app"]["components"]["clientapp"].partition(":")
    app: ClientApp = getattr(importlib.import_module(module), attr)
    return app


class Worker:
    """Takes this site's tasks one at a time and answers each: with the installed app, or with a refusal."""

    def __init__(self, tasks: Tasks, *, site: str, installed: str, approvals: Path, app: ClientApp,
                 stats: Path | None = None) -> None:
        self.tasks, self.site, self.installed, self.approvals, self.app = tasks, site, installed, approvals, app
        self.stats = stats
        self.run_id: int | None = None
        self.handled = 0

    def poll_once(self) -> bool:
        """Take and answer one pending task; False when none is pending."""
        token = self.tasks.acquire()
        if token is None:
            return False
        self.handle(token)
        return True

    def handle(self, token: str) -> None:
        """Answer the task ``token`` claims; nothing it raises stops the worker."""
        marks = [(time.process_time(), time.time())]  # claimed, app called, app returned, answered
        with task_channel(self.tasks.address, token) as channel:
            task, reply, ok, details = None, None, False, ""
            try:
                task = channel.pull()
                refusal = self.refusal(task.fab_hash, task.run_id)
                if refusal is not None:  # before anything else: a refused run does not even end the current one
                    log.error("%s", refusal)
                    reply, details = error_reply(task.message, refusal, refused=True), refusal
                else:
                    self._enter_run(task.run_id)
                    marks.append((time.process_time(), time.time()))
                    log.info("Site %s: %s message of run %d taken (%.3f s of CPU to take it)", self.site,
                             task.message.metadata.message_type, task.run_id, marks[1][0] - marks[0][0])
                    reply, ok = self.app(message=task.message, context=task.context), True
                    marks.append((time.process_time(), time.time()))
            except Exception as exc:  # a message that raises must not take the worker down
                details = f"{type(exc)}:<'{exc}'>"  # what Flower's own ClientApp process reports
                log.error("Site %s: the ClientApp raised %s", self.site, details, exc_info=exc)
                if task is not None:
                    reply = error_reply(task.message, details)
            finally:
                try:
                    if reply is not None and task is not None:
                        channel.reply(reply, task.context)
                finally:
                    channel.finish(task.context if task is not None else None, ok=ok, details=details)
        self.handled += 1
        if task is not None and self.stats is not None:
            self._record(task, marks + [(time.process_time(), time.time())] if len(marks) == 3 else [], ok=ok)

    def _record(self, task: TaskInput, marks: list[tuple[float, float]], *, ok: bool) -> None:
        """One line of ``logs/worker.jsonl`` (numbers only): what taking, running and answering the message cost.

        ``waited_s`` runs from the coordinator creating the message to the app starting on it (the SuperNode's
        and the worker's polling included); the ``*_cpu_s`` figures are this process's CPU.
        """
        row: dict[str, object] = {"run": task.run_id, "type": task.message.metadata.message_type, "ok": ok,
                                  "at": round(time.time(), 3)}
        if marks:
            (c0, w0), (c1, w1), (c2, w2), (c3, w3) = marks
            row |= {"waited_s": round(w1 - task.message.metadata.created_at, 3),
                    "take_cpu_s": round(c1 - c0, 4), "take_wall_s": round(w1 - w0, 4),
                    "app_cpu_s": round(c2 - c1, 4), "app_wall_s": round(w2 - w1, 4),
                    "answer_cpu_s": round(c3 - c2, 4), "answer_wall_s": round(w3 - w2, 4)}
        assert self.stats is not None
        with self.stats.open("a") as out:
            out.write(json.dumps(row) + "\n")

    def refusal(self, fab_hash: str, run_id: int) -> str | None:
        """Why run ``run_id`` (its FAB hashes to ``fab_hash``) may not run here; None when its app is approved."""
        if fab_hash in approved_hashes(self.approvals, installed=self.installed):
            return None
        return (f"site {self.site} refused run {run_id}: its app {fab_hash} is not approved at this site, "
                f"which runs app {self.installed} (`fl-client apps` lists the approved ones; the site's "
                "operator approves another with `fl-client --approve-app HASH`)")

    def _enter_run(self, run_id: int) -> None:
        """Drop what the previous run kept warm when a message of another run arrives."""
        if run_id != self.run_id:
            if self.run_id is not None:
                from client.app.warm import forget

                forget()
                log.info("Site %s: run %d ended here; now serving run %d", self.site, self.run_id, run_id)
            self.run_id = run_id


def _warm_up() -> None:
    """Import what every message needs (torch, Opacus, the site code) once, before the first message."""
    import opacus  # noqa: F401
    import torch  # noqa: F401

    import client.app.site
    import client.app.training  # noqa: F401
    from client.app.warm import enable

    enable()


def main(argv: list[str] | None = None) -> None:
    """``python -m client.worker``: serve the SuperNode's Runtime API until stopped (started by ``fl-client``)."""
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api", required=True, help="The SuperNode's Runtime API, HOST:PORT.")
    parser.add_argument("--secret-file", type=Path, required=True, help="The secret shared with the SuperNode.")
    parser.add_argument("--site", required=True)
    parser.add_argument("--installed", required=True, help="The FAB hash of this site's installed app.")
    parser.add_argument("--approvals", type=Path, required=True, help="The site's approved-apps file.")
    parser.add_argument("--stats", type=Path, help="Append one JSON line per message here (numbers only).")
    parser.add_argument("--parent-pid", type=int, help="Exit when this process (fl-client) is gone.")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        from common.adapters.runtime import exit_with_parent

        exit_with_parent(args.parent_pid)
    app_dir = Path.cwd()
    app = load_client_app(app_dir)  # imports Flower, which sets up its log handler
    from common.flower import use_flower_log_handlers

    use_flower_log_handlers("fedrad", "client", "common")
    _warm_up()
    tasks = Tasks(args.runtime_api, secret=args.secret_file.read_bytes())
    worker = Worker(tasks, site=args.site, installed=args.installed, approvals=args.approvals, app=app,
                    stats=args.stats)
    log.info("Site %s worker ready (pid %d): runs app %s from %s", args.site, os.getpid(), args.installed, app_dir)
    try:
        while True:
            if not worker.poll_once():
                time.sleep(POLL)
    except KeyboardInterrupt:
        pass
    finally:
        tasks.close()


if __name__ == "__main__":
    main()
