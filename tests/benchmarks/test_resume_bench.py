"""benchmarks/resume.py's reading, comparing and printing parts, on small fabricated run folders (no processes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.resume import (
    EXPECTATION,
    Federation,
    auroc_by_round,
    booked_now,
    collect,
    compare_checkpoints,
    compare_states,
    final_auroc,
    log_replays,
    log_retrains,
    parse_args,
    read_ledger,
    render,
    start_time,
    summarize_rows,
)
from common.ledger import Entry, Ledger
from server.app.checkpoint import checkpoint_path, save_checkpoint

# What client/app/site.py logs when it answers a lost round with its stored update, and when it trains one again.
REPLAY_LINE = (
    "WARNING : Site {site}: round {r} of run {run} was already trained and booked (ledger row 3); the coordinator "
    "lost it, so the same update is sent again: no new training, no new privacy cost"
)
RETRAIN_LINE = (
    "WARNING : Site {site}: round {r} of run {run} was already trained (ledger row 3) from other weights or without "
    "a stored update; training it again is booked again"
)


def write_ledger(privacy: Path, rounds: list[tuple[str, int]], *, site: str = "A") -> list:  # type: ignore[type-arg]
    """Signed, chained rows (run, round) with a made-up cumulative ε (no accountant: fast)."""
    ledger = Ledger(privacy)
    return [
        ledger.append(Entry(
            site=site, run_id=run, server_round=r, fingerprint="f0" * 32, privacy_unit="image",
            noise_multiplier=1.0, sample_rate=0.1, steps=5, max_grad_norm=1.0, delta=1e-5, max_epsilon=10.0,
            epsilon_rdp=0.5 * (i + 1), epsilon_prv=None, epsilon=0.5 * (i + 1), opacus="1.6.0",
        ))
        for i, (run, r) in enumerate(rounds)
    ]


def _report(run_id: str, aurocs: list[float | None], *, resumes: list[int] = ()) -> dict:  # type: ignore[assignment]
    rounds = []
    for i, auroc in enumerate(aurocs, start=1):
        entry: dict = {"round": i, "train": {"sites": {}}}
        if auroc is not None:
            entry["evaluate"] = {"pooled": {"auroc": auroc, "sensitivity": 0.5}, "sites": {}}
            entry["evaluated_at"] = 1.7e9 + i
        rounds.append(entry)
    last = max((i for i, a in enumerate(aurocs, start=1) if a is not None), default=None)
    return {
        "run_id": run_id, "status": "completed", "rounds": rounds,
        "final": {} if last is None else {"round": last, "auroc": aurocs[last - 1]},
        "resumes": [{"from_round": r} for r in resumes],
    }


def _state(seed: float) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.full((2, 3), seed), "fc.bias": torch.tensor([seed, -seed]),
            "steps": torch.tensor(3, dtype=torch.int64)}


def test_auroc_per_round_and_final_come_from_the_report() -> None:
    report = _report("17", [0.55, 0.625, None])
    assert auroc_by_round(report) == {1: 0.55, 2: 0.625, 3: None}
    assert final_auroc(report) == 0.625
    assert final_auroc({"final": {}}) is None and auroc_by_round({}) == {}


def test_ledger_rows_of_a_run_count_rounds_booked_twice_and_never() -> None:
    row = lambda run, r, eps: SimpleNamespace(run_id=run, server_round=r, epsilon=eps)
    clean = summarize_rows([row("7", 1, 1.0), row("7", 2, 1.5), row("9", 1, 0.2), row("7", 3, 2.0)], "7", 3)
    assert clean == {"rows": 3, "rounds": [1, 2, 3], "twice": [], "missing": [], "other_runs": 1,
                     "one_per_round": True, "final_epsilon": 2.0}
    paid_twice = summarize_rows([row("7", 1, 1.0), row("7", 2, 1.5), row("7", 2, 2.0)], "7", 3)
    assert paid_twice["twice"] == [2] and paid_twice["missing"] == [3] and not paid_twice["one_per_round"]
    assert paid_twice["final_epsilon"] == 2.0
    assert summarize_rows([], "7", 2) == {"rows": 0, "rounds": [], "twice": [], "missing": [1, 2], "other_runs": 0,
                                          "one_per_round": False, "final_epsilon": None}


def test_a_real_ledger_is_read_verified_and_a_second_row_for_a_round_shows(tmp_path: Path) -> None:
    privacy = tmp_path / "site-A" / "privacy"
    assert booked_now(privacy) == set()
    assert read_ledger(privacy, "17", 2)["verified"] is None
    rows = write_ledger(privacy, [("17", 1), ("17", 2)])
    out = read_ledger(privacy, "17", 2)
    assert out["verified"] is True and out["one_per_round"] and out["rounds"] == [1, 2]
    assert out["final_epsilon"] == pytest.approx(rows[-1].epsilon)
    assert booked_now(privacy, "17") == {1, 2} and booked_now(privacy, "other") == set()
    # The site trains round 2 again (booked again): two rows for one round.
    Ledger(privacy).append(Entry(**{**{k: getattr(rows[-1], k) for k in Entry.__dataclass_fields__},
                                    "epsilon": rows[-1].epsilon + 1.0}))
    again = read_ledger(privacy, "17", 2)
    assert again["twice"] == [2] and again["rows"] == 3 and not again["one_per_round"] and again["verified"]
    # An edited row breaks the chain and the signature.
    import sqlite3

    with sqlite3.connect(privacy / "ledger.sqlite") as conn:
        conn.execute("UPDATE rounds SET epsilon = 0.01 WHERE seq = (SELECT MAX(seq) FROM rounds)")
    edited = read_ledger(privacy, "17", 2)
    assert edited["verified"] is False and edited["problems"] and edited["final_epsilon"] == 0.01


def test_checkpoints_identical_or_their_largest_difference(tmp_path: Path) -> None:
    a, b = _state(0.5), _state(0.5)
    same = compare_states(a, b)
    assert same["identical"] and same["max_abs_diff"] == 0.0 and same["tensors"] == 3 and same["values"] == 9
    b["fc.bias"] = torch.tensor([0.5, -0.5 + 1e-3])
    off = compare_states(a, b)
    assert not off["identical"] and off["differing"] == ["fc.bias"]
    assert off["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    b["extra"] = torch.zeros(1)
    b["conv.weight"] = torch.zeros(3, 2)
    broken = compare_states(a, b)
    assert not broken["identical"] and broken["max_abs_diff"] is None
    assert broken["mismatched"] == ["extra", "conv.weight"]
    # Through safetensors files, as fl-server writes them.
    for name, state in (("x", _state(0.25)), ("y", _state(0.25)), ("z", _state(0.75))):
        save_checkpoint(tmp_path / f"{name}.safetensors", state, metadata={"round": "1"})
    assert compare_checkpoints(tmp_path / "x.safetensors", tmp_path / "y.safetensors")["identical"]
    far = compare_checkpoints(tmp_path / "x.safetensors", tmp_path / "z.safetensors")
    assert far["max_abs_diff"] == pytest.approx(0.5) and far["differing"] == ["conv.weight", "fc.bias"]


def test_replayed_and_retrained_rounds_are_found_in_a_site_log() -> None:
    text = "\n".join([
        "INFO : Received: train message",
        REPLAY_LINE.format(site="A", r=3, run="123456"),
        RETRAIN_LINE.format(site="A", r=4, run="123456"),
        # A log handler that wraps long lines still counts.
        REPLAY_LINE.format(site="A", r=5, run="123456").replace(" so the same", "\n    so the same"),
    ])
    assert log_replays(text) == [3, 5]
    assert log_retrains(text) == [4]
    assert log_replays("round 3 of run 1 was already trained and booked") == []  # no "sent again": not a replay


def _federation(root: Path, label: str, sites: list[str], args: argparse.Namespace) -> Federation:
    return Federation(label=label, root=root / label, data=root / "data", sites=sites, args=args, say=print)


def _fabricate(fed: Federation, run_id: str, aurocs: list[float], weights: list[float], *, resumes: list[int] = (),  # type: ignore[assignment]
               twice: str | None = None, replay: str | None = None) -> None:
    run_dir = fed.server_dir / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(_report(run_id, aurocs, resumes=resumes)))
    (run_dir / "state.json").write_text(json.dumps({"completed_round": len(aurocs),
                                                    "segments": [{}] * (1 + len(resumes))}))
    for r, w in enumerate(weights, start=1):
        save_checkpoint(checkpoint_path(run_dir, r), _state(w), metadata={"round": str(r)})
    for site in fed.sites:
        rounds = [(run_id, r) for r in range(1, len(aurocs) + 1)]
        if site == twice:
            rounds.append((run_id, len(aurocs)))
        write_ledger(fed.privacy(site), rounds, site=site)
        fed.logs.mkdir(parents=True, exist_ok=True)
        lines = ["INFO : Site started"]
        if site == replay:
            lines.append(REPLAY_LINE.format(site=site, r=2, run=run_id))
        (fed.logs / f"site-{site}.log").write_text("\n".join(lines) + "\n")


SETTINGS = {"sites": ["A", "B"], "images_per_site": 20, "rounds": 2, "kill_after": 1, "local_epochs": 1,
            "image_size": 32, "seed": 7, "max_epsilon": 10.0, "cores": 2}
TIMINGS = {
    "uninterrupted": {"wall_s": 100.0, "load": [1.0, 1.5]},
    "resumed": {"wall_s": 130.0, "load": [1.2, 1.4], "killed_at_round": 1, "booked_at_kill": {"A": [1, 2], "B": [1]},
                "segments_s": {"first": 60.0, "down": 5.0, "second": 65.0, "serverapp_back": 12.5}},
}


def test_two_matching_runs_collect_into_one_result_and_print_side_by_side(tmp_path: Path) -> None:
    args = argparse.Namespace(timeout=10)
    feds = {label: _federation(tmp_path, label, ["A", "B"], args) for label in ("uninterrupted", "resumed")}
    _fabricate(feds["uninterrupted"], "111", [0.6, 0.7], [0.1, 0.2])
    _fabricate(feds["resumed"], "222", [0.6, 0.7], [0.1, 0.2], resumes=[2], replay="A")
    result = collect(feds, TIMINGS, SETTINGS)
    assert result["problems"] == []
    assert result["final_checkpoint"]["identical"] and result["replayed_sites"] == ["A"]
    assert result["runs"]["resumed"]["resumed_from"] == [2] and result["runs"]["resumed"]["segments"] == 2
    assert result["sites"]["A"]["resumed"]["one_per_round"] and result["sites"]["B"]["replayed"] == []
    json.dumps(result)  # everything goes into --json
    text = "\n".join(render(result))
    assert EXPECTATION in text
    assert "| 2 (lost, redone after resume) | 0.7000 | 0.7000 | 0 (identical) |" in text
    assert "| **final** (round 2) | **0.7000** | **0.7000** | **0 (identical)** |" in text
    assert "| A | 2 | 2 | none |" in text and "| yes | yes | none |" in text
    assert "| B | 2 | 2 | none |" in text and "| no | no | none |" in text
    assert "final checkpoints (round 2): IDENTICAL; 3 tensors, 9 values" in text
    assert "down 5.0 s" in text and "resumed ServerApp running after 12.5 s" in text and "sites that replayed round 2: A" in text
    assert "note:" not in text


def test_a_different_model_a_double_charge_and_a_missing_replay_are_noted(tmp_path: Path) -> None:
    args = argparse.Namespace(timeout=10)
    feds = {label: _federation(tmp_path, label, ["A", "B"], args) for label in ("uninterrupted", "resumed")}
    _fabricate(feds["uninterrupted"], "111", [0.6, 0.7], [0.1, 0.2])
    _fabricate(feds["resumed"], "222", [0.6, 0.65], [0.1, 0.25], resumes=[2], twice="B")
    result = collect(feds, TIMINGS, SETTINGS)
    text = "\n".join(render(result))
    assert "DIFFERENT (max abs diff 0.05" in text
    assert "| B | 2 | 3 (rounds 1,2,2) | 2 |" in text
    problems = result["problems"]
    assert any(p.startswith("final checkpoints differ") for p in problems)
    assert "site B, resumed run: ledger books rounds 1,2,2 (twice: 2, missing: none)" in problems
    assert "site A booked round 2 before the kill but did not replay it" in problems
    assert "no site replayed round 2" in problems
    assert sum(line.startswith("note: ") for line in text.splitlines()) == len(problems)


def test_arguments_are_checked() -> None:
    args = parse_args([])
    assert args.site_names == ["A", "B", "C"] and (args.rounds, args.kill_after, args.images_per_site) == (4, 2, 300)
    for bad in (["--kill-after", "4"], ["--kill-after", "0"], ["--sites", "A"], ["--sites", "A,A"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_a_process_start_time_tells_a_reused_pid_apart() -> None:
    import os

    mine = start_time(os.getpid())
    assert mine is not None and mine == start_time(os.getpid()) and mine > 0
    assert start_time(2**22 + 12345) is None  # above pid_max: never a process
