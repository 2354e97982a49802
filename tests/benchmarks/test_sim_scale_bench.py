"""benchmarks/sim_scale.py's measuring and printing parts, without a simulation (about a second).

Memory figures are checked against memory the test itself holds: a block it writes, a child that holds one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks import sim_scale
from benchmarks.harness import (
    TreeSampler,
    breakdown,
    by_name,
    memory_mb,
    parse_counts,
    run_quietly,
    thread_label,
)
from benchmarks.sim_scale import parse_args, tables
from common.processes import Usage, alive, descendants, tree_usage

TOUCH_MB = 64
MB = 2**20
# A child that holds TOUCH_MB of private, touched memory until it is killed.
HOLDER = (f"import time; b = bytearray({TOUCH_MB} << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); "
          "time.sleep(60)")
# A parent that starts a child, writes both PIDs to a file, and waits (a --one run and its Ray processes, in small).
SPAWNER = "sleep 60 & echo $$ $! > {}; wait"
# PSS and USS where psutil gives them (Linux: smaps_rollup, or smaps on kernels before 4.14).
SMAPS = "pss" in psutil.Process().memory_full_info()._fields


def _touch(mb: int) -> bytearray:
    """``mb`` MB this process knowingly holds: every page written, so every page resident."""
    block = bytearray(mb << 20)
    block[::4096] = b"x" * len(block[::4096])
    return block


def _own(full: bool = True) -> Usage:
    usage = tree_usage(os.getpid(), full=full)
    assert usage and usage[0].pid == os.getpid()  # the root comes first
    return usage[0]


@pytest.fixture
def holder():  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_this_process_memory_counts_what_it_holds() -> None:
    before = _own()
    held = _touch(TOUCH_MB)
    after, fast = _own(), _own(full=False)
    assert after.rss - before.rss >= 0.9 * TOUCH_MB * MB  # the block it just touched
    assert abs(fast.rss - after.rss) <= 4 * MB and fast.pss is None and fast.uss is None  # PSS/USS only when asked
    assert (after.pss is not None, after.uss is not None) == (SMAPS, SMAPS)
    if after.pss is not None and after.uss is not None and before.pss is not None and before.uss is not None:
        # private, written pages: USS and PSS grow by all of it (RSS over-states, USS under-states)
        assert after.uss - before.uss >= 0.9 * TOUCH_MB * MB and after.pss - before.pss >= 0.9 * TOUCH_MB * MB
        assert 0 < after.uss <= after.pss <= after.rss
    assert after.cpu_s > 0 and after.started == pytest.approx(psutil.Process().create_time())
    assert tree_usage(2**22 + 12345) == []  # no such pid (pid_max is at most 2**22)
    del held


def test_a_child_is_counted_in_the_tree_with_its_memory(holder) -> None:  # type: ignore[no-untyped-def]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        usage = {u.pid: u for u in tree_usage(os.getpid(), full=True)}
        own, child = usage[os.getpid()], usage[holder.pid]
        assert usage[sleeper.pid].name == "sleep"
        assert child.rss >= TOUCH_MB * MB
        total = memory_mb(list(usage.values()))
        assert total["rss_mb"] is not None and total["rss_mb"] >= (own.rss + 0.9 * child.rss) / MB
        if SMAPS:
            assert child.uss is not None and child.uss >= 0.9 * TOUCH_MB * MB  # the touched bytearray is the child's
            assert total["uss_mb"] is not None and total["pss_mb"] is not None
            assert total["uss_mb"] >= (own.uss or 0) / MB + 0.9 * TOUCH_MB and total["uss_mb"] <= total["pss_mb"]
        assert [u.pid for u in tree_usage(holder.pid)] == [holder.pid]  # the child's tree is only the child
    finally:
        sleeper.kill()
        sleeper.wait()


def _usage(pid: int, name: str, rss: int, pss: int | None, uss: int | None) -> Usage:
    return Usage(pid=pid, name=name, started=0.0, rss=rss * MB, pss=None if pss is None else pss * MB,
                 uss=None if uss is None else uss * MB, cpu_s=0.0)


def test_memory_sums_refuse_a_partial_pss_and_group_by_name() -> None:
    a, b, c = _usage(1, "ray::ClientAppActor", 1, 0.5, 0.25), _usage(2, "ray::ClientAppActor", 2, 1, 0.5), \
        _usage(3, "python", 4, None, None)
    assert memory_mb([a, b]) == {"rss_mb": 3.0, "pss_mb": 1.5, "uss_mb": 0.8}
    assert memory_mb([a, c]) == {"rss_mb": 5.0, "pss_mb": None, "uss_mb": None}  # a partial sum would mislead
    groups = by_name([a, b, c], {3: "driver"})
    assert list(groups) == ["driver", "ray::ClientAppActor"]  # biggest RSS first; the PID's name overridden
    assert groups["ray::ClientAppActor"] == {"count": 2, "rss_mb": 3.0, "pss_mb": 1.5, "uss_mb": 0.8}
    assert breakdown(groups) == "RSS MB: driver 4, ray::ClientAppActor ×2 3"  # USS missing somewhere: RSS
    assert breakdown(by_name([a, b])) == "USS MB: ray::ClientAppActor ×2 1"


def test_the_sampler_keeps_peaks_per_phase_and_sees_a_child_come_and_go() -> None:
    sampler = TreeSampler(interval=0.03, phase="before")
    sampler.start()
    time.sleep(0.05)
    mark = sampler.mark()
    sampler.set_phase("child")
    # titled the way Ray titles a worker running a method (PR_SET_NAME = 15)
    retitle = "import ctypes; ctypes.CDLL(None).prctl(15, b'ray::Hold.run', 0, 0, 0); "
    proc = subprocess.Popen([sys.executable, "-c", retitle + HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        time.sleep(0.1)
        sampler.set_phase("after")
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.05)
    sampler.stop()
    assert not sampler.is_alive()
    peaks = sampler.peaks
    assert list(peaks) == ["before", "child", "after"]
    # this process may already have children (a multiprocessing resource tracker from earlier tests)
    assert peaks["child"]["processes"] >= peaks["before"]["processes"] + 1 >= 2
    assert peaks["child"]["rss_mb"] >= peaks["before"]["rss_mb"] + 0.9 * TOUCH_MB
    for peak in peaks.values():
        assert (peak["uss_mb"] is not None, peak["pss_mb"] is not None) == (SMAPS, SMAPS)
        if SMAPS:  # each figure is a maximum over samples that each hold USS <= PSS <= RSS
            assert peak["uss_mb"] <= peak["pss_mb"] <= peak["rss_mb"]
    if SMAPS:
        assert peaks["child"]["uss_mb"] >= peaks["before"]["uss_mb"] + 0.9 * TOUCH_MB
        at_peak = sampler.peak_by_process["child"]  # by name, the method dropped from the worker's
        assert {"driver", "ray::Hold"} <= set(at_peak) and at_peak["ray::Hold"]["uss_mb"] >= 0.9 * TOUCH_MB
    assert sampler.full_samples >= 3 and sampler.samples > sampler.full_samples  # phase changes, stop; RSS-only ones
    by_process, by_thread = sampler.cpu_since()
    assert {"driver", "ray::Hold"} <= set(by_process) and {"MainThread", "tree-sampler"} <= set(by_thread)
    later, _ = sampler.cpu_since(mark)
    assert all(later[k] <= by_process[k] for k in by_process if k in later)  # since the mark: no more than in all


def test_thread_labels_drop_numbers() -> None:
    assert thread_label("Thread-7 (add_messages_to_queue)") == "add_messages_to_queue"
    assert thread_label("ThreadPoolExecutor-0_3") == "ThreadPoolExecutor-0"
    assert thread_label("MainThread") == "MainThread"
    assert thread_label("worker_1") == "worker_1"


def test_run_quietly_returns_the_exit_code_or_stops_the_whole_tree_on_timeout(tmp_path: Path) -> None:
    assert run_quietly(["sh", "-c", "exit 3"], timeout=30) == 3
    pids = tmp_path / "pids"
    began = time.monotonic()
    assert run_quietly(["sh", "-c", SPAWNER.format(pids)], timeout=0.2) is None
    assert time.monotonic() - began < 10
    spawner, child = map(int, pids.read_text().split())
    assert not alive(spawner) and not alive(child)  # the spawner's `sleep` child too
    assert child not in descendants(os.getpid())


def test_parse_counts() -> None:
    assert parse_counts("10,100,1000") == [10, 100, 1000]
    assert parse_counts(" 100, 10,100,") == [100, 10]
    for bad in ("", ",", "ten", "10,x", "-5", "1", "0", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated|at least 2"):
            parse_counts(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sites", "10,abc"], "comma-separated"),
        (["--sites", "1"], "at least 2"),
        (["--concurrency", "0"], "--concurrency"),
        (["--timeout", "0"], "--timeout"),
        (["--interval", "-1"], "--interval"),
        (["--one", "10"], "--one needs --workdir"),
        (["--unit", "slice"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(  # type: ignore[no-untyped-def]
    argv: list[str], message: str, capsys
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments() -> None:
    args, counts = parse_args([])
    assert counts == [10, 100, 1000] and args.concurrency == 2 and not args.secagg and args.unit == "patient"
    assert (args.timeout, args.interval) == (7200.0, 0.2)
    args, counts = parse_args(["--one", "100", "--workdir", "/tmp/x", "--secagg", "--interval", "0.5"])
    assert counts == [100] and args.secagg and args.one == 100 and args.interval == 0.5


def _result(n: int, uss: float, **extra: object) -> dict[str, object]:
    groups = {"ray::ClientAppActor": {"count": 2, "rss_mb": 900.0, "pss_mb": 700.0, "uss_mb": 600.0},
              "driver": {"count": 1, "rss_mb": 400.0, "pss_mb": 300.0, "uss_mb": 250.0}}
    return {
        "sites": n, "concurrency": 2, "cached": False, "prep_s": 12.34, "generate_s": 10.0, "caches_s": 2.34,
        "simulate_s": 60.0, "round_s": 50.0, "fit_s": 40.0, "evaluate_s": 10.0, "site_rounds_per_s": n / 50.0,
        "clientapp_s_per_site_round": 0.8, "actor_busy": 0.5, "status": "completed", "declined": 0, "failed": 0,
        "peak": {"simulate": {"rss_mb": uss * 1.5, "pss_mb": uss * 1.1, "uss_mb": uss, "processes": 12}},
        "peak_by_process": {"simulate": groups}, "started_to_first_reply_s": 9.5, "steady_site_rounds_per_s": 2.5,
        "clientapp_train_s": 30.0, "clientapp_evaluate_s": 10.0, "messages": 2 * n,
        "cpu_by_process_s": {"ray::ClientAppActor": 40.0, "driver": 9.0},
        "driver_cpu_by_thread_s": {"add_messages_to_queue": 5.0, "MainThread": 0.01}, "others_cores": 0.4,
        "sampler": {"cpu_s": 0.5}, **extra,
    }


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_tables_show_every_size_failures_and_memory_scaling() -> None:
    results = [_result(10, 1000.0), _result(100, 1100.0), {"sites": 1000, "error": "timed out after 10 s"}]
    lines = tables(results)
    main, rest = lines[:5], lines[5:]
    assert main[0].startswith("| sites | data prep s |") and main[1].startswith("|---:")
    assert all(line.count("|") == main[0].count("|") for line in main)
    row10 = _cells(main[2])
    assert row10[0] == "10" and row10[1] == "12.3 (new)"
    assert row10[3] == "50.0" and row10[6] == "0.20" and row10[8] == "50 %"
    assert row10[9:] == ["1,500", "1,100", "1,000", "500", "100.0"]  # RSS, PSS, USS, per concurrent site, per site
    assert _cells(main[4])[0] == "1000" and "FAILED: timed out after 10 s" in main[4]
    times = [line for line in rest if line.startswith(("| 10 |", "| 100 |"))]
    assert len(times) == 2 and not any(line.startswith("| 1000 |") for line in rest)  # the failure has no figures
    assert "ray::ClientAppActor 40.0, driver 9.0" in times[0] and "add_messages_to_queue 5.0" in times[0]
    assert "MainThread" not in times[0]  # below 0.05 s: left out
    assert "  10 sites, USS MB: ray::ClientAppActor ×2 600, driver 250" in rest
    assert lines[-1] == ("memory vs sites: 10 → 100 sites (×10) at concurrency 2: peak USS 1,000 → 1,100 MB (×1.10), "
                         "PSS 1,100 → 1,210 MB (×1.10), RSS 1,500 → 1,650 MB (×1.10)")
    assert not any(line.startswith("memory vs sites") for line in tables(results[:1]))  # one size: no scaling


def test_main_runs_each_size_prints_the_tables_and_writes_the_json(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, capsys
) -> None:
    calls: list[int] = []

    def fake(n: int, args: object, work: Path) -> dict[str, object]:
        calls.append(n)
        assert work == tmp_path / "work"
        return _result(n, 1000.0 + n, declined=1) if n == 20 else {"sites": n, "error": "exit code 1"}

    monkeypatch.setattr(sim_scale, "run_child", fake)
    argv = ["--sites", "20,2", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit) as exc:
        sim_scale.main(argv)
    assert exc.value.code == 1 and calls == [20, 2]  # a failed size: exit 1, after every size ran
    out = capsys.readouterr().out
    assert "| 20 | 12.3 (new) |" in out and "FAILED: exit code 1" in out
    assert "note: 20 sites: status completed, declined 1, failed 0" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["sites"] for r in saved["results"]] == [20, 2] and saved["command"].endswith(" ".join(argv))


def test_a_size_that_leaves_no_result_is_an_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    args, _ = parse_args(["--sites", "3", "--timeout", "5"])
    monkeypatch.setattr(sim_scale, "run_quietly", lambda cmd, **kw: 7)
    assert sim_scale.run_child(3, args, tmp_path) == {"sites": 3, "error": "exit code 7"}
    monkeypatch.setattr(sim_scale, "run_quietly", lambda cmd, **kw: None)
    assert sim_scale.run_child(3, args, tmp_path) == {"sites": 3, "error": "timed out after 5 s"}

    def writes(cmd: list[str], **kw: object) -> int:
        assert cmd[1:5] == ["-m", "benchmarks.sim_scale", "--one", "3"] and "--secagg" not in cmd
        (tmp_path / "sim-scale-3.json").write_text(json.dumps({"sites": 3, "round_s": 1.5}))
        return 0

    (tmp_path / "sim-scale-3.json").write_text("{}")  # a stale result from an earlier run is not taken
    monkeypatch.setattr(sim_scale, "run_quietly", lambda cmd, **kw: 1)
    assert sim_scale.run_child(3, args, tmp_path)["error"] == "exit code 1"
    monkeypatch.setattr(sim_scale, "run_quietly", writes)
    assert sim_scale.run_child(3, args, tmp_path) == {"sites": 3, "round_s": 1.5}
