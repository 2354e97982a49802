"""A run resumed after a coordinator crash next to an uninterrupted run with the same seed.

    python -m benchmarks.resume [--sites A,B,C] [--images-per-site 300] [--rounds 4] [--kill-after 2]
                                [--local-epochs 2] [--image-size 32] [--seed 7] [--data-seed 0] [--easy-lesions]
                                [--max-epsilon 10] [--threads 1] [--timeout 1200]
                                [--workdir DIR] [--keep] [--json FILE]

Synthesises ``--sites`` hospitals once (``simulations.synth.synthesize``, 48 px
DICOMs, the default lesion model: realistic difficulty; ``--easy-lesions``: the
fault tests' large clear lesions, which the model learns), then runs two real
federations on loopback, one after the other, with the same data folders and
the very same settings, each with a fresh coordinator workdir and fresh site
workdirs (fresh caches and privacy ledgers)::

    fl-server --insecure --port P --workdir W --rounds R --min-sites N --image-size 32 --local-epochs 2
              --run-config "secagg=false batch-size=16 optimizer='adam' learning-rate=0.03 round-timeout=300 seed=7"
    fl-client --insecure --site X --server 127.0.0.1:P --data D --workdir SW --threads 1
              --privacy-unit image --max-epsilon 10 --no-secure-mode -c image-size=32

1. **uninterrupted**: the coordinator runs all R rounds and exits.
2. **resumed**: once ``RUN_DIR/state.json`` says ``completed_round >= --kill-after``
   *and* at least one site's ledger already books round ``kill-after + 1`` (the
   site trained the round the coordinator is about to lose), the coordinator's
   whole process tree (fl-server, its SuperLink, ServerApp and their children)
   is frozen with SIGSTOP and then SIGKILLed, by PID: a crash, nothing is
   cleaned up. The sites keep running. ``fl-server --insecure --resume RUN_DIR
   --port P`` then continues the run on the same port; the sites' SuperNodes
   reconnect on their own.

Reported, side by side: the pooled validation AUROC of every round and the
final one (each run's ``report.json``); whether the global weights of every
round, the final checkpoint above all (``RUN_DIR/checkpoints/round-NNNN.safetensors``),
are identical (max absolute difference over all weights); per site, the
ledger rows of the run (one per round, none twice; ``common.ledger.Ledger``,
chain and signatures checked with ``common.ledger.verify``), the final ε in each run, and
which sites answered the lost round with their stored update ("the same update
is sent again" in the fl-client log) or trained it again; the wall time of each
run (server start to server exit; the resumed run's includes the crash and the
restart).

Why the runs should match bit for bit: with ``--no-secure-mode`` a site seeds
its DP sampling and noise from the run's seed (``client/app/training.py``:
``seed * 100003 + round``, noise ``+1``, slices ``+3``, augmentation ``+2``),
the initial model is built from the run seed (``server/app/main.py``), the
train/validation split from it too, and every site trains on one CPU thread. A
site asked again for a round it trained and booked, with the same weights,
sends the update it stored (``client/app/replay.py``); a site that had not trained
it trains it from the same weights with the same seed. The one order-dependent
step is FedAvg's float64 sum over the updates in reply order, cast back to
float32 (``server/app/validation.py::aggregate``): a different reply order can
only change a weight where the float64 sums differ across a float32 rounding
boundary (vanishingly rare).

Prints markdown tables; ``--json`` writes every figure. Exits 1 with one
``error:`` line when a run cannot be measured (a process died, a timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.runfolder import RunFolder

LOOPBACK = "127.0.0.1"
LABELS = ("uninterrupted", "resumed")
EXPECTATION = (
    "expected bitwise identical: yes (--no-secure-mode seeds DP sampling and noise from the run seed and the round; "
    "initial model and data split from the run seed; one torch thread per site; a lost round is replayed from the "
    "site's stored update or retrained from the same weights and seed; only FedAvg's float64 sum runs in reply "
    "order before the cast to float32)"
)
_REPLAY = re.compile(
    r"round\s+(\d+)\s+of\s+run\s+(\S+)\s+was\s+already\s+trained\s+and\s+booked.{0,300}?the\s+same\s+update\s+is\s+sent\s+again",
    re.DOTALL,
)
_RETRAIN = re.compile(r"round\s+(\d+)\s+of\s+run\s+(\S+)\s+was\s+already\s+trained\s+\(ledger\s+row")


class BenchError(Exception):
    """The benchmark could not measure a run (a process died, a timeout)."""


# --- reading what the runs left behind (pure: no processes) ---------------------------------------


def auroc_by_round(report: Mapping[str, Any]) -> dict[int, float | None]:
    """Pooled validation AUROC per round from a ``report.json`` (``None`` for a round not evaluated)."""
    out: dict[int, float | None] = {}
    for entry in report.get("rounds", []):
        pooled = entry.get("evaluate", {}).get("pooled", {})
        value = pooled.get("auroc")
        out[int(entry["round"])] = None if value is None else float(value)
    return out


def final_auroc(report: Mapping[str, Any]) -> float | None:
    value = report.get("final", {}).get("auroc")
    return None if value is None else float(value)


def summarize_rows(rows: Iterable[Any], run_id: str, rounds: int) -> dict[str, Any]:
    """One site's ledger rows for ``run_id``: rounds booked, rounds booked twice or never, final ε.

    ``rows`` are :class:`common.ledger.Row` (anything with ``run_id``, ``server_round``, ``epsilon``),
    in ledger order.
    """
    rows = list(rows)
    mine = [row for row in rows if str(row.run_id) == str(run_id)]
    booked = [int(row.server_round) for row in mine]
    counts = Counter(booked)
    twice = sorted(r for r, c in counts.items() if c > 1)
    missing = sorted(set(range(1, rounds + 1)) - set(booked))
    return {
        "rows": len(mine),
        "rounds": booked,
        "twice": twice,
        "missing": missing,
        "other_runs": len(rows) - len(mine),
        "one_per_round": not twice and not missing and len(mine) == rounds,
        "final_epsilon": float(mine[-1].epsilon) if mine else None,
    }


def read_ledger(privacy_dir: Path, run_id: str, rounds: int) -> dict[str, Any]:
    """:func:`summarize_rows` of the ledger in ``privacy_dir``, plus whether its chain and signatures verify.

    The ε of every row is not recomputed here (``fl-audit --ledger`` does that).
    """
    from common.ledger import LEDGER_FILE, PUBLIC_KEY_FILE, Ledger, load_public_key, verify

    if not (privacy_dir / LEDGER_FILE).is_file():
        return {**summarize_rows([], run_id, rounds), "verified": None, "problems": ["no ledger"]}
    meta, rows, head = Ledger(privacy_dir, create=False).snapshot()
    out = summarize_rows(rows, run_id, rounds)
    key = privacy_dir / PUBLIC_KEY_FILE
    pem = key.read_bytes() if key.is_file() else meta.get("public-key", "").encode()
    problems = verify(rows, head, load_public_key(pem))
    out["verified"] = not problems
    out["problems"] = [f"{p.where}: {p.what}" for p in problems]
    return out


def booked_now(privacy_dir: Path, run_id: str | None = None) -> set[int]:
    """Rounds the site's ledger books so far (read while the site runs); empty when unreadable yet."""
    from common.ledger import LEDGER_FILE, Ledger

    if not (privacy_dir / LEDGER_FILE).is_file():
        return set()
    try:
        rows = Ledger(privacy_dir, create=False).rows()
    except Exception:  # noqa: BLE001 - being created: try again at the next poll
        return set()
    return {int(r.server_round) for r in rows if run_id is None or str(r.run_id) == str(run_id)}


