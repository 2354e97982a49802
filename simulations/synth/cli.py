"""The ``fl-synth`` command line: synthetic hospitals in a folder, one line per error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_typer
from simulations.synth.profiles import site_profile
from simulations.synth.spec import SynthConfigError
from simulations.synth.write import synthesize

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Write realistic synthetic multi-site head-CT DICOM data with per-slice bleed labels.",
)


def _parse_int(option: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SynthConfigError(f"Expected {option} to be an integer, but got {text!r}") from None


@app.command()
def synth(
    sites: Annotated[str, typer.Option("--sites", metavar="A,B,C", help="Comma-separated site names.")],
    images_per_site: Annotated[str, typer.Option("--images-per-site", metavar="N", help="DICOM files per site.")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output folder.")],
    seed: Annotated[str, typer.Option("--seed", metavar="S", help="Random seed.")] = "0",
    size: Annotated[str, typer.Option("--size", metavar="PX", help="Rows and Columns of every image.")] = "128",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace earlier fl-synth output in the site folders.")
    ] = False,
) -> None:
    """Write synthetic head-CT DICOM data for several hospitals, with per-slice bleed labels.

    Each site gets DIR/<site>/<PatientID>/SE001/IM0001.dcm ... (one study and
    one series of 3-8 slices per patient) and DIR/<site>/labels.csv
    (SOPInstanceUID,label). Sites A-D mimic GE, Siemens, Philips and Toshiba
    scanners; any other name gets a stable profile derived from the name.
    Same arguments, same bytes.
    """
    try:
        names = [name.strip() for name in sites.split(",")] if sites.strip() else []
        summaries = synthesize(
            out, sites=names, images_per_site=_parse_int("--images-per-site", images_per_site),
            seed=_parse_int("--seed", seed), size=_parse_int("--size", size), overwrite=overwrite,
        )
    except SynthConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as exc:
        typer.echo(f"error: Expected to write under {out}, but got: {exc}", err=True)
        raise typer.Exit(code=1) from None

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fl-synth → {out}", title_justify="left")
    for column in ("site", "manufacturer", "files", "patients", "positives"):
        table.add_column(column, justify="left" if column in ("site", "manufacturer") else "right")
    for name, summary in summaries.items():
        table.add_row(name, site_profile(name).manufacturer, *map(str, astuple(summary)[1:]))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``fl-synth`` command line; usage errors become one line and exit code 2."""
    run_typer(app, argv, prog_name="fl-synth")
