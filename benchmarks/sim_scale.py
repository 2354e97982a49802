"""fl-sim at scale: one federated round with 10, 100, 1000 virtual sites; time and peak memory per size.

    python -m benchmarks.sim_scale [--sites 10,100,1000] [--concurrency 2] [--secagg]
                                   [--unit patient] [--workdir DIR] [--keep] [--json FILE]
                                   [--timeout 7200] [--interval 0.2]

For every site count N, in a fresh subprocess of this script (``--one N``, which
prints one JSON line), so that neither Ray's state nor memory carries over from
one size to the next and every peak is that size's own:

1. **data preparation**: ``fl-sim``'s own ``prepare_data`` (fl-synth: N sites ×
   24 DICOMs of 16 px, the ``scale`` scenario) and ``warm_caches`` (every site's
   preprocessing cache), timed. Both are built once per data spec under
   ``--workdir`` and reused: the table says "new" or "cached".
2. **the round**: ``simulations.run.simulate`` on ``scale`` with
   ``sites.count=N``, DP on (``privacy.dp=true``, ``privacy.unit=--unit``,
   default patient-level), ``simulation.concurrency=--concurrency`` Ray actors,
   one federated round (train + federated evaluation of every site), SecAgg+
   only with ``--secagg``. Nothing else is changed: the real ServerApp and
   ClientApp on Flower's Simulation Runtime.

Measured:

* **round s**: ``evaluated_at`` of round 1 minus ``started`` from the run's
  ``report.json`` (the ServerApp's clock: from the moment it starts, which is
  while Ray is still starting, to the end of the federated evaluation);
  **fit s** is the part up to ``trained_at``. **simulate s** is the wall time of
  the whole ``simulate()`` call: the (cached) data check, Ray start-up, the
  round, the report and plots, and Ray's shutdown.
* **site-rounds/s**: N / round s (a site-round = one site training once and
  evaluating once);
* **ClientApp s/site-round**: the seconds Flower's Simulation Runtime measured
  around every ClientApp message (its ``VceMetrics``; train and evaluate
  messages, SecAgg+ stages too), summed, over N. The actors' **busy** share is
  that sum over (round s × concurrency): the rest is time the actors waited on
  Flower's dispatch, the ServerApp or Ray start-up.
* **peak memory**, sampled every ``--interval`` s (0.2) in a background thread
  over this subprocess and all its descendants (Ray's GCS, raylet, agents and
  every worker; the tree is rebuilt from ``/proc/*/stat`` at each sample):
  **RSS** = the sum of ``VmRSS`` (``/proc/PID/status``); it counts every shared
  page (libraries, torch, Ray's shared-memory object store) once per process
  that maps it, so it over-states the real footprint. **PSS** = the sum of
  ``Pss`` (``/proc/PID/smaps_rollup``), shared pages split between the
  processes that map them: what the tree really occupies. **USS** = the sum of
  ``Private_Clean + Private_Dirty``: the pages only one process maps (what
  stopping them would free; shared pages are left out entirely, so it
  under-states). RSS is read at every sample; ``smaps_rollup`` costs ~10 ms of
  kernel time per torch-sized process, so PSS and USS are read within 2 % of
  one core (about every 2 s) and sooner while the RSS sum climbs to a new peak.
  Each column is the maximum over samples of that sum (the three peaks need
  not be the same sample). "per concurrent site" divides the round's USS peak
  by ``--concurrency``; "per site" by N. Memory that grows with concurrency and
  not with N shows as a flat peak and a falling "per site". The breakdown by
  process name at the USS peak is printed below the tables; the prep phase has
  its own peak (in the JSON), and so does the time series (every 5 s).
* **where time goes** (second table): start-up (``started`` → the first
  ClientApp reply: Ray, its actors and the first, cold, message), the rate after
  it (N / (``evaluated_at`` − first reply)), the ClientApp seconds of the train
  and of the evaluate messages (each message is timestamped by wrapping
  ``simulations.runtime._vce_metrics`` in the ``--one`` process), the CPU seconds of every process of the tree by name (the driver,
  ``ray::ClientAppActor`` workers, raylet, GCS, ...), the driver's CPU by
  Python thread (Flower's ``add_messages_to_queue`` poller, the ServerApp
  thread, the worker threads, ...), read from ``/proc/PID/task/*/stat``, and
  the cores that processes outside the tree used meanwhile (``/proc/stat``):
  the machine is shared, and what others use is not ours to count.

The sampler's own CPU is reported too. Prints two markdown tables; ``--json``
writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import machine_cpu

RESULT_PREFIX = "SIM_SCALE_RESULT "
SCENARIO = "scale"
DEFAULT_SITES = "10,100,1000"
UNITS = ("patient", "image")

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MB = 1024.0  # kB per MB (MiB)


# --- /proc: the process tree, its memory and CPU ---------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """One line of ``/proc/PID/stat``, the fields we use."""

    pid: int
    ppid: int
    comm: str
    cpu_s: float  # utime + stime
    start: int  # starttime (clock ticks after boot): (pid, start) names a process uniquely


def read_stat(pid: int | str, base: str = "/proc") -> ProcStat | None:
    """``/proc/PID/stat`` parsed (the name may hold spaces and parentheses); None if it is gone."""
    try:
        with open(f"{base}/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    head, _, tail = raw.rpartition(")")
    comm = head.split("(", 1)[1] if "(" in head else ""
    fields = tail.split()
    # after the name: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19)
    try:
        return ProcStat(
            pid=int(pid), ppid=int(fields[1]), comm=comm,
            cpu_s=(int(fields[11]) + int(fields[12])) / _TICK, start=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def proc_table() -> dict[int, ProcStat]:
    """Every process we can read: pid -> its stat."""
    out: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(entry.name)
            if st is not None:
                out[st.pid] = st
    return out


def tree_pids(root: int, table: dict[int, ProcStat]) -> list[int]:
    """``root`` (if alive) and all its descendants in ``table``."""
    children: dict[int, list[int]] = defaultdict(list)
    for st in table.values():
        children[st.ppid].append(st.pid)
    out, stack = [], [root] if root in table else []
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def _kb_fields(path: str, names: tuple[str, ...]) -> dict[str, int] | None:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[key] = int(value.split()[0])
    return out


@dataclass(frozen=True)
class Memory:
    """kB of one process (or a sum over processes); pss/uss None where smaps_rollup is unreadable."""

    rss_kb: int
    pss_kb: int | None
    uss_kb: int | None


def process_memory(pid: int, *, smaps: bool = True) -> Memory | None:
    """VmRSS from ``status``; Pss and Private_Clean+Private_Dirty from ``smaps_rollup`` (with ``smaps``:
    it walks the page tables, ~10 ms for a process that imported torch). None if the process is gone."""
    status = _kb_fields(f"/proc/{pid}/status", ("VmRSS",))
    if status is None:
        return None
    if not smaps:
        return Memory(status.get("VmRSS", 0), None, None)
    rollup = _kb_fields(f"/proc/{pid}/smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty"))
    if not rollup or "Pss" not in rollup:
        return Memory(status.get("VmRSS", 0), None, None)
    return Memory(
        status.get("VmRSS", 0), rollup["Pss"], rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    )


def sum_memory(parts: list[Memory]) -> Memory:
    """The sum; pss/uss are None if any part lacks them (a partial sum would mislead)."""
    rss = sum(m.rss_kb for m in parts)
    pss = None if any(m.pss_kb is None for m in parts) else sum(m.pss_kb or 0 for m in parts)
    uss = None if any(m.uss_kb is None for m in parts) else sum(m.uss_kb or 0 for m in parts)
    return Memory(rss, pss, uss)


def tree_memory_by_pid(
    root: int, table: dict[int, ProcStat] | None = None, *, smaps: bool = True
) -> dict[int, Memory]:
    """The memory of every process of ``root``'s tree still there when read."""
    table = proc_table() if table is None else table
    out = {}
    for pid in tree_pids(root, table):
        mem = process_memory(pid, smaps=smaps)
        if mem is not None:
            out[pid] = mem
    return out