def compare_states(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two state dicts: identical (same names, shapes, dtypes and bits) or the max absolute difference."""
    import torch

    mismatched = sorted(set(a) ^ set(b))
    differing: list[str] = []
    max_diff = 0.0
    values = 0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            mismatched.append(name)
            continue
        values += x.numel()
        if torch.equal(x, y):
            continue
        differing.append(name)
        if x.numel():
            diff = (x.detach().to(torch.float64) - y.detach().to(torch.float64)).abs().max()
            max_diff = max(max_diff, float(diff))
    return {
        "identical": not mismatched and not differing,
        "max_abs_diff": None if mismatched else max_diff,
        "tensors": len(set(a) & set(b)),
        "values": values,
        "differing": differing,
        "mismatched": mismatched,
    }


def compare_checkpoints(path_a: Path, path_b: Path) -> dict[str, Any]:
    from server.app.checkpoint import load_checkpoint

    (a, _), (b, _) = load_checkpoint(path_a), load_checkpoint(path_b)
    return compare_states(a, b)


def log_replays(text: str) -> list[int]:
    """Rounds a site answered with its stored update ("the same update is sent again")."""
    return sorted({int(m.group(1)) for m in _REPLAY.finditer(text)})


def log_retrains(text: str) -> list[int]:
    """Rounds a site trained (and booked) a second time: other weights, or no stored update."""
    return sorted({int(m.group(1)) for m in _RETRAIN.finditer(text)})


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _diff(cmp: Mapping[str, Any] | None) -> str:
    if cmp is None:
        return "–"
    if cmp["identical"]:
        return "0 (identical)"
    if cmp["max_abs_diff"] is None:
        return "names/shapes differ"
    return f"{cmp['max_abs_diff']:.3g} ({len(cmp['differing'])}/{cmp['tensors']} tensors differ)"


def _rounds_text(rounds: Sequence[int]) -> str:
    return ",".join(str(r) for r in rounds) if rounds else "none"


def round_table(result: Mapping[str, Any]) -> list[str]:
    """Per-round pooled AUROC of both runs and the max weight difference of their checkpoints."""
    runs = result["runs"]
    kill_after = result["settings"]["kill_after"]
    a = {int(k): v for k, v in runs["uninterrupted"]["auroc"].items()}
    b = {int(k): v for k, v in runs["resumed"]["auroc"].items()}
    cmp = {int(k): v for k, v in result["checkpoints"].items()}
    lines = [
        "| round | AUROC uninterrupted | AUROC resumed | weights max abs diff |",
        "|---|---:|---:|---:|",
    ]
    for r in sorted(set(a) | set(b)):
        tag = " (lost, redone after resume)" if r == kill_after + 1 else ""
        lines.append(f"| {r}{tag} | {_fmt(a.get(r))} | {_fmt(b.get(r))} | {_diff(cmp.get(r))} |")
    last = result["settings"]["rounds"]
    lines.append(
        f"| **final** (round {last}) | **{_fmt(runs['uninterrupted']['final_auroc'])}** | "
        f"**{_fmt(runs['resumed']['final_auroc'])}** | **{_diff(result['final_checkpoint'])}** |"
    )
    return lines


def site_table(result: Mapping[str, Any]) -> list[str]:
    """Per site: ledger rows of each run, rounds booked twice, final ε, and what it did with the lost round."""
    lost = result["settings"]["kill_after"] + 1
    lines = [
        (f"| site | ledger rows uninterrupted | ledger rows resumed | booked twice | final ε uninterrupted | "
        f"final ε resumed | booked round {lost} before the kill | replayed round {lost} | trained a round again |"),
        "|---|---:|---:|---|---:|---:|---|---|---|",
    ]
    for site, s in result["sites"].items():
        u, r = s["uninterrupted"], s["resumed"]
        twice = sorted({*u["twice"], *r["twice"]})

        def rows(x: Mapping[str, Any]) -> str:
            ok = "" if x["one_per_round"] else f" (rounds {_rounds_text(x['rounds'])})"
            return f"{x['rows']}{ok}"

        lines.append(
            f"| {site} | {rows(u)} | {rows(r)} | {_rounds_text(twice)} | {_fmt(u['final_epsilon'], '.3f')} | "
            f"{_fmt(r['final_epsilon'], '.3f')} | {'yes' if s['booked_lost_round_at_kill'] else 'no'} | "
            f"{'yes' if lost in s['replayed'] else 'no'} | {_rounds_text(s['retrained'])} |"
        )
    return lines


def time_table(result: Mapping[str, Any]) -> list[str]:
    u, r = result["runs"]["uninterrupted"], result["runs"]["resumed"]
    seg = r.get("segments_s", {})
    lines = ["| run | wall s | of which | 1-min load at start → end |", "|---|---:|---|---|"]
    lines.append(f"| uninterrupted | {u['wall_s']:.1f} | all {result['settings']['rounds']} rounds | "
                 f"{u['load'][0]:.2f} → {u['load'][1]:.2f} |")
    lines.append(
        f"| resumed | {r['wall_s']:.1f} | first coordinator {_fmt(seg.get('first'), '.1f')} s (killed after round "
        f"{r.get('killed_at_round')}), down {_fmt(seg.get('down'), '.1f')} s (kill → new coordinator listening; "
        f"resumed ServerApp running after {_fmt(seg.get('serverapp_back'), '.1f')} s), resumed coordinator "
        f"{_fmt(seg.get('second'), '.1f')} s | {r['load'][0]:.2f} → {r['load'][1]:.2f} |"
    )
    return lines


def render(result: Mapping[str, Any]) -> list[str]:
    """The whole printed report (markdown tables and a few lines)."""
    s = result["settings"]
    lines = [
        (f"fedrad resume after a coordinator crash: {len(s['sites'])} sites × {s['images_per_site']} synthetic "
        f"48 px DICOMs ({'easy' if s.get('easy_lesions') else 'default'} lesion model), model input {s['image_size']} px, {s['rounds']} rounds × "
        f"{s['local_epochs']} local epochs, seed {s['seed']}, image-level DP, max ε {s['max_epsilon']:g}, "
        f"--no-secure-mode, coordinator SIGKILLed after round {s['kill_after']}; {s['cores']} cores, every "
        "process on loopback"),
        EXPECTATION,
        "",
        *round_table(result),
        "",
        *site_table(result),
        "",
        *time_table(result),
        "",
    ]
    final = result["final_checkpoint"]
    if final is not None:
        verdict = "IDENTICAL" if final["identical"] else f"DIFFERENT (max abs diff {_diff(final)})"
        lines.append(
            f"final checkpoints (round {s['rounds']}): {verdict}; {final['tensors']} tensors, "
            f"{final['values']:,} values"
        )
    resumed = result["runs"]["resumed"]
    lines.append(
        f"resumed run: killed at completed_round {resumed.get('killed_at_round')}, resumed from round "
        f"{_rounds_text(resumed.get('resumed_from', []))}, {resumed.get('segments')} segments; sites that replayed "
        f"round {s['kill_after'] + 1}: {', '.join(result['replayed_sites']) or 'none'}"
    )
    for problem in result["problems"]:
        lines.append(f"note: {problem}")
    return lines


def problems_of(result: Mapping[str, Any]) -> list[str]:
    """Everything that differs from what a correct resume should give."""
    s = result["settings"]
    out: list[str] = []
    for label in LABELS:
        run = result["runs"][label]
        if run.get("status") != "completed":
            out.append(f"{label} run: status {run.get('status')!r}")
    resumed = result["runs"]["resumed"]
    if resumed.get("killed_at_round") != s["kill_after"]:
        out.append(f"the coordinator was killed at completed_round {resumed.get('killed_at_round')}, "
                   f"not {s['kill_after']}")
    final = result["final_checkpoint"]
    if final is None:
        out.append("a final checkpoint is missing")
    elif not final["identical"]:
        out.append(f"final checkpoints differ: {_diff(final)}")
    for site, per in result["sites"].items():
        for label in LABELS:
            x = per[label]
            if not x["one_per_round"]:
                out.append(f"site {site}, {label} run: ledger books rounds {_rounds_text(x['rounds'])} "
                           f"(twice: {_rounds_text(x['twice'])}, missing: {_rounds_text(x['missing'])})")
            if x.get("verified") is False:
                out.append(f"site {site}, {label} run: ledger fails verification: {x['problems'][:2]}")
        if per["booked_lost_round_at_kill"] and s["kill_after"] + 1 not in per["replayed"]:
            out.append(f"site {site} booked round {s['kill_after'] + 1} before the kill but did not replay it")
        if per["retrained"]:
            out.append(f"site {site} trained round(s) {_rounds_text(per['retrained'])} again (booked again)")
    if not result["replayed_sites"]:
        out.append(f"no site replayed round {s['kill_after'] + 1}")
    return out


# --- running the federations ----------------------------------------------------------------------


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if line.startswith("error:")]
    return " | ".join((errors or text)[-lines:]).strip() or "(empty log)"


def start_time(pid: int) -> float | None:
    """When the process started (psutil's ``create_time``): a PID reused by another job differs; None when gone."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


@dataclass
class Federation:
    """One coordinator (and, when resumed, its successor) and its sites; every PID is remembered."""

    label: str
    root: Path
    data: Path
    sites: list[str]
    args: argparse.Namespace
    say: Callable[[str], None]
    port: int = 0
    pids: dict[int, float | None] = field(default_factory=dict)  # every PID seen in the run -> its start time
    clients: dict[str, Any] = field(default_factory=dict)
    seen_rounds: int = 0
    t0: float = 0.0

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def privacy(self, site: str) -> Path:
        return self.site_dir(site) / "privacy"

    def run_folder(self) -> RunFolder | None:
        found = RunFolder.in_workdir(self.server_dir)
        return found[0] if len(found) == 1 else None

    def completed_round(self) -> int:
        folder = self.run_folder()
        try:
            return int(folder.read_state()["completed_round"]) if folder else 0
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def remember(self, procs: Any) -> None:
        from common.processes import descendants

        for proc in procs.processes:
            for pid in [proc.pid, *descendants(proc.pid)]:
                self.pids.setdefault(pid, start_time(pid))

    def serve(self, procs: Any, *, resume: Path | None = None) -> Any:
        from common.processes import can_connect

        a = self.args
        if resume is None:
            cmd = [
                _bin("fl-server"), "--insecure", "--port", str(self.port), "--workdir", str(self.server_dir),
                "--rounds", str(a.rounds), "--min-sites", str(len(self.sites)), "--image-size", str(a.image_size),
                "--local-epochs", str(a.local_epochs), "--run-config", run_config(a),
            ]
            log = self.logs / "fl-server.log"
        else:
            cmd = [_bin("fl-server"), "--insecure", "--resume", str(resume), "--port", str(self.port)]
            log = self.logs / "fl-server-resumed.log"
        server = procs.start("fl-server", cmd, log_path=log)
        deadline = time.monotonic() + 120
        accepted = 0  # two connections in a row, 0.3 s apart: one lucky connect is not a listening SuperLink
        while accepted < 2:
            accepted = accepted + 1 if can_connect(LOOPBACK, self.port, timeout=0.5) else 0
            if not server.running():
                raise BenchError(f"{self.label} run: fl-server exited with code {server.popen.returncode} before "
                                 f"listening: {_tail(log)} (log {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label} run: fl-server did not listen on {LOOPBACK}:{self.port} in 120 s")
            time.sleep(0.3)
        self.remember(procs)
        return server

    def join(self, procs: Any) -> None:
        a = self.args
        for site in self.sites:
            self.clients[site] = procs.start(
                f"fl-client {site}",
                [
                    _bin("fl-client"), "--insecure", "--site", site, "--server", f"{LOOPBACK}:{self.port}",
                    "--data", str(self.data / site), "--workdir", str(self.site_dir(site)),
                    "--threads", str(a.threads), "--privacy-unit", "image", "--max-epsilon", str(a.max_epsilon),
                    "--no-secure-mode", "-c", f"image-size={a.image_size}",
                ],
                log_path=self.logs / f"site-{site}.log",
            )

    def wait(self, procs: Any, server: Any, deadline: float, what: str,
             until: Callable[[], bool] | None = None) -> None:
        """Until ``until()`` holds, or (without ``until``) the server exits; a dead site or a timeout fails."""
        log = server.log_path
        while True:
            self.remember(procs)
            self.progress()
            if until is not None and until():
                return
            if not server.running():
                if until is None:
                    return
                raise BenchError(f"{self.label} run: fl-server exited with code {server.popen.returncode} "
                                 f"before {what}: {_tail(log)} (log {log})")
            for site, client in self.clients.items():
                if not client.running():
                    path = self.logs / f"site-{site}.log"
                    raise BenchError(f"{self.label} run: fl-client {site} exited with code "
                                     f"{client.popen.returncode}: {_tail(path)} (log {path})")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label} run: timed out after {self.args.timeout} s waiting for {what}")
            time.sleep(0.5)

    def progress(self) -> None:
        folder = self.run_folder()
        if folder is None:
            return
        try:
            rounds = folder.read_report().get("rounds", [])
        except (OSError, ValueError):
            return
        done = [r for r in rounds if "evaluated_at" in r]
        for r in done[self.seen_rounds:]:
            auroc = r.get("evaluate", {}).get("pooled", {}).get("auroc")
            self.say(f"  {self.label}: round {r['round']} evaluated, pooled AUROC {_fmt(auroc)} "
                     f"({time.monotonic() - self.t0:.0f} s since start)")
        self.seen_rounds = max(self.seen_rounds, len(done))


def run_config(args: argparse.Namespace) -> str:
    return (f"secagg=false batch-size={args.batch_size} optimizer='adam' learning-rate={args.learning_rate} "
            f"round-timeout={args.round_timeout} seed={args.seed}")


def check_exit(fed: Federation, server: Any) -> None:
    if server.popen.returncode != 0:
        raise BenchError(f"{fed.label} run: fl-server exited with code {server.popen.returncode}: "
                         f"{_tail(server.log_path)} (log {server.log_path})")
    dead = [site for site, c in fed.clients.items() if not c.running()]
    if dead:
        raise BenchError(f"{fed.label} run: fl-client {', '.join(dead)} did not survive the run "
                         f"(logs in {fed.logs})")


def run_uninterrupted(fed: Federation) -> dict[str, Any]:
    from common.processes import ProcessSet, free_port

    fed.port = free_port()
    load0 = os.getloadavg()[0]
    with ProcessSet() as procs:
        fed.t0 = time.monotonic()
        server = fed.serve(procs)
        fed.join(procs)
        fed.wait(procs, server, fed.t0 + fed.args.timeout, "the end of the run")
        wall = time.monotonic() - fed.t0
        check_exit(fed, server)
    return {"wall_s": wall, "load": [load0, os.getloadavg()[0]], "port": fed.port}


def run_resumed(fed: Federation) -> dict[str, Any]:
    from common.processes import ProcessSet, can_connect, free_port, wait_until

    k = fed.args.kill_after
    fed.port = free_port()
    load0 = os.getloadavg()[0]

    def worst_moment() -> bool:
        folder = fed.run_folder()
        if folder is None or fed.completed_round() < k:
            return False
        return fed.completed_round() > k or any(
            k + 1 in booked_now(fed.privacy(site), folder.path.name) for site in fed.sites
        )

    with ProcessSet() as procs:
        fed.t0 = time.monotonic()
        server = fed.serve(procs)
        fed.join(procs)
        fed.wait(procs, server, fed.t0 + fed.args.timeout,
                 f"round {k} to be committed and a site to book round {k + 1}", until=worst_moment)
        folder = fed.run_folder()
        assert folder is not None
        fed.remember(procs)
        from common.processes import crash

        killed = crash(server.pid)
        t_kill, wall_kill = time.monotonic(), time.time()
        server.popen.wait(timeout=10)
        # the dead SuperLink's port must refuse before the new one is awaited
        wait_until(lambda: not can_connect(LOOPBACK, fed.port, timeout=0.5), timeout=30, interval=0.2,
                   what=f"the killed coordinator's port {fed.port} to close")
        port_closed_s = time.monotonic() - t_kill
        killed_at = fed.completed_round()
        booked = {site: sorted(booked_now(fed.privacy(site), folder.path.name)) for site in fed.sites}
        fed.say(f"  resumed: coordinator tree SIGKILLed ({len(killed)} processes) at completed_round {killed_at}, "
                f"{t_kill - fed.t0:.0f} s since start; ledgers book "
                + ", ".join(f"{s}: {_rounds_text(r)}" for s, r in booked.items()))
        resumed = fed.serve(procs, resume=folder.path)
        t_back = time.monotonic()
        fed.say(f"  resumed: new coordinator listening on port {fed.port} after {t_back - t_kill:.1f} s")
        fed.wait(procs, resumed, fed.t0 + fed.args.timeout, "the end of the resumed run")
        t_end = time.monotonic()
        check_exit(fed, resumed)
    try:  # when the resumed ServerApp started (its segment in the coordinator's state), on the wall clock
        segments = folder.read_state().get("segments", [])
        serverapp_s: float | None = float(segments[-1]["started"]) - wall_kill if len(segments) > 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        serverapp_s = None
    return {
        "wall_s": t_end - fed.t0,
        "segments_s": {"first": t_kill - fed.t0, "down": t_back - t_kill, "second": t_end - t_back,
                       "port_closed": port_closed_s, "serverapp_back": serverapp_s},
        "killed_at_round": killed_at,
        "killed_pids": len(killed),
        "booked_at_kill": booked,
        "load": [load0, os.getloadavg()[0]],
        "port": fed.port,
    }


def collect(feds: Mapping[str, Federation], timings: Mapping[str, dict[str, Any]],
            settings: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the two runs left behind, side by side."""
    rounds, k = int(settings["rounds"]), int(settings["kill_after"])
    runs: dict[str, dict[str, Any]] = {}
    folders: dict[str, RunFolder] = {}
    for label, fed in feds.items():
        folder = fed.run_folder()
        if folder is None:
            raise BenchError(f"{label} run: no run folder in the coordinator workdir {fed.server_dir}")
        folders[label] = folder
        report, state = folder.read_report(), folder.read_state()
        runs[label] = {
            **timings[label],
            "run_id": str(report["run_id"]),
            "run_dir": str(folder.path),
            "status": report.get("status"),
            "auroc": {str(r): v for r, v in auroc_by_round(report).items()},
            "final_auroc": final_auroc(report),
            "final": report.get("final", {}),
            "resumed_from": [int(x["from_round"]) for x in report.get("resumes", []) if "from_round" in x],
            "segments": len(state.get("segments", [])),
            "completed_round": state.get("completed_round"),
        }
    checkpoints: dict[str, Any] = {}
    for r in range(1, rounds + 1):
        a, b = (folders[label].checkpoint(r) for label in LABELS)
        checkpoints[str(r)] = compare_checkpoints(a, b) if a.is_file() and b.is_file() else None
    sites: dict[str, Any] = {}
    replayed_sites: list[str] = []
    for site in feds["resumed"].sites:
        per: dict[str, Any] = {}
        for label in LABELS:
            per[label] = read_ledger(feds[label].privacy(site), runs[label]["run_id"], rounds)
        text = _site_logs(feds["resumed"], site)
        per["replayed"] = log_replays(text)
        per["retrained"] = log_retrains(text)
        per["uninterrupted_replayed"] = log_replays(_site_logs(feds["uninterrupted"], site))
        per["booked_lost_round_at_kill"] = k + 1 in timings["resumed"].get("booked_at_kill", {}).get(site, [])
        if k + 1 in per["replayed"]:
            replayed_sites.append(site)
        sites[site] = per
    result: dict[str, Any] = {
        "settings": dict(settings),
        "expectation": EXPECTATION,
        "runs": runs,
        "checkpoints": checkpoints,
        "final_checkpoint": checkpoints.get(str(rounds)),
        "sites": sites,
        "replayed_sites": replayed_sites,
    }
    result["problems"] = problems_of(result)
    return result


def _site_logs(fed: Federation, site: str) -> str:
    """The fl-client output of a site, and any log file in its workdir's logs/ folder."""
    paths = [fed.logs / f"site-{site}.log", *sorted((fed.site_dir(site) / "logs").glob("*.log"))]
    return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sites", default="A,B,C", help="Comma-separated site names (default %(default)s).")
    p.add_argument("--images-per-site", type=int, default=300, help="Synthetic DICOMs per site (default 300).")
    p.add_argument("--rounds", type=int, default=4, help="Rounds of each run (default 4).")
    p.add_argument("--kill-after", type=int, default=2, help="Kill the coordinator after this round (default 2).")
    p.add_argument("--local-epochs", type=int, default=2, help="Local epochs per round (default 2).")
    p.add_argument("--image-size", type=int, default=32, help="Model input size (default 32).")
    p.add_argument("--batch-size", type=int, default=16, help="Run config batch-size (default 16).")
    p.add_argument("--learning-rate", type=float, default=0.03, help="Run config learning-rate (default 0.03).")
    p.add_argument("--round-timeout", type=int, default=300, help="Run config round-timeout in s (default 300).")
    p.add_argument("--easy-lesions", action="store_true",
                   help="Large, clearly hyperdense lesions (as in the fault tests): the model learns in a few rounds.")
    p.add_argument("--seed", type=int, default=7, help="Run seed, the same for both runs (default 7).")
    p.add_argument("--data-seed", type=int, default=0, help="Seed of the synthetic data (default 0).")
    p.add_argument("--max-epsilon", type=float, default=10.0, help="Each site's max ε (default 10).")
    p.add_argument("--threads", type=int, default=1, help="fl-client --threads (default 1).")
    p.add_argument("--timeout", type=int, default=1200, help="Seconds one run may take (default 1200).")
    p.add_argument("--workdir", type=Path, help="Work folder (default: a new temporary folder).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    p.add_argument("--json", type=Path, help="Write every figure to this JSON file.")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.site_names = [s.strip() for s in args.sites.split(",") if s.strip()]
    if len(args.site_names) < 2 or len(set(args.site_names)) != len(args.site_names):
        parser.error("--sites needs at least 2 distinct names")
    if not 1 <= args.kill_after < args.rounds:
        parser.error("--kill-after must be at least 1 and less than --rounds (a round must be left to lose)")
    if min(args.images_per_site, args.local_epochs, args.threads, args.timeout, args.batch_size) < 1:
        parser.error("--images-per-site, --local-epochs, --threads, --timeout and --batch-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:6.0f} s] {text}", file=sys.stderr, flush=True)

    made_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="fedrad-resume-")) if made_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {
        "sites": args.site_names, "images_per_site": args.images_per_site, "rounds": args.rounds,
        "kill_after": args.kill_after, "local_epochs": args.local_epochs, "image_size": args.image_size,
        "seed": args.seed, "data_seed": args.data_seed, "easy_lesions": args.easy_lesions,
        "max_epsilon": args.max_epsilon, "threads": args.threads,
        "run_config": run_config(args), "privacy_unit": "image", "secure_mode": False, "cores": cores,
    }
    feds: dict[str, Federation] = {}
    failure: str | None = None
    from common.errors import FedradError

    try:
        from simulations.synth import LesionModel, synthesize

        say(f"synthesising {len(args.site_names)} sites × {args.images_per_site} DICOMs in {work / 'data'}")
        # --easy-lesions: the fault tests' large, clearly hyperdense lesions (a model that learns in a few rounds).
        lesions = LesionModel(radius_mm=(28.0, 40.0), contrast_hu=(60.0, 80.0), subtle_fraction=0.0,
                              extra_axial_fraction=0.0) if args.easy_lesions else None
        synthesize(work / "data", sites=args.site_names, images_per_site=args.images_per_site, seed=args.data_seed,
                   size=48, overwrite=True, lesions=lesions)
        timings: dict[str, dict[str, Any]] = {}
        for label, runner in (("uninterrupted", run_uninterrupted), ("resumed", run_resumed)):
            root = work / label
            shutil.rmtree(root, ignore_errors=True)
            feds[label] = Federation(label=label, root=root, data=work / "data", sites=args.site_names, args=args,
                                     say=say)
            say(f"{label} run: starting (work folder {root})")
            timings[label] = runner(feds[label])
            say(f"{label} run: done in {timings[label]['wall_s']:.0f} s")
        result = collect(feds, timings, settings)
    except BenchError as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted; every process started is stopped"
    except (FedradError, OSError, ValueError, KeyError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        from common.processes import _alive

        # Still ours: alive with the start time it had when seen (a PID reused by another job is left alone).
        left = sorted(p for fed in feds.values() for p, t in fed.pids.items()
                      if t is not None and _alive(p) and start_time(p) == t)
        if left:  # ours only: PIDs this benchmark started or their descendants
            from common.processes import stop_pids

            say(f"warning: stopping processes left over: {left}")
            stop_pids(left)
        keep = args.keep or not made_tmp or failure is not None
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")
    if failure is not None:
        print(f"error: {' '.join(failure.split())}", file=sys.stderr)
        sys.exit(1)

    result["total_s"] = round(time.monotonic() - began, 1)
    result["command"] = " ".join(["python -m benchmarks.resume", *(argv if argv is not None else sys.argv[1:])])
    for line in render(result):
        print(line)
    print(f"total {result['total_s'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
