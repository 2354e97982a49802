"""What the benchmark scripts share: progress lines, a work folder, CPU readings, a table printer."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

__all__ = ["MACHINE", "CpuSampler", "Progress", "cores", "fmt", "machine_cpu", "markdown", "say", "tree_cpu", "workdir"]
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
    made = path is None
    work = Path(tempfile.mkdtemp(prefix=prefix)) if path is None else path.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        keep = True
        raise
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")