def tree_memory(
    root: int, table: dict[int, ProcStat] | None = None, *, smaps: bool = True
) -> tuple[Memory, list[int]]:
    """The summed memory of ``root``'s process tree, and the pids counted (a process may exit meanwhile)."""
    parts = tree_memory_by_pid(root, table, smaps=smaps)
    return sum_memory(list(parts.values())), list(parts)


def by_name(parts: dict[int, Memory], names: dict[int, str]) -> dict[str, dict[str, float | int | None]]:
    """Per-process memory summed by process name, in MB, biggest RSS first."""
    groups: dict[str, list[Memory]] = defaultdict(list)
    for pid, mem in parts.items():
        groups[names.get(pid, "?")].append(mem)
    out = {}
    for name, mems in sorted(groups.items(), key=lambda kv: -sum(m.rss_kb for m in kv[1])):
        total = sum_memory(mems)
        out[name] = {
            "count": len(mems), "rss_mb": round(total.rss_kb / MB, 1),
            "pss_mb": None if total.pss_kb is None else round(total.pss_kb / MB, 1),
            "uss_mb": None if total.uss_kb is None else round(total.uss_kb / MB, 1),
        }
    return out


def _thread_label(name: str) -> str:
    """``Thread-7 (add_messages_to_queue)`` -> ``add_messages_to_queue``; ``ThreadPoolExecutor-0_1`` -> ``ThreadPoolExecutor-0``."""
    m = re.fullmatch(r"Thread-\d+ \((.+)\)", name)
    if m:
        return m.group(1)
    m = re.fullmatch(r"(.+)_\d+", name)
    return m.group(1) if m and name.startswith("ThreadPoolExecutor") else name


