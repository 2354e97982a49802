"""The virtual sites of a scenario: their data (generated or partitioned once), caches and node configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.files import write_atomic
from simulations.scenario import Scenario, SitesSpec, per_site

DATA_MARKER = ".fedrad-sim-data.json"


def _synthesize(spec: SitesSpec, out: Path) -> None:
    from simulations.synth import SiteSpec, synthesize_sites

    prevalence: list[float | None] = [None] * spec.count
    if spec.alpha:
        from simulations.partition import dirichlet_prevalences

        prevalence = [*dirichlet_prevalences(spec.count, alpha=spec.alpha, seed=spec.seed)]
    elif spec.prevalence:
        prevalence = [*per_site(spec.prevalence, spec.count)]
    scanners: list[str | None] = [*per_site(spec.scanners, spec.count)] if spec.scanners else [None] * spec.count
    specs = [
        SiteSpec(name=n, images=i, prevalence=p, scanner=s)
        for n, i, p, s in zip(spec.site_names(), spec.images_per_site(), prevalence, scanners, strict=True)
    ]
    synthesize_sites(out, specs, seed=spec.seed, size=spec.image_size, workers=os.cpu_count() or 1)


def prepare_data(spec: SitesSpec, workdir: Path, *, classes: tuple[str, ...] = ("0", "1")) -> dict[str, Path]:
    """Each virtual site's data folder; generated (or partitioned) once per data spec, then reused.

    The folder appears complete or not at all: it is built under a temporary name and renamed when done.

    Parameters
    ----------
    spec
        The scenario's ``[sites]``: synthetic hospitals (``source = "synth"``) or a labelled folder to split.
    workdir
        fl-sim's work folder; the data goes to ``data/<spec.data_key()>/`` under it.
    classes
        The run's class names, which the split folder's ``labels.csv`` must use (synthetic data ignores them).

    Returns
    -------
    dict[str, Path]
        Site name → its data folder.

    Raises
    ------
    ConfigError, DataError
        When the folder cannot be split as asked (:func:`simulations.partition.partition_folder`).
    """
    root = workdir / "data" / spec.data_key()
    if not (root / DATA_MARKER).is_file():
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if spec.source == "synth":
                _synthesize(spec, tmp)
            else:
                from simulations.partition import partition_folder

                partition_folder(Path(spec.folder).expanduser().resolve(), tmp, sites=spec.count, classes=classes,
                                 alpha=spec.alpha or None, sizes=list(spec.sizes) or None, seed=spec.seed)
            sites = sorted(p.name for p in tmp.iterdir() if p.is_dir())
            write_atomic(tmp / DATA_MARKER, json.dumps({"sites": sites, "spec": spec.__dict__}, default=str))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sites = json.loads((root / DATA_MARKER).read_text())["sites"]
    return {name: root / name for name in sites}


def warm_caches(data_dirs: dict[str, Path], sites_dir: Path, run: RunConfig) -> None:
    """Build every site's preprocessing cache now (what each site would do on its first message).

    Parameters
    ----------
    data_dirs
        Site name → data folder (:func:`prepare_data`); sites are cached one after the other, in-process.
    sites_dir
        Parent of the sites' work folders; each site's cache goes under ``sites_dir/<name>``.
    run
        The run config (preprocessing, classes, split and seed), as the sites will open their data.

    Raises
    ------
    DataError
        When a site's data is unusable (:func:`client.data.dataset.load_site_data`).
    """
    from client.data.dataset import load_site_data

    for name, data_dir in data_dirs.items():
        load_site_data(
            data_dir=data_dir, work_dir=sites_dir / name, config=run.preprocess, classes=run.classes,
            val_fraction=run.val_fraction, seed=run.seed, workers=1,
        )


def site_rows(sc: Scenario, data_dirs: dict[str, Path], *, sites_dir: Path, ledgers_dir: Path) -> list[dict[str, Any]]:
    """One node config per virtual site (what ``fl-client`` would pass a real SuperNode), in ``data_dirs`` order.

    Parameters
    ----------
    sc
        The scenario: its ``[privacy]`` (ε, δ, unit, DP, secure mode) and threads per site.
    data_dirs
        Site name → data folder (:func:`prepare_data`). When there are not ``sites.count`` of them, every
        site gets the scenario's first ε.
    sites_dir, ledgers_dir
        Parents of the sites' work folders and privacy ledgers (``<dir>/<name>``).
    """
    epsilons = sc.epsilons() if len(data_dirs) == sc.sites.count else [sc.privacy.epsilon[0]] * len(data_dirs)
    return [
        {
            "site": name, "data-dir": str(path), "work-dir": str(sites_dir / name),
            "ledger-dir": str(ledgers_dir / name), "max-epsilon": float(eps), "delta": float(sc.privacy.delta),
            "privacy-unit": sc.privacy.unit, "dp": sc.privacy.dp, "secure-mode": sc.privacy.secure_mode,
            "threads": sc.simulation.threads_per_site, "device": "auto",
        }
        for (name, path), eps in zip(data_dirs.items(), epsilons, strict=True)
    ]
