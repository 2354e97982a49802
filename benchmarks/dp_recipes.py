"""Which DP training recipe learns on every draw? Final pooled AUROC over repeated noise draws.

A *recipe* is run-config overrides (``"sgd:optimizer=sgd,learning-rate=1"``, ``--recipe``, repeatable) on the
``demo`` scenario's data and settings; a *draw* is one federation trained in this process with the production
pieces (``plan_privacy``, ``train_dp`` with CSPRNG noise, FedAvg ``aggregate``, ``pooled_metrics``) but without
Flower's transport, so ten draws of a dozen recipes fit in minutes on many cores. Prints every draw, then per
recipe the median, worst and best final AUROC, the draws below 0.80 and the per-round median; ``--json``: every draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness import cores
from simulations import scenario as scenarios
from simulations.run import checked_run_config

DEMO = scenarios.load("demo")  # make demo's data and settings (simulations/scenarios/demo.toml)
DEMO_SITES = tuple(DEMO.sites.site_names())
DEMO_IMAGES = DEMO.sites.images_per_site()[0]
DEFAULT_RECIPES = ("adam-0.03-b64:optimizer=adam,learning-rate=0.03,batch-size=64",  # the recipe before issue 15
                   "sgd-1-b128:optimizer=sgd,learning-rate=1.0,batch-size=128")  # the default since


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` → (name, run-config overrides); values are TOML, else strings."""
    name, _, body = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: Expected KEY=VALUE in recipe {text!r}, but got {item!r}")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def prepare(workdir: Path, *, images: int) -> None:
    """The demo's synthetic sites under ``workdir/data`` (written once)."""
    from simulations.synth import synthesize

    if not all((workdir / "data" / s / "labels.csv").is_file() for s in DEMO_SITES):
        synthesize(workdir / "data", sites=list(DEMO_SITES), images_per_site=images, seed=DEMO.sites.seed,
                   size=DEMO.sites.image_size, overwrite=True)


def _sites(run: Any, workdir: Path, epsilon: float) -> list[dict[str, Any]]:
    """Each demo site's data, patient groups and DP plan (its preprocessing cache built on first use)."""
    from client.app.site import open_data, plan_privacy, train_groups
    from common.config import SiteConfig

    out = []
    for name in DEMO_SITES:
        site = SiteConfig.from_flower({"site": name, "data-dir": str(workdir / "data" / name),
                                       "work-dir": str(workdir / f"site-{name}"), "max-epsilon": epsilon})
        d = open_data(site, run)
        groups, units = train_groups(site, d)
        out.append({
            "groups": groups, "plan": plan_privacy(site=site, run=run, num_units=units),
            "train": (d.images(d.train), d.labels[d.train]), "val": (d.images(d.validation), d.labels[d.validation]),
        })
    return out


def one_draw(job: tuple[str, dict[str, Any], int, str, float]) -> dict[str, Any]:
    """Train one federation with fresh noise; the pooled metrics after every round."""
    name, overrides, draw, workdir_text, epsilon = job
    import torch

    from client.app.evaluation import evaluate
    from client.app.training import train_dp
    from common.metrics import pooled_metrics
    from common.models import build_model
    from server.app.validation import aggregate

    torch.set_num_threads(1)
    run, workdir, cpu = checked_run_config({**DEMO.run, **overrides}), Path(workdir_text), torch.device("cpu")
    sites = _sites(run, workdir, epsilon)

    def fresh(seed: int | None = None) -> Any:
        return build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=seed)

    model = fresh(run.seed)
    if overrides.get("zero-head"):  # study only: the classifier layer starts at zero (the model at chance)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        for p in (head.weight, head.bias):
            torch.nn.init.zeros_(p)
    weights = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    rounds, t0 = [], time.monotonic()
    for server_round in range(1, run.num_server_rounds + 1):
        updates = []
        for s in sites:
            local = fresh()
            local.load_state_dict(weights)
            outcome = train_dp(
                local, images=s["train"][0], labels=s["train"][1], groups=s["groups"],
                slices_per_patient=run.slices_per_patient,
                augment=run.augment, num_classes=len(run.classes), epochs=run.local_epochs,
                batch_size=run.batch_size, learning_rate=run.learning_rate, max_grad_norm=run.max_grad_norm,
                noise_multiplier=s["plan"].noise_multiplier, device=cpu, secure_mode=True,
                optimizer=run.optimizer, momentum=run.momentum, seed=run.seed * 100_003 + server_round,
            )
            updates.append((OrderedDict((k, v.detach()) for k, v in local.state_dict().items()), outcome.num_examples))
        weights = OrderedDict(aggregate(updates, method="fedavg"))
        scored = fresh()
        scored.load_state_dict(weights)
        stats = [evaluate(scored, images=s["val"][0], labels=s["val"][1], device=cpu).statistics for s in sites]
        rounds.append(pooled_metrics(stats, num_classes=len(run.classes)))
    return {"recipe": name, "draw": draw, "seconds": time.monotonic() - t0, "rounds": rounds,
            "sigma": [s["plan"].noise_multiplier for s in sites], "sample_rate": [s["plan"].sample_rate for s in sites]}