@dataclass
class Peak:
    rss_kb: int = 0
    pss_kb: int | None = None
    uss_kb: int | None = None
    processes: int = 0

    def update(self, mem: Memory, processes: int) -> None:
        self.rss_kb = max(self.rss_kb, mem.rss_kb)
        if mem.pss_kb is not None:
            self.pss_kb = max(self.pss_kb or 0, mem.pss_kb)
        if mem.uss_kb is not None:
            self.uss_kb = max(self.uss_kb or 0, mem.uss_kb)
        self.processes = max(self.processes, processes)

    def as_mb(self) -> dict[str, float | int | None]:
        return {
            "rss_mb": round(self.rss_kb / MB, 1),
            "pss_mb": None if self.pss_kb is None else round(self.pss_kb / MB, 1),
            "uss_mb": None if self.uss_kb is None else round(self.uss_kb / MB, 1),
            "processes": self.processes,
        }


class TreeSampler(threading.Thread):
    """Every ``interval`` s: the memory of ``root``'s process tree (peak per phase), the CPU of every
    process of the tree (by name; exited ones keep their last value) and of this process's threads.

    RSS is read at every sample (~3 ms of CPU). PSS and USS need ``smaps_rollup``, which costs ~10 ms
    of kernel time per torch-sized process: they are read within ``smaps_budget`` of one core (2 %),
    i.e. every ``cost / smaps_budget`` s, and sooner (within 5× the budget) when the RSS sum has
    grown 2 % past the last PSS/USS reading and is a new peak, so that the PSS/USS peaks come
    from samples near the RSS peak. Phase changes and the stop always read them."""

    def __init__(
        self, root: int | None = None, interval: float = 0.2, series_every: float = 5.0, smaps_budget: float = 0.02
    ) -> None:
        super().__init__(name="sim-scale-sampler", daemon=True)
        self.root = os.getpid() if root is None else root
        self.interval, self.series_every = interval, series_every
        self.phase = "start"
        self.peaks: dict[str, Peak] = {}
        self.peak_by_process: dict[str, dict[str, Any]] = {}
        self.series: list[dict[str, Any]] = []
        self.samples = 0
        self.smaps_samples = 0
        self.own_cpu_s = 0.0
        self.smaps_budget = smaps_budget
        self._smaps_cost = 0.0  # CPU s of the last smaps_rollup sweep
        self._smaps_at = float("-inf")
        self._last = Memory(0, None, None)
        self._proc_cpu: dict[tuple[int, int], tuple[str, float]] = {}
        self._thread_cpu: dict[int, tuple[str, float]] = {}
        self._stop_event = threading.Event()
        self._began = time.monotonic()
        self._next_series = 0.0
        self._lock = threading.Lock()

    def set_phase(self, phase: str) -> None:
        self.sample(smaps=True)  # the previous phase ends with a sample of its own
        with self._lock:
            self.phase = phase

    def sample(self, *, smaps: bool = False) -> None:
        t0 = time.thread_time()
        table = proc_table()
        parts = tree_memory_by_pid(self.root, table, smaps=False)
        mem, counted = sum_memory(list(parts.values())), list(parts)
        now = time.monotonic()
        peak = self.peaks.get(self.phase)
        gap = now - self._smaps_at
        if (
            smaps
            or gap >= max(self.interval, self._smaps_cost / self.smaps_budget)
            or (
                peak is not None and mem.rss_kb > max(peak.rss_kb, 1.02 * self._last.rss_kb)
                and gap >= self._smaps_cost / (5 * self.smaps_budget)
            )
        ):
            t1 = time.thread_time()
            parts = tree_memory_by_pid(self.root, table, smaps=True)
            mem, counted = sum_memory(list(parts.values())), list(parts)
            self._smaps_cost, self._smaps_at = time.thread_time() - t1, now
            self.smaps_samples += 1
            self._last = mem
        threads = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        with self._lock:
            peak = self.peaks.setdefault(self.phase, Peak())
            # the breakdown by process of the sample with the highest USS (RSS where USS is not read)
            if (mem.uss_kb or 0) > (peak.uss_kb or 0) or (peak.uss_kb is None and mem.rss_kb > peak.rss_kb):
                names = {pid: "driver" if pid == self.root else table[pid].comm for pid in parts}
                self.peak_by_process[self.phase] = by_name(parts, names)
            peak.update(mem, len(counted))
            for pid in counted:
                st = table[pid]
                self._proc_cpu[(pid, st.start)] = ("driver" if pid == self.root else st.comm, st.cpu_s)
            if self.root == os.getpid():
                for entry in os.scandir(f"/proc/{self.root}/task"):
                    st = read_stat(entry.name, base=f"/proc/{self.root}/task")
                    if st is not None:
                        name = threads.get(st.pid) or self._thread_cpu.get(st.pid, (st.comm, 0.0))[0]
                        self._thread_cpu[st.pid] = (name, st.cpu_s)
            now = time.monotonic() - self._began
            if now >= self._next_series:
                last = self._last  # the latest PSS/USS read
                cpu: dict[str, float] = defaultdict(float)  # cumulative CPU s: core use between two points
                for comm, used in self._proc_cpu.values():
                    cpu["driver" if comm == "driver" else "ray::" if comm.startswith("ray::") else "other"] += used
                self.series.append({
                    "t": round(now, 1), "phase": self.phase, "rss_mb": round(mem.rss_kb / MB),
                    "pss_mb": None if last.pss_kb is None else round(last.pss_kb / MB),
                    "uss_mb": None if last.uss_kb is None else round(last.uss_kb / MB), "processes": len(counted),
                    "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "machine_cpu_s": round(machine_cpu(), 1),
                })
                self._next_series = now + self.series_every
            self.samples += 1
        self.own_cpu_s += time.thread_time() - t0

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a sampler must never take the measurement down
                print(f"sampler: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        self.sample(smaps=True)

    def mark(self) -> tuple[dict[Any, tuple[str, float]], dict[Any, tuple[str, float]]]:
        """A snapshot of the CPU counters, for ``since=`` (the figures of one phase)."""
        self.sample()
        with self._lock:
            return dict(self._proc_cpu), dict(self._thread_cpu)

    @staticmethod
    def _by_name(now: dict[Any, tuple[str, float]], before: dict[Any, tuple[str, float]], label: Any) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, (name, cpu) in now.items():
            out[label(name)] += cpu - before.get(key, (name, 0.0))[1]
        return dict(sorted(((k, round(v, 1)) for k, v in out.items()), key=lambda kv: -kv[1]))

    def cpu_by_process(self, since: Any = None) -> dict[str, float]:
        """CPU seconds of the tree's processes (after ``since``, a :meth:`mark`), by process name, biggest first."""
        with self._lock:
            now = dict(self._proc_cpu)
        return self._by_name(now, since[0] if since else {}, lambda name: name)

    def cpu_by_thread(self, since: Any = None) -> dict[str, float]:
        """CPU seconds of this process's threads (after ``since``), by Python thread name (numbers stripped)."""
        with self._lock:
            now = dict(self._thread_cpu)
        return self._by_name(now, since[1] if since else {}, _thread_label)


# --- one size, in its own process ------------------------------------------------------------------


class MessageClock:
    """Wraps ``simulations.runtime._vce_metrics`` to timestamp every ClientApp message (benchmark only)."""

    def __init__(self) -> None:
        self.run_app_at: float | None = None
        self.done: list[tuple[float, float]] = []  # (epoch when the reply was ready, ClientApp seconds)
        self._lock = threading.Lock()

    def install(self) -> None:
        from simulations import runtime

        original = runtime._vce_metrics
        clock = self

        def patched(counters: Any) -> Any:
            clock.run_app_at = time.time()
            inner = original(counters)
            cls = type(inner)

            class _Timed(cls):  # type: ignore[misc, valid-type]
                def add_clientapp_runtime(self, runtime_s: float) -> None:
                    super().add_clientapp_runtime(runtime_s)
                    with clock._lock:
                        clock.done.append((time.time(), runtime_s))

            inner.__class__ = _Timed
            return inner

        runtime._vce_metrics = patched


def scenario_overrides(n: int, *, concurrency: int, secagg: bool, unit: str) -> list[str]:
    return [
        f"sites.count={n}",
        "privacy.dp=true",
        f"privacy.unit={unit}",
        f"simulation.concurrency={concurrency}",
        f"run.secagg={'true' if secagg else 'false'}",
    ]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare N sites' data, run one round, and measure; runs inside the ``--one N`` subprocess."""
    sampler = TreeSampler(interval=args.interval)
    sampler.phase = "import"
    sampler.start()
    n = args.one
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{n} sites {time.monotonic() - began:7.1f} s] {text}", file=sys.stderr, flush=True)

    from simulations import scenario as scenarios
    from simulations import run as sim, sites

    clock = MessageClock()
    clock.install()
    workdir, runs_dir = args.workdir.resolve(), args.workdir.resolve() / "runs"
    sc = scenarios.load(SCENARIO, scenario_overrides(n, concurrency=args.concurrency, secagg=args.secagg, unit=args.unit))
    run = sim.checked_run_config(
        sim.run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=workdir / "tables" / "unused.json")
    )
    key = sc.sites.data_key()
    data_cached = (workdir / "data" / key / sites.DATA_MARKER).is_file()
    sites_dir = workdir / "sites" / key
    caches_seen = sites_dir.is_dir() and sum(1 for _ in sites_dir.iterdir()) >= n

    sampler.set_phase("prep")
    say(f"data: {'cached' if data_cached else 'generating'} ({workdir / 'data' / key})")
    t0 = time.monotonic()
    data_dirs = sites.prepare_data(sc.sites, workdir, classes=run.classes)
    t1 = time.monotonic()
    say(f"data ready in {t1 - t0:.1f} s; preprocessing caches {'(cached)' if caches_seen else '(building)'}")
    sites.warm_caches(data_dirs, sites_dir, run)
    t2 = time.monotonic()
    say(f"caches ready in {t2 - t1:.1f} s; simulating one round ({args.concurrency} actors)")

    sampler.set_phase("simulate")
    cpu0, mark = machine_cpu(), sampler.mark()
    call_at = time.time()
    t3 = time.monotonic()
    error = None
    result = None
    try:
        result = sim.simulate(sc, workdir=workdir, runs_dir=runs_dir, progress=False)
    except Exception as exc:  # noqa: BLE001 - report what happened, with whatever was measured
        error = f"{type(exc).__name__}: {exc}"
        say(f"simulate failed: {error}")
    t4 = time.monotonic()
    sampler.stop()
    cpu1 = machine_cpu()
    by_process, by_thread = sampler.cpu_by_process(mark), sampler.cpu_by_thread(mark)
    tree_cpu = sum(by_process.values())
    say(f"simulate() returned after {t4 - t3:.1f} s")

    out: dict[str, Any] = {
        "sites": n,
        "concurrency": args.concurrency,
        "secagg": args.secagg,
        "unit": args.unit,
        "data_key": key,
        "data_cached": data_cached,
        "caches_cached": caches_seen,
        "generate_s": round(t1 - t0, 2),
        "caches_s": round(t2 - t1, 2),
        "prep_s": round(t2 - t0, 2),
        "simulate_s": round(t4 - t3, 2),
        "error": error,
        "peak": {phase: peak.as_mb() for phase, peak in sampler.peaks.items()},
        "peak_by_process": sampler.peak_by_process,
        "memory_series": sampler.series,
        "sampler": {"samples": sampler.samples, "smaps_samples": sampler.smaps_samples, "interval_s": args.interval,
                    "cpu_s": round(sampler.own_cpu_s, 2)},
        "cpu_by_process_s": by_process,
        "driver_cpu_by_thread_s": by_thread,
        "prep_cpu_by_process_s": sampler._by_name(mark[0], {}, lambda name: name),
        "tree_cpu_simulate_s": round(tree_cpu, 1),
        "others_cores": round(max(0.0, (cpu1 - cpu0) - tree_cpu) / max(t4 - t3, 1e-9), 2),
        "loadavg": os.getloadavg(),
    }
    if result is None:
        return out
    report = result.report
    rounds = report.get("rounds", [])
    first = rounds[0] if rounds else {}
    started = report.get("started")
    evaluated, trained = first.get("evaluated_at"), first.get("trained_at")
    done = sorted(clock.done)
    train = first.get("train", {})
    out.update({
        "run_id": result.run_id,
        "run_dir": str(result.run_dir),
        "status": report.get("status"),
        "rounds": len(rounds),
        "trained_sites": len(train.get("sites", {})),
        "declined": len(train.get("declined", {})),
        "failed": len(train.get("failed", {})),
        "evaluated_sites": len(first.get("evaluate", {}).get("sites", {})),
        "auroc": first.get("evaluate", {}).get("pooled", {}).get("auroc"),
        "run_app_s": round(result.seconds, 2),
        "messages": result.messages,
        "clientapp_s": round(result.clientapp_seconds, 2),
    })
    if started and evaluated:
        round_s = evaluated - started
        out.update({
            "round_s": round(round_s, 2),
            "fit_s": round(trained - started, 2) if trained else None,
            "evaluate_s": round(evaluated - trained, 2) if trained else None,
            "site_rounds_per_s": round(n / round_s, 3),
            "clientapp_s_per_site_round": round(result.clientapp_seconds / n, 3),
            "actor_busy": round(result.clientapp_seconds / (round_s * args.concurrency), 3),
            "before_run_app_s": round(clock.run_app_at - call_at, 2) if clock.run_app_at else None,
            "run_app_to_started_s": round(started - clock.run_app_at, 2) if clock.run_app_at else None,
            "started_to_first_reply_s": round(done[0][0] - started, 2) if done else None,
            # after the first reply (Ray and the first actor are up): the rate the federation sustains
            "steady_site_rounds_per_s": round(n / (evaluated - done[0][0]), 3) if done and evaluated > done[0][0] else None,
            "first_clientapp_s": round(done[0][1], 2) if done else None,
            "clientapp_train_s": round(sum(s for t, s in done if trained and t <= trained), 2),
            "clientapp_evaluate_s": round(sum(s for t, s in done if trained and t > trained), 2),
            "max_clientapp_s": round(max((s for _, s in done), default=0.0), 2),
            "after_finished_s": round(call_at + (t4 - t3) - report["finished"], 2) if report.get("finished") else None,
        })
    return out


