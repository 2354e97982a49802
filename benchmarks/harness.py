"""What the benchmark scripts share: progress lines, a work folder, CPU and memory readings, a table printer."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from common.processes import Usage, descendants, stop_pids, tree_usage

__all__ = [
    "MACHINE", "CpuSampler", "Progress", "TreeSampler", "breakdown", "by_name", "cores", "fmt", "header_key",
    "machine_cpu", "markdown", "memory_mb", "parse_counts", "positive", "run_quietly", "say", "thread_label", "top", "tree_cpu",
    "workdir", "worker_messages",
]
_BEGAN = time.monotonic()
MACHINE = "(machine)"


def say(text: str) -> None:
    """A progress line on stderr, with the seconds since the benchmark began."""
    print(f"[{time.monotonic() - _BEGAN:6.0f} s] {text}", file=sys.stderr, flush=True)


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted, or "–" for None."""
    return "–" if value is None else format(value, spec)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def positive(text: str) -> float:
    """An argparse ``type``: a number above 0 (argparse names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, but got {text!r}")
    return value


def top(values: dict[str, float], k: int = 4, least: float = 0.05) -> str:
    """``"a 40.0, b 9.0"``: the first ``k`` entries of ``values`` (biggest first) of at least ``least``."""
    return ", ".join(f"{name} {v:.1f}" for name, v in list(values.items())[:k] if v >= least) or "–"


def parse_counts(text: str) -> list[int]:
    """An argparse ``type`` for ``--sites``: ``"10,100,1000"`` -> ``[10, 100, 1000]`` (order kept, duplicates dropped).

    Raises ``argparse.ArgumentTypeError`` unless each count is an integer >= 2 (argparse names the flag).
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if min(counts := list(dict.fromkeys(int(p) for p in parts))) < 2:
        raise argparse.ArgumentTypeError(f"each count must be at least 2, got {min(counts)}")
    return counts


def run_quietly(cmd: Sequence[str], *, timeout: float, cwd: Path | None = None) -> int | None:
    """Run ``cmd`` to its end, its stdout discarded and its stderr ours.

    Parameters
    ----------
    cmd
        The command line.
    timeout
        Seconds it may run; after that (or on an interruption, KeyboardInterrupt included) it and every
        descendant it started are stopped by PID.
    cwd
        Its working folder.

    Returns
    -------
    int or None
        Its exit code; None when it ran past ``timeout``.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            stop_pids([*descendants(proc.pid), proc.pid])
            proc.wait()


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 0) -> list[str]:
    """A markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(head))) + "|"
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def machine_cpu() -> float:
    """CPU seconds every process on this machine has used since boot."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal")))


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root``'s process tree so far, exited-and-reaped descendants included (0 when gone)."""
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        # a reaped child's time moves into its parent's children_* counters
        total += t.user + t.system + t.children_user + t.children_system
    return total


def header_key(public_key_file: Path) -> str:
    """A kit's public key as a SuperNode sends it in ``flwr-public-key`` (base64 of the PEM SubjectPublicKeyInfo)."""
    import base64

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode("ascii")


def worker_messages(site_dir: Path, windows: dict[int, tuple[float, float]]) -> dict[int, list[dict[str, Any]]]:
    """The messages a site's worker answered (its ``logs/worker.jsonl``, :mod:`client.worker`) per round window."""
    import json

    path = site_dir / "logs" / "worker.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r: [row for row in rows if "app_cpu_s" in row and a < row["at"] <= b] for r, (a, b) in windows.items()}


class CpuSampler(threading.Thread):
    """Every second, the CPU seconds of each named process tree and of the machine (:data:`MACHINE`)."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.done = roots, threading.Event()
        self.samples: list[tuple[float, dict[str, float]]] = []

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), {**{n: tree_cpu(p) for n, p in self.roots.items()}, MACHINE: machine_cpu()}))
            self.done.wait(1.0)

    def used(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each tree (and the machine) used between ``start`` and ``end``, where both are sampled."""
        pairs = {n: (self.at(n, start), self.at(n, end)) for n in [*self.roots, MACHINE]}
        return {n: b - a for n, (a, b) in pairs.items() if a is not None and b is not None}

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)

    def at(self, name: str, when: float) -> float | None:
        """The tree's CPU seconds at ``when``, interpolated between samples."""
        for (t0, a), (t1, b) in itertools.pairwise(self.samples):
            if t0 <= when <= t1:
                return a[name] if t1 == t0 else a[name] + (b[name] - a[name]) * (when - t0) / (t1 - t0)
        return None


