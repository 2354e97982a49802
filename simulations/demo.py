"""``make demo``: three synthetic hospitals train a shared CNN with DP over a secure federation.

Its data and run settings are the ``demo`` scenario's
(``simulations/scenarios/demo.toml``), so ``fl-sim compare demo`` measures the
same recipe on the same data. Synthesises sites A, B and C, enrolls each with ``fl-server enroll`` (one kit
per hospital), starts ``fl-server`` (TLS SuperLink behind the Fleet-only
proxy, SecAgg+) and one ``fl-client --kit`` per site on free loopback ports,
waits for the run, prints its pooled AUROC and every site's ε, audits every
site's privacy ledger against the run report with ``fl-audit``, and stops
every process it started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_typer
from common.errors import FederationError
from common.flower import flower_bin
from common.runfolder import RunFolder
from simulations import scenario as scenarios
from simulations.federation import Federation

cli = typer.Typer(add_completion=False, help=__doc__)


@cli.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Demo folder (data, site and server work dirs, logs).")] = Path(".demo"),
    sites: Annotated[
        str | None, typer.Option(help="Comma-separated site names (default: the demo scenario's).")
    ] = None,
    images_per_site: Annotated[int | None, typer.Option(min=20)] = None,
    rounds: Annotated[int | None, typer.Option(min=1)] = None,
    max_epsilon: Annotated[float | None, typer.Option(help="Each site's privacy budget.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
) -> int:
    """Run the three-hospital demo end to end."""
    from simulations.synth import synthesize

    sc = scenarios.load(DEMO_SCENARIO)
    names = [s.strip() for s in sites.split(",") if s.strip()] if sites else sc.sites.site_names()
    images_per_site = images_per_site or sc.sites.images_per_site()[0]
    rounds = rounds or int(sc.run["num-server-rounds"])
    max_epsilon = max_epsilon or sc.epsilons()[0]
    seed = sc.sites.seed if seed is None else seed
    started = time.monotonic()
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    data = workdir / "data"
    print(f"==> Synthesising {len(names)} hospitals × {images_per_site} CT slices in {data}", flush=True)
    synthesize(data, sites=names, images_per_site=images_per_site, seed=seed, size=sc.sites.image_size)

    sc_args = ["--rounds", str(rounds), *_run_config_args(sc)]
    client_args = ["--max-epsilon", str(max_epsilon)]
    with Federation(workdir, names, data, server_args=sc_args, client_args=client_args) as fed:
        logs, server_dir = fed.logs, fed.server_dir
        for name in names:
            print(f"==> fl-server enroll --site {name}: a key pair and a kit for hospital {name}", flush=True)
            fed.enroll(name)
        print(f"==> Starting fl-server on https://127.0.0.1:{fed.port} (TLS, enrolled sites only, SecAgg+; "
              f"{rounds} rounds, {len(names)} sites)", flush=True)
        fed.start_server(timeout=60)
        for name in names:
            print(f"==> Starting fl-client --kit {fed.kit(name)} (max ε {max_epsilon:g}; "
                  f"log {logs / f'site-{name}.log'})", flush=True)
            fed.join(name)
        print("==> Training (the coordinator's log follows)", flush=True)
        follow = _Follow(logs / "fl-server.log")
        fed.wait(timeout=float("inf"), on_poll=follow, interval=1.0)
        follow()
        fed.check_exit()
    folder = RunFolder.in_workdir(server_dir)[-1]
    report = folder.read_report()
    final = report["final"]
    eps = ", ".join(f"{n} ε={s['epsilon']:.2f}" for n, s in sorted(report["sites"].items()))
    print(
        f"==> Demo finished in {time.monotonic() - started:.0f} s: final pooled AUROC "
        f"{final['auroc']:.3f} after round {final['round']}; {eps} (δ=1e-5); report {folder.report_json}",
        flush=True,
    )
    if final.get("threshold") is not None:
        print(f"==> Operating point (chosen on pooled validation): threshold {final['threshold']:.3f}, "
              f"sensitivity {final['sensitivity-at-threshold']:.3f}, "
              f"specificity {final['specificity-at-threshold']:.3f}", flush=True)
    print(f"==> Transport: {report['transport']}", flush=True)
    # What each hospital's privacy officer would run: its ledger, checked against the run report.
    verified = {}
    for name in names:
        ledger = workdir / f"site-{name}" / "privacy"
        print(f"==> fl-audit --ledger {ledger} --run {folder.path}", flush=True)
        proc = subprocess.run([flower_bin("fl-audit"), "--ledger", str(ledger), "--run", str(folder.path), "--json"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FederationError(f"fl-audit failed for site {name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        verified[name] = json.loads(proc.stdout).get("verified")
        print(f"    site {name}: ledger verified, every ε recomputed (RDP and PRV), budget kept", flush=True)
    summary = {"auroc": final["auroc"], "sites": report["sites"], "audit": verified}
    (workdir / "summary.json").write_text(json.dumps(summary))
    return 0


DEMO_SCENARIO = "demo"
_SET_BY_DEMO = ("num-server-rounds", "min-sites")


def _run_config_args(sc: scenarios.Scenario) -> list[str]:
    """The scenario's other run settings as ``fl-server --run-config`` pairs (values in TOML)."""
    pairs = [f"{k}={json.dumps(v)}" for k, v in sc.run.items() if k not in _SET_BY_DEMO]
    return ["--run-config", " ".join(pairs)] if pairs else []


_INTERESTING = (
    "Round ", "WARNING", "ERROR", "error", "┃", "│", "┏", "┗", "┡", "└", "report:", "privacy spent", "pooled validation"
)


class _Follow:
    """Prints the interesting new lines of the coordinator's log at each call."""

    def __init__(self, path: Path) -> None:
        self.path, self.shown = path, 0

    def __call__(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(errors="replace").splitlines()
        for line in lines[self.shown:]:
            if any(key in line for key in _INTERESTING) and "└──>" not in line and "├──" not in line:
                print(line, flush=True)
        self.shown = len(lines)


def main() -> None:
    """Run ``make demo``'s command line on ``sys.argv[1:]``."""
    run_typer(cli, sys.argv[1:], prog_name="make demo")


if __name__ == "__main__":
    main()