def summarise(draws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe: median / worst / best final AUROC, draws below 0.80, per-round medians."""
    rows = []
    for name in dict.fromkeys(d["recipe"] for d in draws):
        mine = [d for d in draws if d["recipe"] == name]
        final = sorted(d["rounds"][-1]["auroc"] for d in mine)
        per_round = [statistics.median(d["rounds"][r]["auroc"] for d in mine) for r in range(len(mine[0]["rounds"]))]
        rows.append({
            "recipe": name, "draws": len(mine), "median": statistics.median(final), "worst": final[0],
            "best": final[-1], "below_0_80": sum(v < 0.80 for v in final), "per_round_median": per_round,
            "sigma": mine[0]["sigma"], "seconds_per_draw": statistics.median(d["seconds"] for d in mine),
        })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`summarise`'s rows."""
    lines = ["| recipe | draws | median | worst | best | draws < 0.80 | median per round | σ | s/draw |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        rounds = " ".join(f"{v:.2f}" for v in r["per_round_median"])
        lines.append(f"| {r['recipe']} | {r['draws']} | {r['median']:.3f} | {r['worst']:.3f} | {r['best']:.3f} | "
                     f"{r['below_0_80']} | {rounds} | {r['sigma'][0]:.2f} | {r['seconds_per_draw']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", help="NAME:KEY=VALUE,... (run-config overrides); repeatable")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--workers", type=int, default=cores())
    parser.add_argument("--epsilon", type=float, default=DEMO.epsilons()[0], help="each site's budget")
    parser.add_argument("--images", type=int, default=DEMO_IMAGES, help="slices per site")
    parser.add_argument("--workdir", type=Path, default=Path(".fedrad-recipes"))
    parser.add_argument("--json", type=Path, help="write every draw's per-round metrics here")
    args = parser.parse_args(argv)
    recipes = [parse_recipe(r) for r in (args.recipe or DEFAULT_RECIPES)]
    workdir = args.workdir.resolve()
    prepare(workdir, images=args.images)
    for _name, overrides in recipes:  # build each preprocessing cache once, before the workers read it
        _sites(checked_run_config({**DEMO.run, **overrides}), workdir, args.epsilon)
    jobs = [(name, o, d, str(workdir), args.epsilon) for d in range(args.draws) for name, o in recipes]
    draws, t0 = [], time.monotonic()
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for result in pool.map(one_draw, jobs):
            draws.append(result)
            curve = " ".join(f"{r['auroc']:.2f}" for r in result["rounds"])
            print(f"{result['recipe']} draw {result['draw']}: final AUROC {result['rounds'][-1]['auroc']:.3f} "
                  f"({curve}; {result['seconds']:.0f} s)", flush=True)
            if args.json:  # after every draw: a run cut short still leaves what it measured
                args.json.write_text(json.dumps({"epsilon": args.epsilon, "summary": summarise(draws), "draws": draws}))
    print(f"\n{len(draws)} draws in {time.monotonic() - t0:.0f} s on {args.workers} workers; "
          f"ε = {args.epsilon:g} per site\n")
    print(render(summarise(draws)))


if __name__ == "__main__":
    main()