# --- the driver: one subprocess per size ------------------------------------------------------------


def parse_sites(text: str) -> list[int]:
    """``"10,100,1000"`` -> ``[10, 100, 1000]`` (order kept, duplicates dropped); ValueError otherwise."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"--sites expects comma-separated positive integers, got {text!r}")
        value = int(part)
        if value < 2:
            raise ValueError(f"--sites: a federation needs at least 2 sites, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError(f"--sites expects comma-separated positive integers, got {text!r}")
    return out


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The last ``RESULT_PREFIX`` JSON line a ``--one`` child printed (other output is ignored)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                value = json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _stop_tree(pid: int) -> None:
    from common.processes import descendants, stop_pids

    stop_pids([*descendants(pid), pid])


def run_child(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``python -m benchmarks.sim_scale --one N ...`` with a timeout; its JSON, or an error entry."""
    cmd = [
        sys.executable, "-m", "benchmarks.sim_scale", "--one", str(n), "--concurrency", str(args.concurrency),
        "--unit", args.unit, "--workdir", str(workdir), "--interval", str(args.interval),
    ]
    if args.secagg:
        cmd.append("--secagg")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _stop_tree(proc.pid)
        proc.communicate()
        return {"sites": n, "error": f"timed out after {args.timeout} s"}
    except BaseException:
        _stop_tree(proc.pid)
        raise
    result = parse_result(stdout)
    if result is None:
        return {"sites": n, "error": f"the --one {n} subprocess exited with code {proc.returncode} and no result"}
    return result


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _peak(res: dict[str, Any], key: str) -> float | None:
    return res.get("peak", {}).get("simulate", {}).get(key)


