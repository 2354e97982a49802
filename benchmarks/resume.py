"""A run resumed after a coordinator crash next to an uninterrupted run with the same seed.

Two real federations on loopback (``simulations.federation``; ``--insecure``, ``secagg=false``, ``--no-secure-mode``)
one after the other, same synthetic sites and settings; **resumed**'s coordinator tree is SIGKILLed once round
``--kill-after`` is committed and a site has booked the next, and ``fl-server --resume`` continues it. Printed side
by side: per-round AUROC and checkpoint difference; per site the audited ledger rounds, final ε, replay of the lost
round; wall times. ``tests/e2e/test_resume_identity.py`` says why the runs must match bit for bit, and checks it.
``--json``: every figure. One ``error:`` line and exit 1 when a run cannot be measured.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import Progress, cores, fmt, markdown, say, workdir
from common.audit import audit_ledger
from common.errors import FedradError
from server.app.checkpoint import load_checkpoint
from simulations.federation import Federation
from simulations.synth import LesionModel, synthesize

LABELS = ("uninterrupted", "resumed")
_REPLAY = re.compile(r"round\s+(\d+)\s+of\s+run\s+\S+\s+was\s+already\s+trained\s+and\s+booked.{0,300}?"
                     r"the\s+same\s+update\s+is\s+sent\s+again", re.DOTALL)


def site_summary(audit: Any, log: str, run_id: str, rounds: int) -> dict[str, Any]:
    """A site's audited ledger (``common.audit.LedgerAudit``) for ``run_id``: rounds booked twice or never, final ε,
    whether it verifies; and the rounds its ``log`` says it answered with its stored update (replayed)."""
    mine = [row for row in audit.rows if str(row.run_id) == str(run_id)]
    booked = [int(row.server_round) for row in mine]
    return {"rounds": booked, "twice": sorted(r for r, n in Counter(booked).items() if n > 1),
            "missing": sorted(set(range(1, rounds + 1)) - set(booked)),
            "final_epsilon": float(mine[-1].epsilon) if mine else None, "verified": audit.verified,
            "problems": [str(p) for p in audit.problems],
            "replayed": sorted({int(m.group(1)) for m in _REPLAY.finditer(log)})}


def compare_states(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Identical (names, shapes, dtypes, bits), else the max absolute difference (None: other names or shapes)."""
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    differing = [k for k in a if same and not a[k].equal(b[k])]
    diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in differing if a[k].numel()), default=0.0)
    return {"identical": same and not differing, "max_abs_diff": diff if same else None, "differing": differing}


def _diff(cmp: Mapping[str, Any] | None) -> str:
    return ("missing" if cmp is None else "names/shapes differ" if cmp["max_abs_diff"] is None else "0 (identical)"
            if cmp["identical"] else f"{cmp['max_abs_diff']:.3g} ({len(cmp['differing'])} tensors)")


def _rounds(rounds: Sequence[int]) -> str:
    return ",".join(map(str, rounds)) or "none"


def run(label: str, root: Path, data: Path, args: argparse.Namespace, *, kill_after: int | None) -> dict[str, Any]:
    """One federation to the end, crashed and resumed after round ``kill_after`` if given; all it left behind."""
    cfg = (f"secagg=false batch-size={args.batch_size} optimizer='adam' learning-rate={args.learning_rate} "
           f"round-timeout={args.round_timeout} seed={args.seed}")
    fed = Federation(root, args.site_names, data, secure=False, threads=args.threads, server_args=[
        "--rounds", str(args.rounds), "--image-size", str(args.image_size), "--local-epochs", str(args.local_epochs),
        "--run-config", cfg], client_args=["--privacy-unit", "image", "--max-epsilon", str(args.max_epsilon),
                                           "--no-secure-mode", "-c", f"image-size={args.image_size}"])
    out: dict[str, Any] = {}
    shutil.rmtree(root, ignore_errors=True)  # fresh workdirs: fresh caches and privacy ledgers
    with fed:  # stops every process it started, whatever happens
        t0, progress = time.monotonic(), Progress(fed, label)
        fed.start()
        if kill_after is not None:
            crash = fed.crash_and_resume(kill_after, timeout=args.timeout, on_poll=progress)
            out = {"killed_at_round": crash["completed_round"], "booked_at_kill": crash["booked"],
                   "segments_s": {"first": crash["crashed_at"] - t0, "down": crash["down_s"]}}
            say(f"{label}: coordinator SIGKILLed at round {crash['completed_round']}; back in {crash['down_s']:.0f} s")
        fed.wait(timeout=args.timeout - (time.monotonic() - t0), on_poll=progress)  # a site that dies fails it
        fed.check_exit()
        out["wall_s"] = time.monotonic() - t0
        say(f"{label} run: done in {out['wall_s']:.0f} s")
    folder = fed.run_folder()
    assert folder is not None
    report, run_id = folder.read_report(), folder.path.name
    sites = {site: site_summary(audit_ledger(fed.site_dir(site)), (fed.logs / f"site-{site}.log").read_text(
        errors="replace"), run_id, args.rounds) for site in fed.sites}
    return {**out, "run_id": run_id, "status": report.get("status"), "sites": sites,
            "checkpoints": {r: str(folder.checkpoint(r)) for r in range(1, args.rounds + 1)},
            "auroc": {int(r["round"]): r.get("evaluate", {}).get("pooled", {}).get("auroc") for r in report["rounds"]},
            "final_auroc": report.get("final", {}).get("auroc"),
            "resumed_from": [int(x["from_round"]) for x in report.get("resumes", [])]}


