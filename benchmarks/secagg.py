"""SecAgg+ next to plain FedAvg over the same secure federation: round time, upload, masking CPU.

Per site count, two secure federations (``simulations.federation``) on the same synthetic data, plain
(``-c secagg=false``) and SecAgg+, in alternating order; rounds 2..R measured from ``report.json``, the proxy's
access log, each site's process-tree CPU (psutil) and ``logs/secagg.jsonl``. docs/benchmarks.md has the columns.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import benchmarks.harness as bench
from benchmarks.harness import MACHINE, CpuSampler, Progress, cores, fmt, header_key, parse_counts, say, workdir

MODES, LABEL = ("plain", "secagg"), {"plain": "plain", "secagg": "SecAgg+"}
ACCESS_LOG = Path("proxy") / "logs" / "access.log"  # under the coordinator's workdir (server/proxy.py)
# The tail of server/proxy.py's "fedrad" log format: ... $request_length $msec "$http_flwr_public_key"
_ACCESS = re.compile(r'"(?P<method>\S+) (?P<uri>\S+)[^"]*" (?P<status>\d{3}) (?P<sent>\d+) "[^"]*" "[^"]*" '
                     r'(?P<length>\d+) (?P<msec>\d+\.\d+) "(?P<key>[^"]*)"$')


def run_federation(mode: str, names: list[str], root: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One federation from enrollment to exit; its figures."""
    from simulations.federation import Federation

    fed = Federation(root, names, data, threads=args.threads, client_args=["-c", f"image-size={args.image_size}"],
                     server_args=["--rounds", str(args.rounds), "--image-size", str(args.image_size), "--local-epochs",
                                  str(args.local_epochs), *(["-c", "secagg=false"] if mode == "plain" else [])])
    started = time.monotonic()
    with fed:
        server = fed.start().server
        assert server is not None
        cpu = CpuSampler({"server": server.pid, **{n: c.pid for n, c in fed.clients.items()}})
        cpu.start()
        try:
            progress = Progress(fed, f"    {LABEL[mode]}, {len(names)} sites")
            fed.wait(timeout=args.timeout, on_poll=progress, interval=1.0)
        finally:
            cpu.stop()
        fed.check_exit()
    keys, folder = {header_key(fed.kit(n) / "site.pub"): n for n in names}, fed.run_folder()
    assert folder is not None
    return figures(mode, names, folder.read_report(), fed, keys, cpu, time.monotonic() - started)