def markdown_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per size: prep, times, throughput, ClientApp seconds, peak memory (MB)."""
    head = [
        "sites", "data prep s", "simulate s", "round s", "fit s", "eval s", "site-rounds/s",
        "ClientApp s/site-round", "actors busy", "peak RSS MB", "peak PSS MB", "peak USS MB",
        "USS MB/concurrent site", "USS MB/site",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for res in results:
        n = res["sites"]
        if res.get("round_s") is None:
            lines.append(f"| {n} | " + " | ".join(["–"] * (len(head) - 2)) + f" | FAILED: {res.get('error')} |")
            continue
        cached = "cached" if res.get("data_cached") and res.get("caches_cached") else "new"
        uss = _peak(res, "uss_mb")
        conc = res.get("concurrency") or 1
        row = [
            str(n), f"{res['prep_s']:.1f} ({cached})", _fmt(res.get("simulate_s"), ".1f"), _fmt(res["round_s"], ".1f"),
            _fmt(res.get("fit_s"), ".1f"), _fmt(res.get("evaluate_s"), ".1f"), _fmt(res.get("site_rounds_per_s"), ".2f"),
            _fmt(res.get("clientapp_s_per_site_round"), ".2f"),
            _fmt(None if res.get("actor_busy") is None else 100 * res["actor_busy"], ".0f") + " %",
            _fmt(_peak(res, "rss_mb"), ",.0f"), _fmt(_peak(res, "pss_mb"), ",.0f"), _fmt(uss, ",.0f"),
            _fmt(None if uss is None else uss / conc, ",.0f"), _fmt(None if uss is None else uss / n, ",.1f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _top(d: dict[str, float], k: int = 4) -> str:
    items = [(name, v) for name, v in d.items() if v >= 0.05][:k]
    return ", ".join(f"{name} {v:.1f}" for name, v in items) or "–"


def time_table(results: list[dict[str, Any]]) -> list[str]:
    """Where the time goes, per size."""
    head = [
        "sites", "generate s", "caches s", "started→1st reply s", "site-rounds/s after it", "ClientApp train/eval s",
        "messages",
        "CPU s by process", "driver CPU s by thread", "others' cores",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i < 7 else "---" for i in range(len(head))) + "|"]
    for res in results:
        if "generate_s" not in res:
            continue
        row = [
            str(res["sites"]), f"{res['generate_s']:.1f}", f"{res['caches_s']:.1f}",
            _fmt(res.get("started_to_first_reply_s"), ".1f"), _fmt(res.get("steady_site_rounds_per_s"), ".2f"),
            f"{_fmt(res.get('clientapp_train_s'), '.0f')} / {_fmt(res.get('clientapp_evaluate_s'), '.0f')}",
            _fmt(res.get("messages"), "d"), _top(res.get("cpu_by_process_s", {})),
            _top(res.get("driver_cpu_by_thread_s", {})), _fmt(res.get("others_cores"), ".2f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def memory_scaling(results: list[dict[str, Any]]) -> str | None:
    """"peak USS at N=max is x× that at N=min while sites grew y×" (PSS/RSS if USS is missing)."""
    ok = [r for r in results if _peak(r, "rss_mb") is not None and r.get("round_s") is not None]
    if len(ok) < 2:
        return None
    lo, hi = min(ok, key=lambda r: r["sites"]), max(ok, key=lambda r: r["sites"])
    parts = []
    for key, label in (("uss_mb", "USS"), ("pss_mb", "PSS"), ("rss_mb", "RSS")):
        a, b = _peak(lo, key), _peak(hi, key)
        if a and b:
            parts.append(f"{label} {a:,.0f} → {b:,.0f} MB (×{b / a:.2f})")
    return (
        f"memory vs sites: {lo['sites']} → {hi['sites']} sites (×{hi['sites'] / lo['sites']:g}) at concurrency "
        f"{hi.get('concurrency')}: peak " + ", ".join(parts)
    )


def breakdown_line(res: dict[str, Any], phase: str = "simulate", k: int = 5) -> str | None:
    """``"100 sites: ray::ClientAppA ×2 1,200, driver 400, ..."``: USS (else RSS) MB by process at the peak."""
    groups = res.get("peak_by_process", {}).get(phase)
    if not groups:
        return None
    key = "uss_mb" if all(g.get("uss_mb") is not None for g in groups.values()) else "rss_mb"
    items = sorted(groups.items(), key=lambda kv: -(kv[1].get(key) or 0))[:k]
    text = ", ".join(
        f"{name}{' ×' + str(g['count']) if g['count'] > 1 else ''} {g[key]:,.0f}" for name, g in items
    )
    return f"{res['sites']} sites ({key.split('_')[0].upper()} MB): {text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sim_scale", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--sites", default=DEFAULT_SITES, help="Comma-separated site counts (default %(default)s).")
    parser.add_argument("--concurrency", type=int, default=2, help="Ray actors: sites training at once (default 2).")
    parser.add_argument("--secagg", action="store_true", help="SecAgg+ on (the scale scenario has it off).")
    parser.add_argument("--unit", choices=UNITS, default="patient", help="DP privacy unit (default patient).")
    parser.add_argument("--workdir", type=Path, help="Data, caches, runs; reused between runs (default: a temp folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    parser.add_argument("--json", type=Path, help="Write every figure to this JSON file.")
    parser.add_argument("--timeout", type=float, default=7200.0, help="Seconds one size may take (default 7200).")
    parser.add_argument("--interval", type=float, default=0.2, help="Memory sampling interval in s (default 0.2).")
    parser.add_argument("--one", type=int, metavar="N", help=argparse.SUPPRESS)  # internal: one size, JSON out
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        counts = parse_sites(args.sites) if args.one is None else parse_sites(str(args.one))
    except ValueError as exc:
        parser.error(str(exc))
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not args.timeout > 0 or not args.interval > 0:
        parser.error("--timeout and --interval must be positive")
    if args.one is not None and args.workdir is None:
        parser.error("--one needs --workdir")
    return args, counts


def main(argv: list[str] | None = None) -> None:
    args, counts = parse_args(argv)
    if args.one is not None:
        res = run_one(args)
        print(RESULT_PREFIX + json.dumps(res), flush=True)
        sys.exit(0 if res.get("error") is None else 1)

    began = time.monotonic()
    made_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fedrad-simscale-")) if made_tmp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    try:
        for n in counts:
            print(f"[{time.monotonic() - began:7.0f} s] {n} sites: starting (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
            res = run_child(n, args, workdir)
            results.append(res)
            print(f"[{time.monotonic() - began:7.0f} s] {n} sites: "
                  + (f"round {res['round_s']:.1f} s" if res.get("round_s") is not None else f"FAILED {res.get('error')}"),
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if made_tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}", file=sys.stderr)

    total = time.monotonic() - began
    print(
        f"fedrad fl-sim at scale: scenario `{SCENARIO}` (24 synthetic 16 px DICOMs per site, 1 round, 1 local "
        f"epoch), DP on ({args.unit}-level), SecAgg+ {'on' if args.secagg else 'off'}, {args.concurrency} Ray "
        f"actors, {cores} cores (1-min load {load_before[0]:.2f} before)"
    )
    print("round = report evaluated_at − started; site-round = one site training + evaluating once; "
          "memory = peak over the simulate() call of sums over the process tree (RSS double-counts shared pages)")
    print()
    for line in markdown_table(results):
        print(line)
    print()
    print("where the time goes (CPU s during simulate(), over the --one process tree by process name, "
          "and of the driver process by thread):")
    print()
    for line in time_table(results):
        print(line)
    sampler = [
        f"{r['sites']} sites {r['sampler']['cpu_s']:.1f} s ({100 * r['sampler']['cpu_s'] / r['simulate_s']:.1f} % of a core)"
        for r in results if r.get("sampler") and r.get("simulate_s")
    ]
    if sampler:
        print()
        print("CPU of the memory sampler itself (in the driver, over the whole --one run): " + ", ".join(sampler))
    lines = [line for line in map(breakdown_line, results) if line]
    if lines:
        print()
        print("by process at the peak:")
        for line in lines:
            print("  " + line)
    line = memory_scaling(results)
    if line:
        print()
        print(line)
    for res in results:
        if res.get("round_s") is not None and (res.get("declined") or res.get("failed") or res.get("status") != "completed"):
            print(f"note: {res['sites']} sites: status {res.get('status')}, declined {res.get('declined')}, "
                  f"failed {res.get('failed')}")
    print(f"total {total / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(
            {"command": " ".join(["python -m benchmarks.sim_scale", *(argv if argv is not None else sys.argv[1:])]),
             "cores": cores, "loadavg_before": load_before, "total_s": round(total, 1), "results": results},
            indent=2,
        ))
        print(f"results: {args.json}")
    if any(r.get("round_s") is None for r in results) or len(results) < len(counts):
        sys.exit(1)


if __name__ == "__main__":
    main()