def memory_mb(usage: Sequence[Usage]) -> dict[str, float | None]:
    """RSS, PSS and USS summed over ``usage``, in MB (MiB); PSS/USS None where any process lacks them."""
    out: dict[str, float | None] = {"rss_mb": round(sum(u.rss for u in usage) / 2**20, 1)}
    for key in ("pss", "uss"):
        values = [getattr(u, key) for u in usage]
        out[f"{key}_mb"] = None if None in values else round(sum(values) / 2**20, 1)
    return out


def by_name(usage: Sequence[Usage], names: dict[int, str] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`memory_mb` and the number of processes per process name (``names`` overrides by PID), biggest RSS
    first."""
    groups: dict[str, list[Usage]] = defaultdict(list)
    for u in usage:
        groups[(names or {}).get(u.pid, u.name)].append(u)
    ordered = sorted(groups.items(), key=lambda kv: -sum(u.rss for u in kv[1]))
    return {name: {"count": len(group), **memory_mb(group)} for name, group in ordered}


def breakdown(groups: dict[str, dict[str, Any]], k: int = 5) -> str:
    """``"USS MB: ray::ClientAppActor ×2 1,200, driver 400"``: the ``k`` biggest :func:`by_name` groups by USS (by
    RSS where USS is missing)."""
    key = "uss_mb" if all(g["uss_mb"] is not None for g in groups.values()) else "rss_mb"
    biggest = sorted(groups.items(), key=lambda kv: -kv[1][key])[:k]
    return f"{key[:3].upper()} MB: " + ", ".join(
        f"{name}{' ×' + str(g['count']) if g['count'] > 1 else ''} {g[key]:,.0f}" for name, g in biggest)


def thread_label(name: str) -> str:
    """A Python thread's name without its number: ``Thread-7 (poll)`` -> ``poll``, ``ThreadPoolExecutor-0_1`` ->
    ``ThreadPoolExecutor-0``."""
    if m := re.fullmatch(r"Thread-\d+ \((.+)\)", name):
        return m.group(1)
    return re.sub(r"_\d+$", "", name) if name.startswith("ThreadPoolExecutor") else name


class TreeSampler(threading.Thread):
    """Every ``interval`` s, this process's tree (psutil): peak memory per phase, the breakdown by process name at
    each phase's USS peak, and CPU seconds by process name and by thread of this process.

    RSS is read at every sample. PSS and USS cost ~10 ms of kernel time per torch-sized process: they are read
    within ``budget`` of one core, sooner (within 5× that) while the RSS sum climbs 2 % past the last reading to a
    new peak, and at every phase change and the stop. Each peak is the maximum of that sum over samples.
    """

    def __init__(self, interval: float = 0.2, budget: float = 0.02, phase: str = "start") -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.root, self.interval, self.budget, self.phase = os.getpid(), interval, budget, phase
        self.peaks: dict[str, dict[str, Any]] = {}  # phase -> peak rss_mb, pss_mb, uss_mb, processes
        self.peak_by_process: dict[str, dict[str, Any]] = {}
        self.samples = self.full_samples = 0
        self.own_cpu_s, self._cost, self._full_at, self._full_rss = 0.0, 0.0, -math.inf, 0.0
        self._cpu: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, started) -> (name, CPU s); exited kept
        self._threads: dict[int, tuple[str, float]] = {}
        self._lock, self._done = threading.Lock(), threading.Event()

    def set_phase(self, phase: str) -> None:
        """End the current phase with a full sample of its own; later samples count for ``phase``."""
        self.sample(full=True)
        with self._lock:
            self.phase = phase

    def sample(self, *, full: bool = False) -> None:
        """Read the tree once (PSS/USS when ``full`` or due) and fold it into peaks and CPU counters."""
        now, began, usage = time.monotonic(), time.thread_time(), tree_usage(self.root)
        wait, peak_rss = self._cost / self.budget, self.peaks.get(self.phase, {}).get("rss_mb", 0.0)
        rising = memory_mb(usage)["rss_mb"] > max(peak_rss, 1.02 * self._full_rss) and now - self._full_at >= wait / 5
        if full or rising or now - self._full_at >= max(self.interval, wait):
            t0, usage = time.thread_time(), tree_usage(self.root, full=True)
            self._cost, self._full_at = time.thread_time() - t0, now
            self._full_rss, self.full_samples = memory_mb(usage)["rss_mb"] or 0.0, self.full_samples + 1
        mem, threads = memory_mb(usage), psutil.Process(self.root).threads()
        # Ray retitles a worker as it runs ("ray::ClientAppActor.terminate"): the method is dropped
        names = {u.pid: "driver" if u.pid == self.root else re.sub(r"^(ray::[^.]+)\..*", r"\1", u.name) for u in usage}
        python = {t.native_id: t.name for t in threading.enumerate()}
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {"rss_mb": 0.0, "pss_mb": None, "uss_mb": None, "processes": 0})
            uss, top = mem["uss_mb"], peak["uss_mb"]  # the breakdown of the sample with the most USS (else RSS)
            if (uss or 0) > (top or 0) or (top is None and mem["rss_mb"] > peak["rss_mb"]):
                self.peak_by_process[self.phase] = by_name(usage, names)
            for key, value in (*mem.items(), ("processes", len(usage))):
                peak[key] = peak[key] if value is None else max(peak[key] or 0, value)
            self._cpu.update({(u.pid, u.started): (names[u.pid], u.cpu_s) for u in usage})
            for t in threads:  # a thread Python did not start (Ray's, torch's) is "native"
                label = thread_label(python[t.id]) if t.id in python else self._threads.get(t.id, ("native", 0.0))[0]
                self._threads[t.id] = (label, t.user_time + t.system_time)
            self.samples += 1
        self.own_cpu_s += time.thread_time() - began

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a sampler must never take the measurement down
                say(f"sampler: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Stop sampling, after one last full sample."""
        self._done.set()
        self.join(timeout=10)
        self.sample(full=True)

    def mark(self) -> tuple[dict[Any, tuple[str, float]], dict[Any, tuple[str, float]]]:
        """A snapshot of the CPU counters (by process, by thread), for :meth:`cpu_since`."""
        self.sample()
        with self._lock:
            return dict(self._cpu), dict(self._threads)

    def cpu_since(self, mark: tuple[dict[Any, tuple[str, float]], ...] | None = None) -> tuple[dict[str, float], ...]:
        """CPU seconds since ``mark`` (from the start without one) by process name and by thread name, biggest first."""
        out = []
        for now, before in zip(self.mark(), mark or ({}, {}), strict=True):
            used: dict[str, float] = defaultdict(float)
            for key, (name, cpu) in now.items():
                used[name] += cpu - before.get(key, (name, 0.0))[1]
            out.append(dict(sorted(((k, round(v, 1)) for k, v in used.items()), key=lambda kv: -kv[1])))
        return tuple(out)


class Progress:
    """Called while a federation runs: a line for every round its report says was evaluated."""

    def __init__(self, fed: Any, label: str) -> None:
        self.fed, self.label, self.seen, self.started = fed, label, 0, time.monotonic()

    def __call__(self) -> None:
        folder = self.fed.run_folder()
        try:
            done = [r for r in folder.read_report().get("rounds", []) if "evaluated_at" in r] if folder else []
        except (OSError, ValueError):  # being replaced
            return
        for r in done[self.seen:]:
            auroc = r.get("evaluate", {}).get("pooled", {}).get("auroc")
            say(f"{self.label}: round {r['round']} evaluated, pooled AUROC {fmt(auroc, '.4f')} "
                f"({time.monotonic() - self.started:.0f} s since start)")
        self.seen = max(self.seen, len(done))


@contextmanager
def workdir(path: Path | None, *, prefix: str, keep: bool) -> Iterator[Path]:
    """``path``, or a new temporary folder removed at the end unless ``keep`` or on an error (to look into)."""
    work = Path(tempfile.mkdtemp(prefix=prefix)) if path is None else path.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        keep = True
        raise
    finally:
        if path is None and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")