def figures(mode: str, names: list[str], report: dict[str, Any], fed: Any, keys: dict[str, str], cpu: CpuSampler,
            wall_s: float) -> dict[str, Any]:
    """Everything measured for one federation, per site and round, over rounds 2..R."""
    mean = lambda xs: statistics.fmean(xs) if xs else None
    rounds = {int(r["round"]): r for r in report["rounds"]}
    problems = [] if report.get("status") == "completed" else [f"run status {report.get('status')!r}"]
    windows = {r: (rounds[r - 1]["evaluated_at"], rounds[r]["evaluated_at"]) for r in rounds
               if r >= 2 and "evaluated_at" in rounds.get(r - 1, {}) and "evaluated_at" in rounds[r]}
    fit_s = [rounds[r]["trained_at"] - a for r, (a, _) in windows.items() if "trained_at" in rounds[r]]
    for r in windows:
        train = rounds[r].get("train", {})
        if set(train.get("sites", {})) != set(names) or train.get("declined") or train.get("failed"):
            problems.append(f"round {r}: trained {len(train.get('sites', {}))}/{len(names)} sites, declined "
                            f"{sorted(train.get('declined', {}))}, failed {sorted(train.get('failed', {}))}")
    problems += [] if windows else ["no round >= 2 was evaluated: nothing measured"]
    round_s = [b - a for a, b in windows.values()]
    up, down, log_path = defaultdict(int), defaultdict(int), fed.server_dir / ACCESS_LOG  # type: ignore[var-annotated]
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    problems += [] if lines else [f"no access log at {log_path}"]
    for line in lines:
        if (m := _ACCESS.search(line)) is None:
            problems.append(f"unparsed access-log line: {line[:80]}")
        elif (at := next((r for r, (a, b) in windows.items() if a < float(m["msec"]) <= b), None)) and m["key"] in keys:
            up[keys[m["key"]], at] += int(m["length"])
            down[keys[m["key"]], at] += int(m["sent"])
    upload = [up[s, r] for s in names for r in windows]
    site_cpu, server_cpu, others, overhead = list[float](), list[float](), list[float](), list[float]()
    answered = {n: bench.worker_messages(fed.site_dir(n), windows) for n in names}
    messages = [m for n in names for r in windows for m in answered[n][r]]
    for r, (a, b) in windows.items():
        used = cpu.used(a, b)
        site_cpu += [v for n, v in used.items() if n in names]
        overhead += [(used[n] - sum(m["app_cpu_s"] for m in answered[n][r])) / len(answered[n][r])
                     for n in names if n in used and answered[n][r]]
        server_cpu += [used["server"]] if "server" in used else []
        if len(used) == len(names) + 2:
            others.append((used[MACHINE] - sum(v for k, v in used.items() if k != MACHINE)) / (b - a))
    mask, train_cpu = defaultdict(float), defaultdict(float)  # type: ignore[var-annotated]  # (site, round) -> s
    for n in names:
        path = fed.site_dir(n) / "logs" / "secagg.jsonl"
        for row in map(json.loads, path.read_text().splitlines() if path.exists() else []):
            if str(row.get("round")).isdigit() and int(row["round"]) in windows:
                mask[n, int(row["round"])] += row["secagg_cpu_s"]
                train_cpu[n, int(row["round"])] += row["train_cpu_s"]
    if mode == "secagg" and len(mask) != len(names) * len(windows):
        problems.append(f"secagg.jsonl has {len(mask)} of {len(names) * len(windows)} site-rounds")
    images = [s.get("num-examples") for r in windows for s in rounds[r]["train"].get("sites", {}).values()]
    return {
        "sites": len(names), "mode": mode, "run_id": report.get("run_id"), "status": report.get("status"),
        "federation_wall_s": round(wall_s, 1), "rounds_measured": sorted(windows), "round_s": mean(round_s),
        "round_s_each": round_s, "fit_s": mean(fit_s), "evaluate_s": mean([a - b for a, b in zip(round_s, fit_s)]),
        "train_images_per_site": mean([float(x) for x in images if x is not None]),
        "upload_bytes_per_site_round": mean([float(x) for x in upload]),
        "download_bytes_per_site_round": mean([float(down[s, r]) for s in names for r in windows]),
        "site_cpu_s_per_round": mean(site_cpu), "server_cpu_s_per_round": mean(server_cpu),
        "messages_per_site_round": len(messages) / (len(names) * len(windows)) if windows else None,
        "site_overhead_cpu_s_per_message": mean(overhead),
        "worker_take_cpu_s_per_message": mean([m["take_cpu_s"] + m["answer_cpu_s"] for m in messages]),
        "message_wait_s": mean([m["waited_s"] for m in messages]),
        "machine_cores_used_by_others": mean(others),
        "mask_cpu_s_per_site_round": sum(mask.values()) / len(mask) if mask else None,
        "train_cpu_s_per_site_round": sum(train_cpu.values()) / len(train_cpu) if train_cpu else None,
        "mask_pct_of_train": 100 * sum(mask.values()) / sum(train_cpu.values()) if sum(train_cpu.values()) else None,
        "problems": problems,
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    head = (f"{'sites':>5}  {'mode':<8}{'round s':>9}{'× plain':>9}{'fit s':>8}{'upload kB':>11}{'× plain':>9}"
            f"{'site CPU s':>12}{'msgs':>6}{'CPU/msg':>9}{'wait s':>8}{'mask CPU s':>12}{'mask/train':>12}{'others':>8}")
    lines, plain = [head, "-" * len(head)], {r["sites"]: r for r in results if r["mode"] == "plain"}
    for res in sorted(results, key=lambda r: (r["sites"], MODES.index(r["mode"]))):
        base = plain.get(res["sites"]) if res["mode"] != "plain" else None
        ratio = lambda k: res[k] / base[k] if base and res[k] is not None and base[k] else None  # noqa: B023
        up, pct = res["upload_bytes_per_site_round"], res["mask_pct_of_train"]
        lines.append(
            f"{res['sites']:>5}  {LABEL[res['mode']]:<8}{fmt(res['round_s'], '.1f'):>9}"
            f"{fmt(ratio('round_s'), '.2f'):>9}{fmt(res['fit_s'], '.1f'):>8}"
            f"{fmt(None if up is None else up / 1e3, ',.1f'):>11}"
            f"{fmt(ratio('upload_bytes_per_site_round'), '.2f'):>9}{fmt(res['site_cpu_s_per_round'], '.1f'):>12}"
            f"{fmt(res['messages_per_site_round'], '.0f'):>6}{fmt(res['site_overhead_cpu_s_per_message'], '.2f'):>9}"
            f"{fmt(res['message_wait_s'], '.1f'):>8}"
            f"{fmt(res['mask_cpu_s_per_site_round'], '.3f'):>12}{'–' if pct is None else f'{pct:.2f} %':>12}"
            f"{fmt(res['machine_cores_used_by_others'], '.1f'):>8}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    for flag, kind, default in (("--sites", parse_counts, "3,5,10"), ("--images-per-site", int, 2000),
                                ("--rounds", int, 2), ("--local-epochs", int, 3), ("--image-size", int, 64),
                                ("--dicom-size", int, 128), ("--threads", int, 1), ("--workdir", Path, None),
                                ("--out", Path, Path("secagg-bench.json")), ("--timeout", int, 3600)):
        p.add_argument(flag, type=kind, default=default, help="default: %(default)s")
    p.add_argument("--keep", action="store_true", help="Keep the work folder (data, logs, reports).")
    args = p.parse_args()
    counts = sorted(args.sites)
    if args.rounds < 2 or min(args.images_per_site, args.local_epochs, args.threads, args.timeout) < 1:
        p.error("--rounds must be at least 2 (round 1 is not measured); the other numbers positive")
    from simulations.synth import synthesize

    began, results, failed = time.monotonic(), [], False
    names = [chr(65 + i) if i < 26 else f"S{i + 1}" for i in range(max(counts))]  # A..Z, S27, ...
    with workdir(args.workdir, prefix="fedrad-secagg-", keep=args.keep) as work:
        try:
            say(f"synthesising {len(names)} sites × {args.images_per_site:,} DICOMs in {work / 'data'}")
            synthesize(work / "data", sites=names, images_per_site=args.images_per_site, seed=0, size=args.dicom_size,
                       overwrite=True)
            for i, n in enumerate(counts):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    say(f"{n} sites, {LABEL[mode]}: starting (work folder {work / f'{n}-sites-{mode}'})")
                    try:
                        res = run_federation(mode, names[:n], work / f"{n}-sites-{mode}", work / "data", args)
                    except (RuntimeError, OSError) as exc:  # FederationError is a RuntimeError
                        failed = True
                        say(f"{n} sites, {LABEL[mode]}: FAILED: {exc}")
                        continue
                    results.append(res)
                    say(f"{n} sites, {LABEL[mode]}: round {fmt(res['round_s'], '.1f')} s, federation "
                        f"{res['federation_wall_s']:.0f} s; problems: {res['problems'] or 'none'}")
        except KeyboardInterrupt:
            say("interrupted; every process we started is stopped")
            failed = True
    total, demo = time.monotonic() - began, next((r for r in results if r.get("train_images_per_site")), None)
    settings = {k: getattr(args, k) for k in ("images_per_site", "local_epochs", "image_size", "dicom_size", "rounds",
                                              "threads")} | {"train_images_per_site": demo and demo["train_images_per_site"]}
    train = f" (~{settings['train_images_per_site']:,.0f} in the training split)" if demo else ""
    print(f"fedrad SecAgg+ overhead: plain FedAvg vs SecAgg+ over the same TLS federation (nginx Fleet-API proxy, "
          f"SuperNode auth, one worker per site), {cores()} cores, every process on loopback; demo-size: "
          f"{args.images_per_site:,} synthetic {args.dicom_size}x{args.dicom_size} CT images per site{train}, model "
          f"input {args.image_size}x{args.image_size}, {args.local_epochs} local epochs of Opacus DP-SGD per round, "
          f"fl-client --threads {args.threads}; rounds 2..{args.rounds} measured, per site and round (columns: "
          "docs/benchmarks.md)")
    print("\n".join([*table(results), f"total {total / 60:.1f} min"]))
    for res in results:
        for problem in res["problems"]:
            print(f"note: {res['sites']} sites, {LABEL[res['mode']]}: {problem}")
    args.out.write_text(json.dumps({"command": " ".join(["python -m benchmarks.secagg", *sys.argv[1:]]),
                                    "settings": settings, "total_s": round(total, 1), "results": results}, indent=2))
    print(f"results: {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
