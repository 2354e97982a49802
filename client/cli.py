"""``fl-client``: check and cache a site's DICOM data, then join the federation.

``fl-client --site A --data DIR --check [--json]`` only checks and caches the
data and prints the data report (exit 0 when the data is usable, 3 when not).
Without ``--check`` it does the same, then connects (:mod:`client.connection`): a
Flower SuperNode for the site and the site's worker (:mod:`client.worker`), which
runs the site's installed ClientApp for runs of an approved app only (``fl-client
apps`` prints the hashes; ``fl-client --approve-app HASH`` approves another). The data settings (window, image size, ...) are the coordinator's, from the
site's kit (``-c`` overrides them; without a kit, the run's defaults). The
site's own choices — data folder, privacy budget, device — travel in the
SuperNode's node config, which the coordinator cannot change.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from client.approval import APPROVALS_FILE, SiteApp, approve, read_approvals
from client.connection import connect
from common.cli import run_typer, setup_logging
from common.config import DEVICES, RunConfig, SiteConfig, positive_float, site_name
from common.errors import ConfigError, DataError, FederationError
from common.files import json_safe
from common.kit import DATA_KEYS, check_data_settings, parse_data_args
from common.processes import LOOPBACK, can_connect, parse_address

if TYPE_CHECKING:
    from common.kit import Kit

log = logging.getLogger("fl-client")
INSECURE_BANNER = (
    "WARNING: --insecure: plain HTTP. This site's model updates travel to the coordinator "
    "without TLS and without a site key: for demos and tests on one machine only."
)
cli = typer.Typer(add_completion=False, help=__doc__)


APP_DIR_HELP = ("The project folder whose ClientApp this site runs (default: the folder fedrad is installed from). "
                "Its FAB hash is the app this site approves; `fl-client apps` prints it.")
RUN_CONFIG_HELP = (
    "The run's data settings, when they differ from the kit's (the coordinator's), e.g. "
    "-c 'image-size=64 window=\"voi\"'. Keys: " + ", ".join(DATA_KEYS) + "."
)


def _data_settings(items: list[str] | None, *, kit: Kit | None) -> dict[str, dict[str, Any]]:
    """Every data setting → ``{"value": ..., "from": "-c" | "kit" | "default"}``: ``-c`` wins, then the kit's."""
    layers = (("-c", parse_data_args(items)), ("kit", kit.data if kit is not None and kit.data else {}),
              ("default", check_data_settings({})))
    return {key: next({"value": values[key], "from": source} for source, values in layers if key in values)
            for key in DATA_KEYS}