def compare(runs: Mapping[str, dict[str, Any]], kill_after: int) -> tuple[dict[int, Any], list[str]]:
    """Each round's checkpoints compared, and everything that differs from what a correct resume gives."""
    u, r = (runs[label] for label in LABELS)
    checkpoints = {int(n): compare_states(load_checkpoint(Path(a))[0], load_checkpoint(Path(r["checkpoints"][n]))[0])
                   if Path(a).is_file() and Path(r["checkpoints"][n]).is_file() else None
                   for n, a in u["checkpoints"].items()}
    problems = [f"{x} run: status {runs[x]['status']!r}" for x in LABELS if runs[x]["status"] != "completed"]
    if r["killed_at_round"] != kill_after:
        problems.append(f"the coordinator was killed at completed round {r['killed_at_round']}, not {kill_after}")
    if not (final := checkpoints[max(checkpoints)]) or not final["identical"]:
        problems.append(f"final checkpoints differ: {_diff(final)}")
    problems += [f"site {site}, {x} run: ledger books rounds {_rounds(s['rounds'])}; verified {s['verified']} "
                 f"{s['problems'][:2]}" for x in LABELS for site, s in runs[x]["sites"].items()
                 if s["twice"] or s["missing"] or not s["verified"]]
    problems += [f"site {site} booked round {kill_after + 1} before the kill but did not replay it" for site, s in
                 r["sites"].items() if kill_after + 1 in r["booked_at_kill"][site]
                 and kill_after + 1 not in s["replayed"]]
    return checkpoints, problems


