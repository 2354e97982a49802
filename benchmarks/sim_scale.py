"""fl-sim at scale: one federated round with 10, 100, 1000 virtual sites; time and peak memory per size.

Each size runs in a fresh ``--one N`` subprocess: fl-sim's ``prepare_data`` and ``warm_caches`` for the ``scale``
scenario (N sites × 24 DICOMs of 16 px, kept under ``--workdir``), then ``simulations.run.simulate`` with DP at
``--unit`` level, ``--concurrency`` Ray actors, one round, SecAgg+ with ``--secagg``. **round s** = ``evaluated_at`` −
``started`` of round 1 in ``report.json``; **ClientApp s/site-round** = Flower's seconds around each ClientApp
message, summed, over N; **actors busy** = that sum / (round s × concurrency). Memory: peak sums over the tree
(:class:`benchmarks.harness.TreeSampler`); RSS counts a shared page per process, PSS splits it, USS leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    TreeSampler,
    breakdown,
    cores,
    fmt,
    machine_cpu,
    markdown,
    parse_counts,
    positive,
    run_quietly,
    say,
    top,
    workdir,
)

SCENARIO, ROOT = "scale", Path(__file__).resolve().parent.parent


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare ``--one`` N sites' data, run one round, and measure (inside the ``--one N`` subprocess)."""
    n, work = args.one, args.workdir.resolve()
    sampler = TreeSampler(interval=args.interval, phase="import")
    sampler.start()
    from simulations import run as sim
    from simulations import scenario, sites

    sc = scenario.load(SCENARIO, [f"sites.count={n}", "privacy.dp=true", f"privacy.unit={args.unit}",
                                  f"run.secagg={args.secagg}".lower(), f"simulation.concurrency={args.concurrency}"])
    run = sim.checked_run_config(sim.run_overrides(sc, workdir=work, runs_dir=work / "runs", table=work / "unused"))
    key, sites_dir = sc.sites.data_key(), work / "sites" / sc.sites.data_key()
    cached = (work / "data" / key / sites.DATA_MARKER).is_file() and sum(1 for _ in sites_dir.glob("*")) >= n
    sampler.set_phase("prep")
    t0 = time.monotonic()
    data_dirs = sites.prepare_data(sc.sites, work, classes=run.classes)
    t1 = time.monotonic()
    sites.warm_caches(data_dirs, sites_dir, run)
    t2 = time.monotonic()
    print(f"  {n} sites: data {t1 - t0:.1f} s, caches {t2 - t1:.1f} s; simulating one round", file=sys.stderr)
    sampler.set_phase("simulate")
    cpu0, mark, error, result = machine_cpu(), sampler.mark(), None, None
    try:
        result = sim.simulate(sc, workdir=work, runs_dir=work / "runs", progress=False)
    except Exception as exc:  # noqa: BLE001 - report what happened, with whatever was measured
        error = f"{type(exc).__name__}: {exc}"
    t3 = time.monotonic()
    sampler.stop()
    by_process, by_thread = sampler.cpu_since(mark)
    out: dict[str, Any] = {
        "sites": n, "concurrency": args.concurrency, "secagg": args.secagg, "unit": args.unit, "data_key": key,
        "cached": cached, "generate_s": round(t1 - t0, 2), "caches_s": round(t2 - t1, 2), "prep_s": round(t2 - t0, 2),
        "simulate_s": round(t3 - t2, 2), "error": error, "peak": sampler.peaks, "loadavg": os.getloadavg(),
        "peak_by_process": sampler.peak_by_process, "cpu_by_process_s": by_process, "driver_cpu_by_thread_s": by_thread,
        "others_cores": round(max(0.0, machine_cpu() - cpu0 - sum(by_process.values())) / (t3 - t2), 2),
        "sampler": {"samples": sampler.samples, "full": sampler.full_samples, "cpu_s": round(sampler.own_cpu_s, 2)},
    }
    if result is None:
        return out
    report, done = result.report, result.finished
    first = (report.get("rounds") or [{}])[0]
    started, trained, evaluated = report.get("started"), first.get("trained_at"), first.get("evaluated_at")
    out.update({"run_id": result.run_id, "run_dir": str(result.run_dir), "status": report.get("status"),
                "rounds": len(report.get("rounds", [])), "trained_sites": len(first.get("train", {}).get("sites", {})),
                **{k: len(first.get("train", {}).get(k, {})) for k in ("declined", "failed")},
                "auroc": first.get("evaluate", {}).get("pooled", {}).get("auroc"),
                "messages": result.messages, "clientapp_s": round(result.clientapp_seconds, 2)})
    if started and trained and evaluated:
        round_s, replied = evaluated - started, done[0][0] if done else evaluated
        out.update({
            "round_s": round(round_s, 2), "fit_s": round(trained - started, 2),
            "evaluate_s": round(evaluated - trained, 2), "site_rounds_per_s": round(n / round_s, 3),
            "clientapp_s_per_site_round": round(result.clientapp_seconds / n, 3),
            "actor_busy": round(result.clientapp_seconds / (round_s * args.concurrency), 3),
            "started_to_first_reply_s": round(replied - started, 2),  # Ray, the actors, the cold first message
            "steady_site_rounds_per_s": round(n / (evaluated - replied), 3) if evaluated > replied else None,
            "clientapp_train_s": round(sum(s for t, s in done if t <= trained), 2),
            "clientapp_evaluate_s": round(sum(s for t, s in done if t > trained), 2),
        })
    return out


