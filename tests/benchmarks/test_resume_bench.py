"""benchmarks/resume.py's reading, comparing and printing parts, on fabricated ledgers and checkpoints (no processes).

The federations themselves, and the identity the benchmark measures, are tested by
``tests/e2e/test_resume_identity.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from benchmarks.resume import compare, compare_states, parse_args, render, site_summary
from common.ledger import Entry, Ledger, Row
from common.runfolder import RunFolder
from server.app.checkpoint import save_checkpoint
from simulations.federation import Federation

# What client/app/site.py logs when it answers a lost round with its stored update, and when it trains one again.
REPLAY_LINE = (
    "WARNING : Site {site}: round {r} of run {run} was already trained and booked (ledger row 3); the coordinator "
    "lost it, so the same update is sent again: no new training, no new privacy cost"
)
RETRAIN_LINE = (
    "WARNING : Site {site}: round {r} of run {run} was already trained (ledger row 3) from other weights or without "
    "a stored update; training it again is booked again"
)


def write_ledger(privacy: Path, rounds: list[tuple[str, int]], *, site: str = "A") -> list[Row]:
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


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.full((2, 3), value), "fc.bias": torch.tensor([value, -value]),
            "steps": torch.tensor(3, dtype=torch.int64)}


def test_a_site_summary_counts_rounds_booked_twice_or_never_and_the_rounds_replayed(tmp_path: Path) -> None:
    rows = write_ledger(tmp_path / "privacy", [("17", 1), ("9", 1), ("17", 2)])
    log = "\n".join([
        "INFO : Received: train message",
        REPLAY_LINE.format(site="A", r=2, run="17"),
        RETRAIN_LINE.format(site="A", r=4, run="17"),  # trained again: not a replay
        REPLAY_LINE.format(site="A", r=5, run="17").replace(" so the same", "\n    so the same"),  # a wrapped line
        "round 6 of run 17 was already trained and booked",  # no "sent again": not a replay
    ])
    # What common.audit.audit_ledger returns (tested in tests/common): rows, verified, problems.
    audit = SimpleNamespace(rows=rows, verified=True, problems=())
    assert site_summary(audit, log, "17", 2) == {
        "rounds": [1, 2], "twice": [], "missing": [], "final_epsilon": rows[-1].epsilon, "verified": True,
        "problems": [], "replayed": [2, 5]}
    assert site_summary(audit, "", "17", 3)["missing"] == [3]
    # The site trains round 2 again (booked again): two rows for one round; a broken chain shows.
    again = [*rows, Ledger(tmp_path / "privacy").append(Entry(**{
        **{k: getattr(rows[-1], k) for k in Entry.__dataclass_fields__}, "epsilon": rows[-1].epsilon + 1.0}))]
    broken = site_summary(SimpleNamespace(rows=again, verified=False, problems=["row 4: bad signature"]), "", "17", 2)
    assert broken["twice"] == [2] and broken["rounds"] == [1, 2, 2] and broken["replayed"] == []
    assert broken["final_epsilon"] == rows[-1].epsilon + 1.0 and broken["problems"] == ["row 4: bad signature"]


def test_state_dicts_are_identical_or_their_largest_difference_shows() -> None:
    a, b = _state(0.5), _state(0.5)
    assert compare_states(a, b) == {"identical": True, "max_abs_diff": 0.0, "differing": []}
    b["fc.bias"] = torch.tensor([0.5, -0.5 + 1e-3])
    off = compare_states(a, b)
    assert not off["identical"] and off["differing"] == ["fc.bias"]
    assert off["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert compare_states(a, {**a, "conv.weight": torch.zeros(3, 2)})["max_abs_diff"] is None
    assert not compare_states(a, {**a, "extra": torch.zeros(1)})["identical"]
    assert not compare_states(a, {**a, "steps": torch.tensor(3, dtype=torch.int32)})["identical"]


def _run(tmp: Path, label: str, weights: list[float], *, twice: str | None = None, replayed: str | None = None,
         auroc: float = 0.7) -> dict[str, Any]:
    """What :func:`benchmarks.resume.run` returns for a 2-round run of sites A and B, with real checkpoint files."""
    folder = RunFolder.of(tmp / label / "server", label)
    for r, w in enumerate(weights, start=1):
        save_checkpoint(folder.checkpoint(r), _state(w), metadata={"round": str(r)})
    sites = {site: {"rounds": [1, 2, 2] if site == twice else [1, 2], "twice": [2] if site == twice else [],
                    "missing": [], "final_epsilon": 1.0, "verified": True, "problems": [],
                    "replayed": [2] if site == replayed else []} for site in ("A", "B")}
    out = {"run_id": label, "status": "completed", "sites": sites, "wall_s": 100.0, "final_auroc": auroc,
           "checkpoints": {r: str(folder.checkpoint(r)) for r in (1, 2)}, "auroc": {1: 0.6, 2: auroc},
           "resumed_from": []}
    if label == "resumed":
        out.update(killed_at_round=1, booked_at_kill={"A": [1, 2], "B": [1]}, resumed_from=[2],
                   segments_s={"first": 60.0, "down": 5.0})
    return out


def _result(runs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    checkpoints, problems = compare(runs, 1)
    settings = {**vars(parse_args(["--sites", "A,B", "--rounds", "2", "--kill-after", "1"])), "cores": 2}
    result = {"settings": settings, "runs": runs, "checkpoints": checkpoints, "problems": problems}
    json.dumps(result, default=str)  # everything goes into --json
    return result, "\n".join(render(result))


def test_two_matching_runs_print_side_by_side_without_notes(tmp_path: Path) -> None:
    result, text = _result({"uninterrupted": _run(tmp_path, "uninterrupted", [0.1, 0.2]),
                            "resumed": _run(tmp_path, "resumed", [0.1, 0.2], replayed="A")})
    assert result["problems"] == [] and "note:" not in text
    assert "| 2 (lost, redone after resume) | 0.7000 | 0.7000 | 0 (identical) |" in text
    assert "| **final** (round 2) | **0.7000** | **0.7000** | **0 (identical)** |" in text
    assert "| A | 1,2 | 1,2 | none | 1.000 | 1.000 | yes | yes |" in text
    assert "| B | 1,2 | 1,2 | none | 1.000 | 1.000 | no | no |" in text
    assert "resumed 35.0" in text and "down 5.0" in text and "final checkpoints (round 2): IDENTICAL" in text
    assert "resumed from round 2" in text


def test_a_different_model_a_double_charge_and_a_missing_replay_are_noted(tmp_path: Path) -> None:
    result, text = _result({"uninterrupted": _run(tmp_path, "uninterrupted", [0.1, 0.2]),
                            "resumed": _run(tmp_path, "resumed", [0.1, 0.25], twice="B", auroc=0.65)})
    assert "DIFFERENT (0.05 (2 tensors))" in text and "| B | 1,2 | 1,2,2 | 2 |" in text
    problems = result["problems"]
    assert len(problems) == 3 and problems[0].startswith("final checkpoints differ: 0.05")
    assert problems[1].startswith("site B, resumed run: ledger books rounds 1,2,2")
    assert problems[2] == "site A booked round 2 before the kill but did not replay it"
    assert sum(line.startswith("note: ") for line in text.splitlines()) == 3


def test_arguments_are_checked() -> None:
    args = parse_args([])
    assert args.site_names == ["A", "B", "C"] and (args.rounds, args.kill_after, args.images_per_site) == (4, 2, 300)
    for bad in (["--kill-after", "4"], ["--kill-after", "0"], ["--sites", "A"], ["--sites", "A,A"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_federation_reads_the_committed_round_and_what_each_site_booked(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["A", "B"], tmp_path / "data", secure=False)
    assert fed.completed_round() == 0 and fed.booked("A") == set()
    folder = RunFolder.of(fed.server_dir, "17")
    folder.path.mkdir(parents=True)
    assert fed.completed_round() == 0  # no state yet
    folder.state.write_text(json.dumps({"completed_round": 2}))
    write_ledger(fed.site_dir("A") / "privacy", [("9", 3), ("17", 1), ("17", 2), ("17", 3)])
    assert fed.completed_round() == 2
    assert fed.booked("A") == {1, 2, 3} and fed.booked("B") == set()  # another run's rows do not count
