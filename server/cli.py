"""``fl-server``: the coordinator. Enroll sites, then serve a run.

``fl-server enroll --site A`` creates the consortium CA (once), the site's key
pair and its kit (``<workdir>/kits/A/`` and ``A.tar.gz``) for the hospital.
``fl-server rekey --site A``, ``fl-server remove --site A`` and
``fl-server sites`` manage enrolled sites; a running server learns about
every change at once.

``fl-server [serve] --rounds 5 ...`` starts a Flower SuperLink on 127.0.0.1
with TLS and SuperNode authentication (enrolled keys only), puts an nginx
reverse proxy on ``--host:--port`` that lets through the Fleet API only,
submits the fedrad run (SecAgg+ on by default), prints the report and stops.
``--init-weights FILE`` starts the run from given weights (checked against the
run's model before anything starts; :mod:`common.weights`).
``--insecure`` is plain HTTP on loopback, for demos and tests only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.cli import run_typer, setup_logging
from common.config import RESUME_RUN_ID_KEY, WINDOW_PRESETS, Launch
from common.errors import ConfigError
from common.processes import LOOPBACK
from server import coordinator as steps
from server.superlink import app_dir, sync_live_superlink

if TYPE_CHECKING:
    from server.enroll import Consortium

DEFAULT_PORT = 9092

cli = typer.Typer(add_completion=False, help=__doc__)


WORKDIR = Path("fedrad-server")
Workdir = Annotated[Path, typer.Option(help="The coordinator's folder: PKI, kits, runs/, logs.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


@cli.command()
def serve(
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    min_sites: Annotated[int, typer.Option(min=1, help="Sites that must be connected before a round starts.")] = 2,
    host: Annotated[str, typer.Option(help="Address the hospitals connect to (the Fleet-API proxy binds it); "
                                      "0.0.0.0 for every interface.")] = LOOPBACK,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the hospitals connect to.")] = DEFAULT_PORT,
    public_host: Annotated[list[str] | None, typer.Option(help="Name or IP the hospitals use for this coordinator "
                                                          "(goes into its TLS certificate; repeatable).")] = None,
    workdir: Workdir = WORKDIR,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round at each site.")] = 3,
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Model input size in pixels.")] = 64,
    window: Annotated[str, typer.Option(help=f"Window preset: {', '.join(WINDOW_PRESETS)}.")] = "brain",
    run_config: Annotated[list[str] | None, typer.Option("--run-config", "-c", help="Extra run config, e.g. 'batch-size=16' or 'secagg=false'.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP on 127.0.0.1 without TLS or enrollment: demos and tests only.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder (<workdir>/runs/<run-id>) from its last "
                                                "completed round, with its saved config (round options are ignored).")] = None,
    init_weights: Annotated[Path | None, typer.Option(
        "--init-weights", metavar="FILE",
        help="Start from these weights instead of random ones: a safetensors file or a torch.save'd state_dict of "
             "the run's model (checked before anything starts; its SHA-256 goes into the report).")] = None,
    verbose: Verbose = False,
) -> None:
    """Start the SuperLink (and its Fleet-API proxy), run the federation, print the report and stop."""
    setup_logging(verbose)
    init = steps.init_weights_config(init_weights, resume=resume)
    saved: dict[str, Any] | None = None
    if resume is not None:
        workdir, saved = steps.resume_config(resume.resolve(), insecure=insecure)
        min_sites = int(saved.get("min-sites", min_sites))
    bind = steps.check_address(window=window, insecure=insecure, host=host, port=port)
    workdir = steps.open_workdir(workdir)
    transport = steps.choose_transport(
        workdir, insecure=insecure, bind=bind, port=port, min_sites=min_sites, public_host=public_host or []
    )
    options = {"num-server-rounds": rounds, "min-sites": min_sites, "local-epochs": local_epochs,
               "image-size": image_size, "window": window}
    ours = Launch(workdir=str(workdir), transport=transport.description, init_weights=init,
                  resume_run_id=str(saved[RESUME_RUN_ID_KEY]) if saved is not None else "")
    config_args = steps.run_config_args(options, launch=ours, saved=saved, extra=list(run_config or []))
    run, launch = steps.check_run_config(config_args)
    start = steps.check_init_weights(run, launch, resume=resume)
    config_args = steps.secagg_args(config_args, run=run, start=start, sites=len(transport.enrolled) or None)
    source = steps.stage_app(app_dir(), workdir)
    status, details, flower_run_id = steps.run_federation(
        workdir, source=source, transport=transport, port=port, config_args=config_args, min_sites=min_sites,
        resumed=saved is not None,
    )
    run_id = launch.resume_run_id or flower_run_id
    steps.report_run(workdir, run_id, status=status, details=details)


def _consortium(workdir: Path, *, verbose: bool | None = None) -> Consortium:
    """The consortium in ``workdir``, after setting up logging unless ``verbose`` is None."""
    from server.enroll import Consortium

    if verbose is not None:
        setup_logging(verbose)
    return Consortium(workdir.resolve())


Site = Annotated[str, typer.Option(help="The site's name, e.g. A.")]
DataSettings = Annotated[list[str] | None, typer.Option(
    "--run-config", "-c",
    help="The run's data settings, written into this kit and every later one so sites check and cache what the "
    "run uses, e.g. -c 'image-size=128 window=\"voi\"'. Keys: image-size, window, multiframe, color, enhance, "
    "classes, val-fraction, seed. Default: those given before, else the run config's defaults.",
)]


@cli.command()
def enroll(
    site: Site,
    server_address: Annotated[str, typer.Option(help="HOST:PORT the site connects to (written into its kit).")] = f"{LOOPBACK}:{DEFAULT_PORT}",
    workdir: Workdir = WORKDIR, run_config: DataSettings = None, verbose: Verbose = False,
) -> None:
    """Enroll a hospital: its key pair and kit; registered with a running server at once."""
    from common.kit import parse_data_args

    consortium = _consortium(workdir, verbose=verbose)
    consortium.ensure_ca()
    kit = consortium.enroll(site, server_address=server_address, data=parse_data_args(run_config) or None)
    entry = consortium.sites()[site]
    live = sync_live_superlink(consortium.workdir, add={site: kit / "site.pub"})
    print(f"enrolled site {site} (key {entry['fingerprint']}); hand {consortium.kit_archive(site)} to the site "
          f"over a trusted channel{'; registered with the running server' if live else ''}")


@cli.command()
def rekey(
    site: Site,
    server_address: Annotated[str | None, typer.Option(help="HOST:PORT the site connects to (default: the one in its current kit).")] = None,
    workdir: Workdir = WORKDIR, run_config: DataSettings = None, verbose: Verbose = False,
) -> None:
    """Give a site a new key pair and kit; its old key stops working at once."""
    from common.kit import KIT_FILE, parse_data_args, read_kit_toml

    consortium = _consortium(workdir, verbose=verbose)
    if server_address is None:
        try:
            server_address = read_kit_toml(consortium.kit_dir(site) / KIT_FILE)["server"]
        except (ConfigError, KeyError):
            # The kit was deleted after hand-over (as deployment.md advises): never guess an address.
            raise ConfigError(
                f"Site {site}'s current kit is gone, so its address is unknown; give --server-address HOST:PORT"
            ) from None
    rekeyed = consortium.rekey(site, server_address=server_address, data=parse_data_args(run_config) or None)
    live = sync_live_superlink(consortium.workdir, drop=(site,), add={site: rekeyed.kit / "site.pub"})
    print(f"re-keyed site {site}: old key {rekeyed.old_fingerprint} revoked"
          f"{' (unregistered from the running server)' if live else ''}; hand {consortium.kit_archive(site)} to the site")


@cli.command()
def remove(site: Site, workdir: Workdir = WORKDIR, verbose: Verbose = False) -> None:
    """Remove a site from the consortium; a running server refuses its key at once."""
    consortium = _consortium(workdir, verbose=verbose)
    consortium.remove(site)
    live = sync_live_superlink(consortium.workdir, drop=(site,))
    print(f"removed site {site}{'; unregistered from the running server' if live else ''}")


@cli.command()
def sites(
    workdir: Workdir = WORKDIR,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the enrolled sites and their key fingerprints."""
    enrolled = _consortium(workdir).sites()
    if json_output:
        print(json.dumps({s: {k: e[k] for k in ("fingerprint", "enrolled")} for s, e in enrolled.items()}, indent=2))
        return
    if not enrolled:
        print("no site is enrolled")
    for name, entry in sorted(enrolled.items()):
        print(f"{name}\t{entry['fingerprint']}\tenrolled {entry['enrolled']}")


COMMANDS = ("serve", "enroll", "rekey", "remove", "sites")


def main(argv: list[str] | None = None) -> None:
    """Run ``fl-server`` on ``argv`` (default: the command line); no subcommand means ``serve``."""
    args = list(argv if argv is not None else sys.argv[1:])
    if not args or (args[0] not in COMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "serve")  # `fl-server --rounds 5` is `fl-server serve --rounds 5`
    run_typer(cli, args, prog_name="fl-server")


if __name__ == "__main__":
    main()