def render(result: Mapping[str, Any]) -> list[str]:
    """The printed report: markdown tables and a few lines."""
    s, runs, cmp = result["settings"], result["runs"], result["checkpoints"]
    u, r, lost = runs["uninterrupted"], runs["resumed"], s["kill_after"] + 1
    rounds = [[f"{n}{' (lost, redone after resume)' if n == lost else ''}", fmt(u["auroc"].get(n), ".4f"),
               fmt(r["auroc"].get(n), ".4f"), _diff(cmp[n])] for n in sorted(cmp)]
    rounds.append([f"**final** (round {s['rounds']})", f"**{fmt(u['final_auroc'], '.4f')}**",
                   f"**{fmt(r['final_auroc'], '.4f')}**", f"**{_diff(cmp[s['rounds']])}**"])
    sites = [[site, _rounds(u["sites"][site]["rounds"]), _rounds(x["rounds"]),
              _rounds(sorted({*u["sites"][site]["twice"], *x["twice"]})), fmt(u["sites"][site]["final_epsilon"], ".3f"),
              fmt(x["final_epsilon"], ".3f"), "yes" if lost in r["booked_at_kill"][site] else "no",
              "yes" if lost in x["replayed"] else "no"] for site, x in r["sites"].items()]
    seg, final = r["segments_s"], cmp[s["rounds"]]
    verdict = "IDENTICAL" if final and final["identical"] else f"DIFFERENT ({_diff(final)})"
    return [
        (f"fedrad resume after a coordinator crash: {len(s['site_names'])} sites × {s['images_per_site']} synthetic "
         f"48 px DICOMs ({'easy' if s['easy_lesions'] else 'default'} lesions) at {s['image_size']} px, {s['rounds']} "
         f"rounds × {s['local_epochs']} local epochs, seed {s['seed']}, image-level DP, max ε {s['max_epsilon']:g}, "
         f"--no-secure-mode, coordinator SIGKILLed after round {s['kill_after']}; {s['cores']} cores"), "",
        *markdown(["round", "AUROC uninterrupted", "AUROC resumed", "weights max abs diff"], rounds, left=1), "",
        *markdown(["site", "ledger rounds uninterrupted", "ledger rounds resumed", "booked twice",
                   "final ε uninterrupted", "final ε resumed", f"booked round {lost} before the kill",
                   f"replayed round {lost}"], sites, left=4), "",
        (f"wall s: uninterrupted {u['wall_s']:.1f}; resumed {r['wall_s']:.1f} (first coordinator {seg['first']:.1f}, "
         f"down {seg['down']:.1f} until the new one listened, resumed {r['wall_s'] - sum(seg.values()):.1f})"),
        (f"resumed run: killed at completed round {r['killed_at_round']}, resumed from round "
         f"{_rounds(r['resumed_from'])}; final checkpoints (round {s['rounds']}): {verdict}"),
        *(f"note: {p}" for p in result["problems"]),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=(__doc__ or "").split("\n\n")[0])
    for flag, default, what in (
        ("--sites", "A,B,C", "comma-separated site names"), ("--images-per-site", 300, "synthetic DICOMs per site"),
        ("--rounds", 4, "rounds of each run"), ("--kill-after", 2, "kill the coordinator after this round"),
        ("--local-epochs", 2, "local epochs per round"), ("--image-size", 32, "model input size"),
        ("--batch-size", 16, "run config batch-size"), ("--learning-rate", 0.03, "run config learning-rate"),
        ("--round-timeout", 300, "run config round-timeout"), ("--seed", 7, "run seed, the same for both runs"),
        ("--data-seed", 0, "seed of the synthetic data"), ("--max-epsilon", 10.0, "each site's max ε"),
        ("--threads", 1, "fl-client --threads"), ("--timeout", 1200, "seconds one run may take")):
        p.add_argument(flag, type=type(default), default=default, help=f"{what.capitalize()} (default {default}).")
    p.add_argument("--easy-lesions", action="store_true", help="Large, clearly hyperdense lesions (learnt quickly).")
    p.add_argument("--workdir", type=Path, help="Work folder (default: a new temporary folder).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    p.add_argument("--json", type=Path, help="Write every figure to this JSON file.")
    args = p.parse_args(argv)
    args.site_names = [s.strip() for s in args.sites.split(",") if s.strip()]
    if len(args.site_names) < 2 or len(set(args.site_names)) != len(args.site_names):
        p.error("--sites needs at least 2 distinct names")
    if not 1 <= args.kill_after < args.rounds:
        p.error("--kill-after must be at least 1 and less than --rounds (a round must be left to lose)")
    if min(args.images_per_site, args.local_epochs, args.threads, args.timeout, args.batch_size) < 1:
        p.error("--images-per-site, --local-epochs, --threads, --timeout and --batch-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args, began = parse_args(argv), time.monotonic()
    try:
        with workdir(args.workdir, prefix="fedrad-resume-", keep=args.keep) as work:
            say(f"synthesising {len(args.site_names)} sites × {args.images_per_site} DICOMs in {work / 'data'}")
            lesions = LesionModel(radius_mm=(28.0, 40.0), contrast_hu=(60.0, 80.0), subtle_fraction=0.0,
                                  extra_axial_fraction=0.0) if args.easy_lesions else None
            synthesize(work / "data", sites=args.site_names, images_per_site=args.images_per_site,
                       seed=args.data_seed, size=48, overwrite=True, lesions=lesions)
            runs = {label: run(label, work / label, work / "data", args, kill_after=kill)
                    for label, kill in zip(LABELS, (None, args.kill_after), strict=True)}
            checkpoints, problems = compare(runs, args.kill_after)
    except (KeyboardInterrupt, FedradError, OSError, ValueError, KeyError) as exc:  # FederationError, TimeoutError
        sys.exit(f"error: {' '.join(f'{type(exc).__name__}: {exc}'.split())}")
    result = {"settings": {**vars(args), "cores": cores()}, "runs": runs, "checkpoints": checkpoints,
              "problems": problems, "total_s": (total := round(time.monotonic() - began, 1))}
    print("\n".join(render(result)), f"total {total / 60:.1f} min", sep="\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
