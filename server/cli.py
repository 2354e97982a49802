"""``fl-server``: start a Flower SuperLink, submit the fedrad run, report, stop.

Plain transport only in this version: the SuperLink binds 127.0.0.1 and says
so loudly. TLS, enrollment and SecAgg+ come with the secure-federation work.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli import run_typer, setup_logging
from common.config import WINDOW_PRESETS
from common.errors import ConfigError, FederationError
from common.flower import flower_bin, flower_env
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, can_connect, port_is_free
from server.report import load_report

log = logging.getLogger("fl-server")
CONNECTION = "fedrad"
DEFAULT_PORT = 9092
INSECURE_BANNER = (
    "WARNING: plain transport. The SuperLink listens on 127.0.0.1 only, without TLS, "
    "site enrollment or secure aggregation: for demos and tests on one machine."
)

cli = typer.Typer(add_completion=False, help=__doc__)


def app_dir() -> Path:
    """The Flower App folder (the fedrad source tree with its pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"fl-server needs the fedrad source tree (pyproject.toml) at {root}; install with `pip install -e .`"
        )
    return root


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_connection(flwr_home: Path, port: int) -> None:
    """The `flwr` CLI's connection to our SuperLink, in its own FLWR_HOME."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
    )


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON; errors become FederationError."""
    try:
        proc = subprocess.run(
            [flower_bin("flwr"), *args, "--format", "json"],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
    try:
        out = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        out = {"success": False, "error-message": (proc.stderr or proc.stdout).strip()[-300:]}
    if proc.returncode != 0 or not out.get("success", False):
        raise FederationError(f"`flwr {args[0]}` failed: {out.get('error-message', 'no details')}")
    return out


def start_superlink(procs: ProcessSet, *, port: int, workdir: Path) -> ManagedProcess:
    env = flower_env(workdir / "flwr-home" / "superlink")
    superlink = procs.start(
        "SuperLink",
        [
            flower_bin("flower-superlink"), "--insecure", "--host", LOOPBACK, "--port", str(port),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        log_path=workdir / "logs" / "superlink.log",
    )
    deadline = time.monotonic() + 60
    while not can_connect(LOOPBACK, port, timeout=0.5):
        if not superlink.running():
            raise FederationError(f"SuperLink exited at start: {superlink.tail(3)}")
        if time.monotonic() > deadline:
            raise FederationError("SuperLink did not start listening within 60 s")
        time.sleep(0.3)
    return superlink


def print_summary(run_dir: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    report = load_report(run_dir)
    console = Console()
    table = Table(title=f"fedrad run {report['run_id']}: pooled validation metrics")
    for col in ("round", "AUROC", "sensitivity", "specificity", "F1", "accuracy"):
        table.add_column(col, justify="right")
    for r in report["rounds"]:
        p = r.get("evaluate", {}).get("pooled", {})
        table.add_row(str(r["round"]), *(f"{p[k]:.3f}" if p.get(k) is not None else "–" for k in ("auroc", "sensitivity", "specificity", "f1", "accuracy")))
    console.print(table)
    sites = Table(title="privacy spent per site (reported by each site)")
    for col in ("site", "ε", "δ", "max ε", "rounds trained"):
        sites.add_column(col, justify="right")
    for name, s in sorted(report["sites"].items()):
        sites.add_row(name, f"{s['epsilon']:.3f}", f"{s['delta']:g}", f"{s['max_epsilon']:g}", str(s["rounds_trained"]))
    console.print(sites)
    console.print(f"report: {run_dir / 'report.json'}  ({report['wall_seconds']:.0f} s)")
    return report


@cli.command()
def serve(
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    min_sites: Annotated[int, typer.Option(min=1, help="Sites that must be connected before a round starts.")] = 2,
    port: Annotated[int, typer.Option(min=1, max=65535, help="SuperLink port on 127.0.0.1.")] = DEFAULT_PORT,
    workdir: Annotated[Path, typer.Option(help="Where runs/, checkpoints and logs go.")] = Path("fedrad-server"),
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round at each site.")] = 3,
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Model input size in pixels.")] = 64,
    window: Annotated[str, typer.Option(help=f"Window preset: {', '.join(WINDOW_PRESETS)}.")] = "brain",
    run_config: Annotated[list[str] | None, typer.Option("--run-config", "-c", help="Extra run config, e.g. 'batch-size=16'.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain transport on loopback (the only mode in this version).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Start the SuperLink, run the federation, print the report and stop."""
    setup_logging(verbose)
    if window not in WINDOW_PRESETS:
        raise ConfigError(f"Expected `--window` to be one of {', '.join(WINDOW_PRESETS)}, but got {window!r}")
    if not insecure:
        raise ConfigError("TLS is not available in this version; run with --insecure on loopback")
    if not port_is_free(port):
        raise FederationError(f"Port {port} on {LOOPBACK} is already in use; choose another with --port")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = app_dir()
    log.warning(INSECURE_BANNER)
    overrides = {
        "num-server-rounds": rounds,
        "min-sites": min_sites,
        "local-epochs": local_epochs,
        "image-size": image_size,
        "window": window,
        "workdir": str(workdir),
    }
    config_args = [" ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
    config_args += list(run_config or [])
    cli_env = flower_env(workdir / "flwr-home" / "cli")
    write_connection(Path(cli_env["FLWR_HOME"]), port)

    with ProcessSet() as procs:
        superlink = start_superlink(procs, port=port, workdir=workdir)
        log.info("SuperLink listening on %s:%d (log: %s)", LOOPBACK, port, superlink.log_path)
        run_args = ["run", str(source), CONNECTION]
        for c in config_args:
            run_args += ["--run-config", c]
        run_id = str(flwr_cli(run_args, cli_env)["run-id"])
        log.info("Submitted run %s; waiting for %d site(s) to connect", run_id, min_sites)
        procs.start("log stream", [flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=cli_env)
        status, details = "", ""
        while True:
            if not superlink.running():
                raise FederationError(f"SuperLink stopped unexpectedly: {superlink.tail(3)}")
            run = flwr_cli(["ls", CONNECTION, "--run-id", run_id], cli_env)["runs"][0]
            status, details = run.get("status", ""), run.get("status-details", "")
            if status.startswith("finished"):
                break
            time.sleep(2)
        time.sleep(1.5)  # let the log stream print the last lines
    run_dir = workdir / "runs" / run_id
    if status != "finished:completed":
        raise FederationError(f"run {run_id} ended as {status}: {details or 'see ' + str(workdir / 'logs')}")
    print_summary(run_dir)
    return 0


def main(argv: list[str] | None = None) -> None:
    run_typer(cli, argv if argv is not None else sys.argv[1:], prog_name="fl-server")


if __name__ == "__main__":
    main()