def run_child(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``python -m benchmarks.sim_scale --one N`` with a timeout; its figures, or an error entry."""
    (result := work / f"sim-scale-{n}.json").unlink(missing_ok=True)
    code = run_quietly([sys.executable, "-m", "benchmarks.sim_scale", "--one", str(n), "--workdir", str(work),
                        "--concurrency", str(args.concurrency), "--unit", args.unit, "--interval", str(args.interval),
                        *(["--secagg"] if args.secagg else [])], timeout=args.timeout, cwd=ROOT)
    if code is None or not result.is_file():
        return {"sites": n, "error": f"timed out after {args.timeout:g} s" if code is None else f"exit code {code}"}
    return dict(json.loads(result.read_text()))


def tables(results: list[dict[str, Any]]) -> list[str]:
    """Time, throughput and peak memory per size; where the time goes; memory by process at the peak; scaling."""
    rows, times, lines = [], [], []
    for r in results:
        peak, n = r.get("peak", {}).get("simulate", {}), r["sites"]
        if r.get("round_s") is None:
            rows.append([str(n), *["–"] * 12, f"FAILED: {r.get('error')}"])
            continue
        uss = peak.get("uss_mb")
        rows.append([str(n), f"{r['prep_s']:.1f} ({'cached' if r['cached'] else 'new'})",
                     *(fmt(r[k], ".1f") for k in ("simulate_s", "round_s", "fit_s", "evaluate_s")),
                     f"{r['site_rounds_per_s']:.2f}", f"{r['clientapp_s_per_site_round']:.2f}",
                     f"{100 * r['actor_busy']:.0f} %", *(fmt(peak[k], ",.0f") for k in ("rss_mb", "pss_mb", "uss_mb")),
                     fmt(uss and uss / r["concurrency"], ",.0f"), fmt(uss and uss / n, ",.1f")])
        times.append([str(n), f"{r['generate_s']:.1f}", f"{r['caches_s']:.1f}",
                      f"{r['started_to_first_reply_s']:.1f}", fmt(r["steady_site_rounds_per_s"], ".2f"),
                      f"{r['clientapp_train_s']:.0f} / {r['clientapp_evaluate_s']:.0f}", str(r["messages"]),
                      top(r["cpu_by_process_s"]), top(r["driver_cpu_by_thread_s"]), f"{r['others_cores']:.2f}"])
        if groups := r["peak_by_process"].get("simulate"):
            lines.append(f"  {n} sites, {breakdown(groups)}")
    ok = sorted((r for r in results if r.get("round_s") is not None), key=lambda r: r["sites"])
    lo, hi = (ok[0]["peak"]["simulate"], ok[-1]["peak"]["simulate"]) if len(ok) > 1 else ({}, {})
    scaling = ", ".join(f"{k[:3].upper()} {lo[k]:,.0f} → {hi[k]:,.0f} MB (×{hi[k] / lo[k]:.2f})"
                        for k in ("uss_mb", "pss_mb", "rss_mb") if lo.get(k) and hi.get(k))
    return [*markdown(["sites", "data prep s", "simulate s", "round s", "fit s", "eval s", "site-rounds/s",
                       "ClientApp s/site-round", "actors busy", "peak RSS MB", "peak PSS MB", "peak USS MB",
                       "USS MB/concurrent site", "USS MB/site"], rows), "",
            "where the time goes (CPU s during simulate(), by process name and by driver thread):", "",
            *markdown(["sites", "generate s", "caches s", "started→1st reply s", "site-rounds/s after it",
                       "ClientApp train/eval s", "messages", "CPU s by process", "driver CPU s by thread",
                       "others' cores"], times), *(["", "by process at the peak:", *lines] if lines else []),
            *([] if not scaling else ["", f"memory vs sites: {ok[0]['sites']} → {ok[-1]['sites']} sites "
                                          f"(×{ok[-1]['sites'] / ok[0]['sites']:g}) at concurrency "
                                          f"{ok[-1]['concurrency']}: peak {scaling}"])]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_scale", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sites", type=parse_counts, default="10,100,1000", help="Site counts (default %(default)s).")
    p.add_argument("--concurrency", type=int, default=2, help="Ray actors: sites training at once (default 2).")
    p.add_argument("--secagg", action="store_true", help="SecAgg+ on (the scale scenario has it off).")
    p.add_argument("--unit", choices=("patient", "image"), default="patient", help="DP privacy unit (default patient).")
    p.add_argument("--workdir", type=Path, help="Data, caches, runs; reused between runs (default: a temp folder).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    p.add_argument("--json", type=Path, help="Write every figure to this JSON file.")
    p.add_argument("--timeout", type=positive, default=7200.0, help="Seconds one size may take (default 7200).")
    p.add_argument("--interval", type=positive, default=0.2, help="Memory sampling interval in s (default 0.2).")
    p.add_argument("--one", type=int, metavar="N", help=argparse.SUPPRESS)  # internal: one size, JSON to the workdir
    args = p.parse_args(argv)
    if args.concurrency < 1 or (args.one is not None and args.workdir is None):
        p.error("--concurrency must be at least 1" if args.concurrency < 1 else "--one needs --workdir")
    return args, args.sites if args.one is None else [args.one]


def main(argv: list[str] | None = None) -> None:
    args, counts = parse_args(argv)
    if args.one is not None:
        (args.workdir / f"sim-scale-{args.one}.json").write_text(json.dumps(res := run_one(args)))
        sys.exit(0 if res["error"] is None else 1)
    began, load, results = time.monotonic(), os.getloadavg(), []
    with workdir(args.workdir, prefix="fedrad-simscale-", keep=args.keep) as work:
        try:
            for n in counts:
                say(f"{n} sites: starting (load {os.getloadavg()[0]:.2f})")
                results.append(r := run_child(n, args, work))
                say(f"{n} sites: " + (f"round {r['round_s']:.1f} s" if "round_s" in r else f"FAILED {r['error']}"))
        except KeyboardInterrupt:
            say("interrupted")
    total = time.monotonic() - began
    print(f"fedrad fl-sim at scale: scenario `{SCENARIO}` (24 synthetic 16 px DICOMs per site, 1 round, 1 local "
          f"epoch), DP on ({args.unit}-level), SecAgg+ {'on' if args.secagg else 'off'}, {args.concurrency} Ray "
          f"actors, {cores()} cores (1-min load {load[0]:.2f} before)\nround = report evaluated_at − started; "
          "site-round = one site training + evaluating once; memory = peak sum over the process tree in simulate()\n")
    print("\n".join(tables(results)))
    for r in results:
        if r.get("round_s") is not None and (r["declined"] or r["failed"] or r["status"] != "completed"):
            print(f"note: {r['sites']} sites: status {r['status']}, declined {r['declined']}, failed {r['failed']}")
    print(f"total {total / 60:.1f} min")
    if args.json:
        command = " ".join(["python -m benchmarks.sim_scale", *(sys.argv[1:] if argv is None else argv)])
        args.json.write_text(json.dumps({"command": command, "cores": cores(), "loadavg_before": load,
                                         "total_s": round(total, 1), "results": results}, indent=2))
        print(f"results: {args.json}")
    if len(results) < len(counts) or any(r.get("round_s") is None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
