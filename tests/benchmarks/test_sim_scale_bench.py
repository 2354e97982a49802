"""benchmarks/sim_scale.py's measuring and printing parts, without a simulation (about a second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.sim_scale import (
    RESULT_PREFIX,
    Memory,
    TreeSampler,
    _thread_label,
    markdown_table,
    memory_scaling,
    parse_args,
    parse_result,
    parse_sites,
    proc_table,
    process_memory,
    read_stat,
    sum_memory,
    time_table,
    tree_memory,
    tree_pids,
)

TOUCH_MB = 64
# A child that holds TOUCH_MB of private, touched memory until it is killed.
HOLDER = f"import time; b = bytearray({TOUCH_MB} << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(60)"


@pytest.fixture(scope="module")
def smaps() -> bool:
    """Whether the kernel gives ``/proc/PID/smaps_rollup`` (Linux >= 4.14): PSS/USS must be read."""
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            return b"Pss:" in f.read()
    except OSError:
        return False


@pytest.fixture
def needs_smaps(smaps: bool) -> None:
    if not smaps:
        pytest.skip("/proc/self/smaps_rollup is not readable here: no PSS/USS to check")


def _touch(mb: int) -> bytearray:
    """``mb`` MB this process knowingly holds: every page written, so every page resident."""
    block = bytearray(mb << 20)
    block[::4096] = b"x" * len(block[::4096])
    return block


def _statm_rss_kb(pid: int) -> int:
    """Resident kB from ``/proc/PID/statm`` (not the ``status`` file the benchmark reads)."""
    with open(f"/proc/{pid}/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.fixture
def holder():  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_the_stat_parser_survives_spaces_and_parentheses_in_the_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "42").mkdir()
    fields = ["S", "7"] + ["0"] * 9 + ["150", "50"] + ["0"] * 6 + ["12345"] + ["0"] * 10
    (tmp_path / "42" / "stat").write_text(f"42 (ray::a (b) c) {' '.join(fields)}\n")
    st = read_stat(42, base=str(tmp_path))
    assert st is not None
    assert (st.pid, st.ppid, st.comm, st.start) == (42, 7, "ray::a (b) c", 12345)
    assert st.cpu_s == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))
    assert read_stat(43, base=str(tmp_path)) is None


def test_this_process_memory_counts_what_it_holds(smaps: bool) -> None:
    pid = os.getpid()
    before = process_memory(pid)
    held = _touch(TOUCH_MB)
    mem = process_memory(pid)
    kernel_kb = _statm_rss_kb(pid)
    assert before is not None and mem is not None
    assert mem.rss_kb - before.rss_kb >= 0.9 * TOUCH_MB * 1024  # the block it just touched
    assert abs(mem.rss_kb - kernel_kb) <= 4 * 1024  # the kernel's own count, read another way
    # PSS and USS are there exactly where the kernel offers them, and in the docstring's order.
    assert (mem.pss_kb is not None, mem.uss_kb is not None) == (smaps, smaps)
    if mem.pss_kb is not None and mem.uss_kb is not None:
        assert 0 < mem.uss_kb <= mem.pss_kb <= mem.rss_kb
    fast = process_memory(pid, smaps=False)
    assert fast is not None and fast.pss_kb is None and fast.uss_kb is None
    assert abs(fast.rss_kb - mem.rss_kb) <= 4 * 1024
    assert process_memory(2**22 + 12345) is None  # no such pid (pid_max is at most 2**22)
    del held


def test_uss_counts_the_memory_only_this_process_holds(needs_smaps: None) -> None:
    pid = os.getpid()
    before = process_memory(pid)
    held = _touch(TOUCH_MB)
    mem = process_memory(pid)
    assert before is not None and before.uss_kb is not None and before.pss_kb is not None
    assert mem is not None and mem.uss_kb is not None and mem.pss_kb is not None
    # private, written pages: USS and PSS grow by all of it (RSS over-states, USS under-states)
    assert mem.uss_kb - before.uss_kb >= 0.9 * TOUCH_MB * 1024
    assert mem.pss_kb - before.pss_kb >= 0.9 * TOUCH_MB * 1024
    assert mem.uss_kb <= mem.pss_kb <= mem.rss_kb
    del held


def test_a_child_is_counted_in_the_tree_with_its_memory(  # type: ignore[no-untyped-def]
    holder, smaps: bool
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        table = proc_table()
        pids = tree_pids(os.getpid(), table)
        assert pids[0] == os.getpid()
        assert holder.pid in pids and sleeper.pid in pids
        assert table[sleeper.pid].comm == "sleep"

        total, counted = tree_memory(os.getpid(), table)
        own = process_memory(os.getpid())
        child = process_memory(holder.pid)
        assert own is not None and child is not None
        assert set(counted) >= {os.getpid(), holder.pid, sleeper.pid}
        assert child.rss_kb >= TOUCH_MB * 1024
        assert total.rss_kb >= own.rss_kb + child.rss_kb * 0.9
        assert (total.uss_kb is not None, child.uss_kb is not None) == (smaps, smaps)
        if total.uss_kb is not None and child.uss_kb is not None:  # smaps: checked just above
            assert child.uss_kb >= TOUCH_MB * 1024 * 0.9  # the touched bytearray is the child's own
            assert total.uss_kb >= own.uss_kb + child.uss_kb * 0.9  # type: ignore[operator]
            assert total.uss_kb <= total.pss_kb <= total.rss_kb  # type: ignore[operator]
        # the child's tree is only the child
        assert tree_pids(holder.pid, table) == [holder.pid]
        assert tree_pids(2**22 + 12345, table) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sum_memory_refuses_a_partial_pss() -> None:
    assert sum_memory([Memory(10, 5, 4), Memory(20, 10, 8)]) == Memory(30, 15, 12)
    assert sum_memory([Memory(10, 5, 4), Memory(20, None, None)]) == Memory(30, None, None)
    assert sum_memory([]) == Memory(0, 0, 0)


def test_the_sampler_keeps_peaks_per_phase_and_sees_a_child_come_and_go(smaps: bool) -> None:
    sampler = TreeSampler(interval=0.05)
    sampler.phase = "before"
    sampler.start()
    time.sleep(0.2)
    sampler.set_phase("child")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        time.sleep(0.3)
        sampler.set_phase("after")
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    sampler.stop()
    assert not sampler.is_alive()
    peaks = sampler.peaks
    assert set(peaks) >= {"before", "child", "after"}
    assert peaks["child"].processes >= 2 and peaks["before"].processes == 1
    assert peaks["child"].rss_kb >= peaks["before"].rss_kb + TOUCH_MB * 1024 * 0.9
    for peak in peaks.values():
        assert (peak.uss_kb is not None, peak.pss_kb is not None) == (smaps, smaps)
    if smaps:
        child = peaks["child"]
        assert child.uss_kb is not None and child.uss_kb >= TOUCH_MB * 1024 * 0.9
        # each figure is a maximum over samples that each hold USS <= PSS <= RSS
        for p in peaks.values():
            assert p.uss_kb <= p.pss_kb <= p.rss_kb  # type: ignore[operator]
        assert sampler.smaps_samples >= 3  # at least each phase change and the stop
    assert sampler.samples > sampler.smaps_samples or sampler.samples <= 6
    by_process = sampler.cpu_by_process()
    assert "driver" in by_process  # this process, by that name
    by_thread = sampler.cpu_by_thread()
    assert "MainThread" in by_thread and "sim-scale-sampler" in by_thread
    assert sampler.series and sampler.series[0]["phase"] == "before"
    mb = peaks["child"].as_mb()
    assert mb["rss_mb"] == pytest.approx(peaks["child"].rss_kb / 1024, abs=0.1)


def test_thread_labels_drop_numbers() -> None:
    assert _thread_label("Thread-7 (add_messages_to_queue)") == "add_messages_to_queue"
    assert _thread_label("ThreadPoolExecutor-0_3") == "ThreadPoolExecutor-0"
    assert _thread_label("MainThread") == "MainThread"
    assert _thread_label("gcs_client_io_s") == "gcs_client_io_s"


def test_parse_sites() -> None:
    assert parse_sites("10,100,1000") == [10, 100, 1000]
    assert parse_sites(" 100, 10,100,") == [100, 10]
    for bad in ("", ",", "ten", "10,x", "-5", "1", "0", "2.5"):
        with pytest.raises(ValueError):
            parse_sites(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sites", "10,abc"], "comma-separated"),
        (["--sites", "1"], "at least 2 sites"),
        (["--concurrency", "0"], "--concurrency"),
        (["--timeout", "0"], "--timeout"),
        (["--interval", "-1"], "--interval"),
        (["--one", "10"], "--one needs --workdir"),
        (["--unit", "slice"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments() -> None:
    args, counts = parse_args([])
    assert counts == [10, 100, 1000] and args.concurrency == 2 and not args.secagg and args.unit == "patient"
    args, counts = parse_args(["--one", "100", "--workdir", "/tmp/x", "--secagg"])
    assert counts == [100] and args.secagg and args.one == 100


def test_parse_result_takes_the_marked_line_among_other_output() -> None:
    out = "\n".join([
        "INFO flower says hello",
        RESULT_PREFIX + json.dumps({"sites": 3, "round_s": 1.0}),
        "trailing noise",
    ])
    assert parse_result(out) == {"sites": 3, "round_s": 1.0}
    assert parse_result("nothing here") is None
    assert parse_result(RESULT_PREFIX + "{broken") is None
    assert parse_result(RESULT_PREFIX + "[1, 2]") is None


def _result(n: int, uss: float, **extra: object) -> dict[str, object]:
    return {
        "sites": n, "concurrency": 2, "data_cached": True, "caches_cached": False, "prep_s": 12.34,
        "generate_s": 10.0, "caches_s": 2.34, "simulate_s": 60.0, "round_s": 50.0, "fit_s": 40.0, "evaluate_s": 10.0,
        "site_rounds_per_s": n / 50.0, "clientapp_s_per_site_round": 0.8, "actor_busy": 0.5,
        "peak": {"simulate": {"rss_mb": uss * 1.5, "pss_mb": uss * 1.1, "uss_mb": uss, "processes": 12}},
        "started_to_first_reply_s": 9.5, "steady_site_rounds_per_s": 2.5, "clientapp_train_s": 30.0,
        "clientapp_evaluate_s": 10.0, "messages": 2 * n, "cpu_by_process_s": {"ray::ClientAppA": 40.0, "driver": 9.0},
        "driver_cpu_by_thread_s": {"add_messages_to_queue": 5.0, "MainThread": 0.01}, "others_cores": 0.4,
        **extra,
    }


def test_tables_show_every_size_and_failures() -> None:
    results = [_result(10, 1000.0), _result(100, 1100.0), {"sites": 1000, "error": "timed out after 10 s"}]
    lines = markdown_table(results)
    assert lines[0].startswith("| sites |") and lines[1].startswith("|---:")
    assert len(lines) == 5
    assert all(line.count("|") == lines[0].count("|") for line in lines[:4])
    row10 = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row10[0] == "10" and row10[1] == "12.3 (new)"  # caches were built: not all cached
    assert row10[3] == "50.0" and row10[6] == "0.20" and row10[8] == "50 %"
    assert row10[9:] == ["1,500", "1,100", "1,000", "500", "100.0"]  # RSS, PSS, USS, per concurrent site, per site
    assert "FAILED: timed out after 10 s" in lines[4]

    times = time_table(results)
    assert len(times) == 4  # the failed size has no figures
    assert "ray::ClientAppA 40.0, driver 9.0" in times[2] and "add_messages_to_queue 5.0" in times[2]
    assert "MainThread" not in times[2]  # below 0.05 s: left out

    line = memory_scaling(results)
    assert line is not None and "10 → 100 sites (×10)" in line and "USS 1,000 → 1,100 MB (×1.10)" in line
    assert memory_scaling(results[:1]) is None


def test_memory_by_process_name() -> None:
    from benchmarks.sim_scale import breakdown_line, by_name

    parts = {1: Memory(1024, 512, 256), 2: Memory(2048, 1024, 512), 3: Memory(4096, None, None)}
    groups = by_name(parts, {1: "ray::ClientAppA", 2: "ray::ClientAppA", 3: "driver"})
    assert list(groups) == ["driver", "ray::ClientAppA"]  # biggest RSS first
    assert groups["ray::ClientAppA"] == {"count": 2, "rss_mb": 3.0, "pss_mb": 1.5, "uss_mb": 0.8}
    assert groups["driver"]["uss_mb"] is None
    line = breakdown_line({"sites": 10, "peak_by_process": {"simulate": groups}})
    assert line == "10 sites (RSS MB): driver 4, ray::ClientAppA ×2 3"  # USS missing somewhere: RSS
    assert breakdown_line({"sites": 10}) is None