@cli.command()
def join(
    data: Annotated[Path | None, typer.Option(help="Folder with the site's DICOM files and labels.csv.")] = None,
    site: Annotated[str | None, typer.Option(help="This site's name, e.g. A (default: the kit's).")] = None,
    kit: Annotated[Path | None, typer.Option(help="The enrollment kit from the coordinator (`fl-server enroll`): "
                                             "TLS trust, this site's key and the coordinator's address.")] = None,
    server: Annotated[str | None, typer.Option(help="Coordinator address HOST:PORT (default: the kit's).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP without a kit: loopback demos and tests only.")] = False,
    max_epsilon: Annotated[float, typer.Option(help="This site's privacy budget ε (its ceiling, whatever the run asks).")] = 8.0,
    delta: Annotated[float, typer.Option(help="δ of the site's (ε, δ) guarantee.")] = 1e-5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="Site work folder (cache, privacy accounting, logs). Default: ./fedrad-site-<site>.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for training (0 = all).")] = 0,
    secure_mode: Annotated[bool, typer.Option(
        "--secure-mode/--no-secure-mode", help="DP sampling and noise seeded from the OS CSPRNG every round (default). "
        "--no-secure-mode makes them reproducible from the run's seed: tests only, the guarantee does not hold.",
    )] = True,
    privacy_unit: Annotated[str, typer.Option(help="What one DP record is: patient (all of a patient's images) or image.")] = "patient",
    noise_multiplier: Annotated[float, typer.Option(
        min=0.0, help="Fix this site's σ instead of calibrating it to the run's rounds (0 = calibrate). "
        "The site then trains until its max-epsilon is reached and declines later rounds.",
    )] = 0.0,
    check: Annotated[bool, typer.Option("--check", help="Only check and cache the data, print the report and exit (0 = usable).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="With --check: print the report as JSON.")] = False,
    run_config: Annotated[list[str] | None, typer.Option("--run-config", "-c", help=RUN_CONFIG_HELP)] = None,
    workers: Annotated[int, typer.Option(min=0, help="Processes decoding DICOM (0 = one per CPU core).")] = 0,
    app_dir: Annotated[Path | None, typer.Option(help=APP_DIR_HELP)] = None,
    approve_app: Annotated[str | None, typer.Option(help=(
        "Approve runs of the app with this FAB hash at this site (besides the installed app), remember it in "
        "the site's work folder and exit. Its runs are still executed by the installed code."))] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Check the data, then run a SuperNode for this site until stopped (Ctrl-C)."""
    setup_logging(verbose)
    if json_output and not check:
        raise ConfigError("`--json` only goes with `--check`")
    site_kit = _site_kit(kit, site=site, insecure=insecure)
    site = site or (site_kit.site if site_kit else None)
    if not site:
        raise ConfigError("Expected `--site` (or `--kit`), but got neither")
    if approve_app is not None:
        return _approve(approve_app, work_dir=_work_dir(workdir, site))
    if data is None:
        raise ConfigError("Expected `--data DIR` (the site's DICOM folder), but got none")
    server = server or (site_kit.server if site_kit else f"{LOOPBACK}:9092")
    if device not in DEVICES:
        raise ConfigError(f"Expected `--device` to be one of {', '.join(DEVICES)}, but got {device!r}")
    site_cfg = SiteConfig(
        site=site_name(site),
        data_dir=data.resolve(),
        work_dir=_work_dir(workdir, site),
        max_epsilon=positive_float("max-epsilon", max_epsilon),
        delta=positive_float("delta", delta),
        device=device,
        threads=threads,
        secure_mode=secure_mode,
        privacy_unit=privacy_unit,
        noise_multiplier=noise_multiplier,
    )
    from common.adapters.flower import parse_config_args

    # The node config as Flower will parse it: one validation path for every key.
    SiteConfig.from_flower(parse_config_args([site_cfg.to_flower()]))
    host, port = parse_address(server)
    if insecure and host not in (LOOPBACK, "localhost"):
        raise ConfigError(f"`--insecure` connects to {LOOPBACK} only, but got --server {server}; use the kit (--kit) for TLS")
    if not site_cfg.data_dir.is_dir():
        raise DataError(f"Data folder {site_cfg.data_dir} does not exist or is not a folder")
    if site_kit is None and not insecure and not check:
        raise ConfigError(
            "Expected `--kit DIR` (the enrollment kit from the coordinator's `fl-server enroll --site NAME`), "
            "or --insecure for a loopback demo"
        )
    if not secure_mode and not check:
        log.warning("SECURE MODE IS OFF (--no-secure-mode): this site's DP noise is reproducible from the run's seed")
    if device == "cuda" and not check:
        from client.app.training import resolve_device

        resolve_device(device)

    settings = _data_settings(run_config, kit=site_kit)
    log.info("Site %s data settings: %s", site_cfg.site, _describe_settings(settings))
    from client.app.site import open_data

    site_data = open_data(site_cfg, RunConfig.from_flower({key: s["value"] for key, s in settings.items()}),
                          workers=workers, require_usable=False)
    report = {"site": site_cfg.site, **site_data.report, "settings": settings}
    if check:
        if json_output:
            print(json.dumps(json_safe(report), indent=2, allow_nan=False))
        else:
            print_report(report)
        if not report["usable"]:
            raise DataError(f"Site {site_cfg.site} data is not usable: {report['summary']}")
        return 0
    if not report["usable"]:
        raise DataError(f"Site {site_cfg.site} data is not usable: {report['summary']}; see fl-client --check")
    log.info("Site %s data: %s", site_cfg.site, report["summary"])
    for warning in report["warnings"]:
        log.warning("Site %s data: %s", site_cfg.site, warning)
    if not can_connect(host, port, timeout=3):
        raise FederationError(f"Cannot reach the coordinator at {host}:{port}; is fl-server running there?")
    if site_kit is None:
        log.warning(INSECURE_BANNER)
        security = ["--insecure"]
    else:
        _check_coordinator_tls(host, port, site_kit.ca_cert)
        security = ["--root-certificates", str(site_kit.ca_cert), "--auth-supernode-private-key", str(site_kit.private_key)]

    app = SiteApp.load(app_dir, work_dir=site_cfg.work_dir)
    log.info("Site %s runs app %s (from %s)%s", site_cfg.site, app.installed, app.folder,
             f"; also approved: {', '.join(sorted(app.approved - {app.installed}))}" if len(app.approved) > 1 else "")
    connect(site_cfg, site_kit, app, host=host, port=port, security=security)


def _work_dir(workdir: Path | None, site: str) -> Path:
    return (workdir or Path(f"fedrad-site-{site}")).resolve()


def _approve(value: str, *, work_dir: Path) -> int:
    """``--approve-app``: remember ``value`` in the site's approvals; 0."""
    path = work_dir / APPROVALS_FILE
    added = approve(path, value)
    print(f"{'Approved' if added else 'Already approved'}: app {value.strip().lower()} ({path}); "
          "a running fl-client applies it from the next message on")
    return 0


def _site_kit(kit: Path | None, *, site: str | None, insecure: bool) -> Kit | None:
    """The site's enrollment kit, checked; None for --insecure or a data check."""
    from common.kit import load_kit

    if kit is not None and insecure:
        raise ConfigError("`--kit` and `--insecure` exclude each other")
    if kit is None:
        return None
    loaded = load_kit(kit)
    if site is not None and site != loaded.site:
        raise ConfigError(f"Expected `--site` to match the kit's site {loaded.site!r}, but got {site!r}")
    return loaded


def _check_coordinator_tls(host: str, port: int, ca_cert: Path) -> None:
    """Refuse a coordinator whose TLS certificate (for ``host``) the kit's consortium CA did not sign."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=10) as sock, context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise FederationError(
            f"The coordinator at {host}:{port} is not the one your kit trusts: its TLS certificate "
            f"failed verification against the kit's consortium CA ({exc.verify_message}); "
            "check --server, or ask the coordinator for a new kit"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise FederationError(
            f"No TLS connection to the coordinator at {host}:{port} ({exc}); is it serving TLS (not --insecure)?"
        ) from None


def _describe_settings(settings: dict[str, dict[str, Any]]) -> str:
    """``settings`` as ``-c`` pairs grouped by source: ``image-size=128 window="voi" (kit); seed=0 (default)``."""
    names = {"-c": "-c", "kit": "the kit", "default": "defaults"}
    groups = [
        " ".join(f"{key}={json.dumps(s['value'])}" for key, s in settings.items() if s["from"] == source)
        + f" ({names[source]})"
        for source in names if any(s["from"] == source for s in settings.values())
    ]
    return "; ".join(groups)


def _fmt(value: Any) -> str:
    """A report value as plain text, escaped for rich (file names and DICOM values may hold [...])."""
    from rich.markup import escape

    if isinstance(value, dict):
        return ", ".join(f"{escape(str(k))}: {_fmt(v)}" for k, v in value.items()) or "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else escape(str(value))


def print_report(report: dict[str, Any]) -> None:
    """The data report as rich tables (what ``--check`` prints)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    status = "[green]usable[/green]" if report["usable"] else "[red]NOT usable[/red]"
    console.print(f"[bold]Site {escape(report['site'])} data check[/bold]: {status} — {escape(report['summary'])}")
    files = report["files"]
    overview = Table(show_header=False, box=None)
    for label, value in (
        ("files seen / accepted / rejected", f"{files['seen']} / {files['accepted']} / {files['rejected']}"),
        ("images (frames) accepted", report["images"]),
        ("labels", f"keyed by {report['labels']['key']}; per class {_fmt(report['labels']['classes'])}"),
        ("patients / studies / series", f"{report['patients']} / {report['studies']} / {report['series']}"),
        ("modalities", report["modalities"]),
        ("manufacturers", report["manufacturers"]),
        ("transfer syntaxes", report["transfer_syntaxes"]),
        ("photometric", report["photometric"]),
        ("image sizes", report["image_sizes"]),
        ("pixel spacing (mm)", report["pixel_spacing_mm"]),
        ("intensity (modality values)", report["intensity"]),
        ("train split", report["split"]["train"]),
        ("validation split", report["split"]["validation"]),
        ("cache", f"{report['cache']['decoded']} files decoded now, {report['cache']['reused']} reused"),
        ("data settings", _describe_settings(report["settings"]) if "settings" in report else None),
    ):
        overview.add_row(label, _fmt(value))
    console.print(overview)
    if report["rejections"]:
        table = Table(title="Rejected files (one reason each)")
        table.add_column("files", justify="right")
        table.add_column("reason")
        table.add_column("examples (relative paths, on this site only)")
        for group in report["rejections"]:
            table.add_row(str(group["count"]), escape(group["reason"]), escape(", ".join(group["files"][:3])))
        console.print(table)
    problems = report["labels"]
    for name in ("unmatched_rows", "conflicting", "unknown_class", "empty_key"):
        if problems[name]["count"]:
            console.print(f"labels.csv {name.replace('_', ' ')}: {problems[name]['count']} (lines {problems[name]['lines']})")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {escape(problem)}")


apps_cli = typer.Typer(add_completion=False)


@apps_cli.command()
def apps(
    site: Annotated[str | None, typer.Option(help="This site's name (default: the kit's).")] = None,
    kit: Annotated[Path | None, typer.Option(help="The site's enrollment kit.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Site work folder (default: ./fedrad-site-<site>).")] = None,
    app_dir: Annotated[Path | None, typer.Option(help=APP_DIR_HELP)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> int:
    """Print the FAB hash of the app this site runs, and the other app hashes it approved.

    The coordinator's `fl-server` logs the hash of the app it submits: the two must match (or the
    site must approve the coordinator's with `fl-client --approve-app HASH`), or the site refuses the run.
    """
    site_kit = _site_kit(kit, site=site, insecure=False)
    name = site or (site_kit.site if site_kit else None)
    if not name:
        raise ConfigError("Expected `--site` (or `--kit`), but got neither")
    app = SiteApp.load(app_dir, work_dir=_work_dir(workdir, name))
    approved = read_approvals(app.approvals)
    if json_output:
        print(json.dumps({"site": name, "installed": {"hash": app.installed, "folder": str(app.folder)},
                          "approved": approved, "approvals-file": str(app.approvals)}, indent=2))
        return 0
    print(f"Site {name} runs app {app.installed} (installed in {app.folder})")
    for entry in approved:
        print(f"  also approved: {entry['hash']} (since {entry['approved-at']})")
    if not approved:
        print(f"  no other app approved ({app.approvals})")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run the ``fl-client`` command line on ``argv`` (default: ``sys.argv[1:]``); ``fl-client apps ...`` lists apps."""
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["apps"]:
        run_typer(apps_cli, args[1:], prog_name="fl-client apps")
    run_typer(cli, args, prog_name="fl-client")


if __name__ == "__main__":
    main()
