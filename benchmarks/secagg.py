"""SecAgg+ next to plain FedAvg over the same secure federation: round time, upload, masking CPU.

    python -m benchmarks.secagg [--sites 3,5,10] [--images-per-site 2000] [--rounds 2]
                                [--local-epochs 3] [--image-size 64] [--dicom-size 128]
                                [--threads 1] [--out FILE.json] [--workdir DIR] [--keep]
                                [--timeout 3600]

Synthesises ``max(--sites)`` hospitals once (fl-synth, seed 0, ``--images-per-site``
DICOMs of ``--dicom-size`` pixels each; a federation of n sites uses the first
n), then for every site count runs two real federations on loopback, one after
the other, with the same data and the same run config: plain FedAvg
(``fl-server -c 'secagg=false'``) and SecAgg+ (the default). The order of the
pair alternates from one site count to the next. Each federation is what a
consortium runs: ``fl-server enroll`` per site, ``fl-server`` (TLS SuperLink
with SuperNode authentication behind the nginx Fleet-API proxy) and one
``fl-client --kit ... --threads 1`` per site, each with a fresh work folder
(so a fresh privacy ledger and cache). Every process is stopped by PID when its
federation ends, on error and on Ctrl-C too.

Measured, for rounds 2..``--rounds`` (round 1 also pays for start-up: SuperNode
registration, the first ClientApp processes, SecAgg+ key set-up):

* round time: ``evaluated_at(r) - evaluated_at(r-1)`` from the run's
  ``report.json`` (fit, aggregation and federated evaluation); "fit" is the part
  up to ``trained_at(r)``;
* upload per site and round: the sum of ``$request_length`` (request line,
  headers and body as nginx received them, TLS records not counted) of every
  Fleet API call the site made inside the round's window, from the proxy's
  access log, each call attributed to a site by its ``flwr-public-key`` header
  (base64 of the PEM public key, compared with each kit's ``site.pub``);
* site CPU per round: user + system CPU of the site's whole process tree
  (fl-client, flower-supernode, flower-superexec and every ClientApp process,
  exited ones included), sampled once a second from ``/proc``;
* masking CPU (SecAgg+ only): the ``secagg_cpu_s`` every protocol stage logs
  to ``<site work dir>/logs/secagg.jsonl`` (what Flower's ``secaggplus_mod``
  costs besides the training it calls), against ``train_cpu_s``, the CPU of
  the ClientApp's train handler inside the ``collect_masked_vectors`` stage.

Prints one table and writes every figure as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("plain", "secagg")
LABEL = {"plain": "plain", "secagg": "SecAgg+"}
LISTEN_TIMEOUT_S = 120.0
SAMPLE_INTERVAL_S = 1.0
MACHINE = "(machine)"
ACCESS_LOG = Path("proxy") / "logs" / "access.log"  # under the coordinator's workdir (server/proxy.py)
# The tail of server/proxy.py's "fedrad" log format:
# ... "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_length $msec "$http_flwr_public_key"
_ACCESS = re.compile(
    r'"(?P<method>\S+) (?P<uri>\S+)[^"]*" (?P<status>\d{3}) (?P<sent>\d+) "[^"]*" "[^"]*" '
    r'(?P<length>\d+) (?P<msec>\d+\.\d+) "(?P<key>[^"]*)"$'
)


def site_names(count: int) -> list[str]:
    """A, B, ... Z, then S27, S28, ..."""
    letters = string.ascii_uppercase
    return [letters[i] if i < len(letters) else f"S{i + 1}" for i in range(count)]


def header_key(public_key_file: Path) -> str:
    """A kit's public key as a SuperNode sends it in ``flwr-public-key``.

    Flower's ``NodeAuthHttpInterceptor`` sends ``b64encode(public_key_to_bytes(key))``,
    where ``public_key_to_bytes`` is the PEM SubjectPublicKeyInfo.
    """
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode("ascii")


# --- CPU of process trees, from /proc -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, own CPU s, CPU s of its reaped children) for every process we can read."""
    table: dict[int, tuple[int, float, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        own = (int(fields[11]) + int(fields[12])) / _TICK
        reaped = (int(fields[13]) + int(fields[14])) / _TICK
        table[int(entry.name)] = (int(fields[1]), own, reaped)
    return table


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each root's process tree, exited-and-reaped descendants included.

    Also the whole machine's, under :data:`MACHINE`.

    A live (or zombie) process counts its own time; once its parent reaps it, the
    time moves into the parent's ``cutime``/``cstime``, which we count too.
    """
    table = _proc_table()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            if pid not in table:
                continue
            _, own, reaped = table[pid]
            total += own + reaped
            stack.extend(children.get(pid, ()))
        out[name] = total
    out[MACHINE] = machine_cpu()
    return out


def machine_cpu() -> float:
    """CPU seconds every process on this machine has used since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


class CpuSampler(threading.Thread):
    """Samples :func:`tree_cpu` every second until stopped: ``[(epoch s, {name: cpu s})]``."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.time(), tree_cpu(self.roots)))
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def at(self, name: str, when: float) -> float | None:
        """The tree's CPU seconds at ``when``, interpolated between samples."""
        points = [(t, cpu[name]) for t, cpu in self.samples if name in cpu]
        if not points or when < points[0][0] or when > points[-1][0]:
            return None
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)
        return points[-1][1]


# --- one federation -------------------------------------------------------------------------------


@dataclass
class Federation:
    """What one run left behind, and what we measured while it ran."""

    mode: str
    names: list[str]
    root: Path
    wall_s: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    cpu: CpuSampler | None = None
    keys: dict[str, str] = field(default_factory=dict)  # header value -> site

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def site_dir(self, name: str) -> Path:
        return self.root / "sites" / name


def _bin(name: str) -> str:
    from common.flower import flower_bin

    return flower_bin(name)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _report_path(server_dir: Path) -> Path | None:
    found = sorted((server_dir / "runs").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_federation(
    fed: Federation, data: Path, args: argparse.Namespace, say: Any,
) -> None:
    """Enroll, serve, join, wait for the run to finish, stop everything; fills ``fed``."""
    from common.errors import FederationError
    from common.processes import LOOPBACK, ProcessSet, can_connect, free_port

    n = len(fed.names)
    logs = fed.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    for name in fed.names:
        proc = subprocess.run(
            [_bin("fl-server"), "enroll", "--site", name, "--workdir", str(fed.server_dir),
             "--server-address", f"{LOOPBACK}:{port}"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise FederationError(f"fl-server enroll --site {name} failed: {proc.stderr.strip()[-500:]}")
        fed.keys[header_key(fed.server_dir / "kits" / name / "site.pub")] = name
    server_cmd = [
        _bin("fl-server"), "--rounds", str(args.rounds), "--min-sites", str(n), "--port", str(port),
        "--workdir", str(fed.server_dir), "--image-size", str(args.image_size),
        "--local-epochs", str(args.local_epochs),
    ]
    if fed.mode == "plain":
        server_cmd += ["-c", "secagg=false"]
    started = time.monotonic()
    with ProcessSet() as procs:
        server = procs.start("fl-server", server_cmd, log_path=logs / "fl-server.log")
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while not can_connect(LOOPBACK, port, timeout=0.5):
            if not server.running() or time.monotonic() > deadline:
                raise FederationError(
                    f"fl-server did not listen on {LOOPBACK}:{port}; its log ends with:\n{_tail(logs / 'fl-server.log')}"
                )
            time.sleep(0.5)
        clients = {}
        for name in fed.names:
            clients[name] = procs.start(
                f"fl-client {name}",
                [
                    _bin("fl-client"), "--kit", str(fed.server_dir / "kits" / name),
                    "--server", f"{LOOPBACK}:{port}", "--data", str(data / name),
                    "--workdir", str(fed.site_dir(name)), "--threads", str(args.threads),
                    "-c", f"image-size={args.image_size}",
                ],
                log_path=logs / f"site-{name}.log",
            )
        fed.cpu = CpuSampler({"server": server.pid, **{name: c.pid for name, c in clients.items()}})
        fed.cpu.start()
        try:
            deadline = time.monotonic() + args.timeout
            seen = 0
            while server.running():
                if time.monotonic() > deadline:
                    raise FederationError(f"the {LABEL[fed.mode]} federation took longer than {args.timeout} s")
                for name, client in clients.items():
                    if not client.running():
                        raise FederationError(
                            f"fl-client {name} exited during the run; its log ends with:\n"
                            f"{_tail(logs / f'site-{name}.log')}"
                        )
                seen = _progress(fed, seen, started, say)
                time.sleep(1)
            _progress(fed, seen, started, say)
        finally:
            fed.cpu.stop()
        if server.popen.returncode != 0:
            raise FederationError(
                f"fl-server exited with code {server.popen.returncode}; its log ends with:\n"
                f"{_tail(logs / 'fl-server.log')}"
            )
    fed.wall_s = time.monotonic() - started
    path = _report_path(fed.server_dir)
    if path is None:
        raise FederationError(f"fl-server left no report under {fed.server_dir / 'runs'}")
    fed.report = json.loads(path.read_text())


def _progress(fed: Federation, seen: int, started: float, say: Any) -> int:
    path = _report_path(fed.server_dir)
    if path is None:
        return seen
    try:
        rounds = json.loads(path.read_text()).get("rounds", [])
    except (OSError, ValueError):  # being replaced
        return seen
    done = [r for r in rounds if "evaluated_at" in r]
    for r in done[seen:]:
        say(f"    {LABEL[fed.mode]}, {len(fed.names)} sites: round {r['round']} evaluated "
            f"({time.monotonic() - started:.0f} s since start)")
    return max(seen, len(done))


def _leftovers() -> list[int]:
    from common.processes import _alive, descendants

    return [pid for pid in descendants(os.getpid()) if _alive(pid)]


# --- figures --------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def figures(fed: Federation) -> dict[str, Any]:
    """Everything measured for one federation, per site and round, over rounds 2..R."""
    report = fed.report
    rounds = {int(r["round"]): r for r in report["rounds"]}
    problems: list[str] = []
    if report.get("status") != "completed":
        problems.append(f"run status {report.get('status')!r}")
    windows: dict[int, tuple[float, float]] = {}
    fit_s: list[float] = []
    for r in sorted(rounds):
        prev = rounds.get(r - 1)
        if r < 2 or prev is None or "evaluated_at" not in prev or "evaluated_at" not in rounds[r]:
            continue
        windows[r] = (prev["evaluated_at"], rounds[r]["evaluated_at"])
        if "trained_at" in rounds[r]:
            fit_s.append(rounds[r]["trained_at"] - prev["evaluated_at"])
        train = rounds[r].get("train", {})
        trained = set(train.get("sites", {}))
        if trained != set(fed.names) or train.get("declined") or train.get("failed"):
            problems.append(
                f"round {r}: trained {len(trained)}/{len(fed.names)} sites, "
                f"declined {sorted(train.get('declined', {}))}, failed {sorted(train.get('failed', {}))}"
            )
    if not windows:
        problems.append("no round >= 2 was evaluated: nothing measured")
    round_s = [end - start for start, end in windows.values()]

    # upload/download per site and round, from the proxy's access log
    up: dict[tuple[str, int], int] = defaultdict(int)
    down: dict[tuple[str, int], int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)  # upload bytes per Fleet API method, all sites and rounds
    ncalls: dict[str, int] = defaultdict(int)
    unattributed = 0
    log_path = fed.server_dir / ACCESS_LOG
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    if not lines:
        problems.append(f"no access log at {log_path}")
    for line in lines:
        m = _ACCESS.search(line)
        if m is None:
            problems.append(f"unparsed access-log line: {line[:80]}")
            continue
        when = float(m["msec"])
        r = next((r for r, (a, b) in windows.items() if a < when <= b), None)
        if r is None:
            continue
        site = fed.keys.get(m["key"])
        if site is None:
            unattributed += int(m["length"])
            continue
        up[site, r] += int(m["length"])
        down[site, r] += int(m["sent"])
        method = m["uri"].rsplit("/", 1)[-1]
        calls[method] += int(m["length"])
        ncalls[method] += 1
    per = len(fed.names) * max(len(windows), 1)
    upload = [up[s, r] for s in fed.names for r in windows]

    # CPU of each site's process tree, and of the coordinator's
    site_cpu: list[float] = []
    server_cpu: list[float] = []
    other_cores: list[float] = []  # CPU that processes not of this federation used, in cores
    if fed.cpu is not None:
        for start, end in windows.values():
            used = {}
            for name in [*fed.names, "server", MACHINE]:
                a, b = fed.cpu.at(name, start), fed.cpu.at(name, end)
                if a is not None and b is not None:
                    used[name] = b - a
            site_cpu += [used[name] for name in fed.names if name in used]
            if "server" in used:
                server_cpu.append(used["server"])
            if len(used) == len(fed.names) + 2:
                ours = sum(v for k, v in used.items() if k != MACHINE)
                other_cores.append((used[MACHINE] - ours) / (end - start))

    # masking CPU, from each site's secagg.jsonl
    mask: dict[tuple[str, int], float] = defaultdict(float)
    train_cpu: dict[tuple[str, int], float] = defaultdict(float)
    stage_wall: dict[str, list[float]] = defaultdict(list)
    stage_cpu: dict[str, list[float]] = defaultdict(list)
    for name in fed.names:
        path = fed.site_dir(name) / "logs" / "secagg.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            try:
                r = int(row["round"])
            except (TypeError, ValueError):
                continue
            if r not in windows:
                continue
            mask[name, r] += row["secagg_cpu_s"]
            train_cpu[name, r] += row["train_cpu_s"]
            stage_wall[row["stage"]].append(row["wall_s"])
            stage_cpu[row["stage"]].append(row["secagg_cpu_s"])
    if fed.mode == "secagg" and len(mask) != per:
        problems.append(f"secagg.jsonl has {len(mask)} of {per} site-rounds")
    mask_total, train_total = sum(mask.values()), sum(train_cpu.values())
    train_images = [
        rounds[r]["train"]["sites"][s].get("num-examples") for r in windows for s in rounds[r]["train"].get("sites", {})
    ]
    return {
        "sites": len(fed.names),
        "mode": fed.mode,
        "run_id": report.get("run_id"),
        "status": report.get("status"),
        "federation_wall_s": round(fed.wall_s, 1),
        "rounds_measured": sorted(windows),
        "round_s": _mean(round_s),
        "round_s_each": round_s,
        "fit_s": _mean(fit_s),
        "evaluate_s": _mean([a - b for a, b in zip(round_s, fit_s, strict=False)]),
        "train_images_per_site": _mean([float(x) for x in train_images if x is not None]),
        "upload_bytes_per_site_round": _mean([float(x) for x in upload]),
        "upload_bytes_min_max": [min(upload), max(upload)] if upload else None,
        "download_bytes_per_site_round": _mean([float(down[s, r]) for s in fed.names for r in windows]),
        "upload_bytes_per_site_round_by_call": {k: v / per for k, v in sorted(calls.items())},
        "calls_per_site_round": {k: v / per for k, v in sorted(ncalls.items())},
        "unattributed_upload_bytes": unattributed,
        "site_cpu_s_per_round": _mean(site_cpu),
        "server_cpu_s_per_round": _mean(server_cpu),
        "machine_cores_used_by_others": _mean(other_cores),
        "mask_cpu_s_per_site_round": mask_total / len(mask) if mask else None,
        "train_cpu_s_per_site_round": train_total / len(train_cpu) if train_cpu else None,
        "mask_pct_of_train": 100 * mask_total / train_total if train_total else None,
        "stage_wall_s": {k: statistics.fmean(v) for k, v in stage_wall.items()},
        "stage_secagg_cpu_s": {k: statistics.fmean(v) for k, v in stage_cpu.items()},
        "problems": problems,
    }


# --- report ---------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(results: list[dict[str, Any]]) -> list[str]:
    header = (
        f"{'sites':>5}  {'mode':<8}{'round s':>9}{'× plain':>9}{'fit s':>8}{'upload kB':>11}{'× plain':>9}"
        f"{'site CPU s':>12}{'mask CPU s':>12}{'mask/train':>12}{'others':>8}"
    )
    lines = [header, "-" * len(header)]
    plain = {r["sites"]: r for r in results if r["mode"] == "plain"}
    for res in sorted(results, key=lambda r: (r["sites"], MODES.index(r["mode"]))):
        base = plain.get(res["sites"]) if res["mode"] != "plain" else None
        t_ratio = _ratio(res["round_s"], base["round_s"]) if base else None
        b_ratio = _ratio(res["upload_bytes_per_site_round"], base["upload_bytes_per_site_round"]) if base else None
        up = res["upload_bytes_per_site_round"]
        pct = res["mask_pct_of_train"]
        lines.append(
            f"{res['sites']:>5}  {LABEL[res['mode']]:<8}{_fmt(res['round_s'], '.1f'):>9}{_fmt(t_ratio, '.2f'):>9}"
            f"{_fmt(res['fit_s'], '.1f'):>8}{_fmt(None if up is None else up / 1e3, ',.1f'):>11}"
            f"{_fmt(b_ratio, '.2f'):>9}{_fmt(res['site_cpu_s_per_round'], '.1f'):>12}"
            f"{_fmt(res['mask_cpu_s_per_site_round'], '.3f'):>12}"
            f"{'–' if pct is None else f'{pct:.2f} %':>12}"
            f"{_fmt(res['machine_cores_used_by_others'], '.1f'):>8}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="3,5,10", help="Comma-separated site counts.")
    parser.add_argument("--images-per-site", type=int, default=2000, help="Synthetic DICOMs per site.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds per federation (2..R are measured).")
    parser.add_argument("--local-epochs", type=int, default=3, help="Local epochs per round (fl-server).")
    parser.add_argument("--image-size", type=int, default=64, help="Model input size (fl-server --image-size).")
    parser.add_argument("--dicom-size", type=int, default=128, help="Rows and columns of the synthetic DICOMs.")
    parser.add_argument("--threads", type=int, default=1, help="fl-client --threads (torch threads per site).")
    parser.add_argument("--out", type=Path, default=Path("secagg-bench.json"), help="JSON results file.")
    parser.add_argument("--workdir", type=Path, help="Work folder (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (data, logs, reports).")
    parser.add_argument("--timeout", type=int, default=3600, help="Seconds one federation may take.")
    args = parser.parse_args()
    try:
        counts = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sites expects comma-separated integers, got {args.sites!r}")
    if not counts or min(counts) < 2:
        parser.error("--sites: every federation needs at least 2 sites (SecAgg+ needs several)")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 includes start-up and is not measured")
    if min(args.images_per_site, args.local_epochs, args.threads, args.timeout) < 1:
        parser.error("--images-per-site, --local-epochs, --threads and --timeout must be positive")

    from common.errors import FederationError
    from simulations.synth import synthesize

    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:6.0f} s] {text}", file=sys.stderr, flush=True)

    made_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="fedrad-secagg-")) if made_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = site_names(max(counts))
    results: list[dict[str, Any]] = []
    failed = False
    try:
        say(f"synthesising {len(names)} sites × {args.images_per_site:,} DICOMs in {work / 'data'}")
        synthesize(work / "data", sites=names, images_per_site=args.images_per_site, seed=0,
                   size=args.dicom_size, overwrite=True)
        for i, n in enumerate(counts):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                fed = Federation(mode=mode, names=names[:n], root=work / f"{n}-sites-{mode}")
                shutil.rmtree(fed.root, ignore_errors=True)
                say(f"{n} sites, {LABEL[mode]}: starting (work folder {fed.root})")
                try:
                    run_federation(fed, work / "data", args, say)
                except FederationError as exc:
                    failed = True
                    say(f"{n} sites, {LABEL[mode]}: FAILED: {exc}")
                    continue
                finally:
                    left = _leftovers()
                    if left:
                        say(f"warning: processes still running after the federation: {left}")
                res = figures(fed)
                res["order"] = order.index(mode)
                results.append(res)
                say(
                    f"{n} sites, {LABEL[mode]}: round {_fmt(res['round_s'], '.1f')} s, "
                    f"upload {_fmt((res['upload_bytes_per_site_round'] or 0) / 1e3, ',.1f')} kB/site/round, "
                    f"federation {res['federation_wall_s']:.0f} s"
                    + (f"; problems: {res['problems']}" if res["problems"] else "")
                )
    except KeyboardInterrupt:
        say("interrupted; every process we started is stopped")
        failed = True
    finally:
        if made_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or not made_tmp:
            say(f"work folder kept: {work}")

    total = time.monotonic() - began
    demo = next((r for r in results if r.get("train_images_per_site")), None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {
        "images_per_site": args.images_per_site,
        "train_images_per_site": demo["train_images_per_site"] if demo else None,
        "local_epochs": args.local_epochs,
        "image_size": args.image_size,
        "dicom_size": args.dicom_size,
        "rounds": args.rounds,
        "threads_per_site": args.threads,
        "cores": cores,
    }
    print(
        f"fedrad SecAgg+ overhead: plain FedAvg vs SecAgg+ over the same TLS federation (nginx Fleet-API proxy, "
        f"SuperNode auth), {cores} cores, every process on loopback"
    )
    train = f" (~{settings['train_images_per_site']:,.0f} in the training split)" if demo else ""
    print(
        f"demo-size: {args.images_per_site:,} synthetic {args.dicom_size}x{args.dicom_size} CT images per site"
        f"{train}, model input {args.image_size}x{args.image_size}, {args.local_epochs} local epochs of "
        f"Opacus DP-SGD per round, fl-client --threads {args.threads}"
    )
    print(
        f"rounds 2..{args.rounds} measured (round = evaluated_at(r) - evaluated_at(r-1): fit + evaluation); "
        "per site and round: upload = request bytes at the proxy, site CPU = its whole process tree, "
        "mask CPU = secaggplus_mod's own CPU; others = cores busy with processes not of the federation"
    )
    for line in table(results):
        print(line)
    print(f"total {total / 60:.1f} min")
    for res in results:
        for problem in res["problems"]:
            print(f"note: {res['sites']} sites, {LABEL[res['mode']]}: {problem}")
    args.out.write_text(
        json.dumps(
            {"command": " ".join(["python -m benchmarks.secagg", *sys.argv[1:]]), "settings": settings,
             "total_s": round(total, 1), "results": results},
            indent=2,
        )
    )
    print(f"results: {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
