"""``fl-client``: check and cache a site's DICOM data, then join the federation.

Starts a Flower SuperNode for the site. The site's own choices — data folder,
privacy budget, device — travel in the SuperNode's node config, which the
coordinator cannot change.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_typer, setup_logging
from common.config import DEVICES, PreprocessConfig, SiteConfig, positive_float, site_name
from common.errors import ConfigError, DataError, FederationError
from common.flower import flower_bin, flower_env
from common.processes import LOOPBACK, ProcessSet, can_connect, free_port, parse_address

log = logging.getLogger("fl-client")
INSECURE_BANNER = (
    "WARNING: plain transport. This site's model updates travel to the coordinator "
    "without TLS or secure aggregation: for demos and tests on one machine only."
)
cli = typer.Typer(add_completion=False, help=__doc__)


def prepare_data(site: SiteConfig, preprocess: PreprocessConfig) -> dict[str, object]:
    """Check and cache the site's data; return the summary (no identifiers in it)."""
    from client.data.cache import load_site_data

    data = load_site_data(data_dir=site.data_dir, work_dir=site.work_dir, config=preprocess)
    return data.summary


@cli.command()
def join(
    site: Annotated[str, typer.Option(help="This site's name, e.g. A.")],
    data: Annotated[Path, typer.Option(help="Folder with the site's DICOM files and labels.csv.")],
    server: Annotated[str, typer.Option(help="Coordinator address HOST:PORT.")] = f"{LOOPBACK}:9092",
    max_epsilon: Annotated[float, typer.Option(help="This site's privacy budget ε (its ceiling, whatever the run asks).")] = 8.0,
    delta: Annotated[float, typer.Option(help="δ of the site's (ε, δ) guarantee.")] = 1e-5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="Site work folder (cache, privacy accounting, logs). Default: ./fedrad-site-<site>.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for training (0 = all).")] = 0,
    secure_mode: Annotated[bool, typer.Option("--secure-mode", help="Cryptographically secure DP noise (needs torchcsprng).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Check the data, then run a SuperNode for this site until stopped (Ctrl-C)."""
    setup_logging(verbose)
    if device not in DEVICES:
        raise ConfigError(f"Expected `--device` to be one of {', '.join(DEVICES)}, but got {device!r}")
    site_cfg = SiteConfig(
        site=site_name(site),
        data_dir=data.resolve(),
        work_dir=(workdir or Path(f"fedrad-site-{site}")).resolve(),
        max_epsilon=positive_float("max-epsilon", max_epsilon),
        delta=positive_float("delta", delta),
        device=device,
        threads=threads,
        secure_mode=secure_mode,
    )
    if site_cfg.delta >= 1:
        raise ConfigError(f"Expected `delta` to be below 1, but got {delta!r}")
    host, port = parse_address(server)
    if not site_cfg.data_dir.is_dir():
        raise DataError(f"Data folder {site_cfg.data_dir} does not exist or is not a folder")
    if secure_mode:
        import importlib.util

        if importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError("--secure-mode needs the torchcsprng package, which is not installed")
    if device == "cuda":
        from client.training import resolve_device

        resolve_device(device)

    summary = prepare_data(site_cfg, PreprocessConfig())
    log.info(
        "Site %s data: %s files seen, %s accepted, %s rejected %s; labels %s; %s patients",
        site_cfg.site, summary["files_seen"], summary["accepted"],
        sum(summary["rejected"].values()), summary["rejected"] or "", summary["labels"], summary["patients"],
    )
    if not can_connect(host, port, timeout=3):
        raise FederationError(f"Cannot reach the coordinator at {host}:{port}; is fl-server running there?")
    log.warning(INSECURE_BANNER)

    env = flower_env(site_cfg.work_dir / "flwr-home")
    runtime_port = free_port()
    with ProcessSet() as procs:
        supernode = procs.start(
            f"SuperNode {site_cfg.site}",
            [
                flower_bin("flower-supernode"), "--insecure", "--superlink", f"{host}:{port}",
                "--host", LOOPBACK, "--port", str(runtime_port),
                "--node-config", site_cfg.to_flower(),
            ],
            env=env,
        )
        log.info("Site %s joined via %s:%d (SuperNode pid %d); Ctrl-C to leave", site_cfg.site, host, port, supernode.pid)
        while supernode.running():
            time.sleep(1)
        code = supernode.popen.returncode
    raise FederationError(f"SuperNode of site {site_cfg.site} exited with code {code}")


def main(argv: list[str] | None = None) -> None:
    run_typer(cli, argv if argv is not None else sys.argv[1:], prog_name="fl-client")


if __name__ == "__main__":
    main()
