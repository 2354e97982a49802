"""What every fedrad command line shares: one-line errors, logging set-up, exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click
import typer

from common.errors import FedradError

EXIT_INTERRUPTED = 130


def error_line(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def setup_logging(verbose: bool = False) -> None:
    """Log one timestamped line per record to stderr, at DEBUG when ``verbose``, else at INFO."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise


def run_typer(app: typer.Typer, argv: Sequence[str] | None = None, *, prog_name: str) -> NoReturn:
    """Run a typer app; turn every failure into one line on stderr and a non-zero exit.

    Set ``FEDRAD_DEBUG=1`` to get tracebacks of unexpected errors.

    Parameters
    ----------
    app, argv
        The command's typer app, and the arguments after the program name (None reads them from ``sys.argv``).
    prog_name
        The command's name (``"fl-client"``), shown in usage lines and in the hint after a usage error.

    Raises
    ------
    SystemExit
        Always: with the command's return value (0 when it returns None), a :class:`FedradError`'s
        ``exit_code``, 2 for a usage error, 130 when interrupted, 1 for any other exception (which
        propagates instead when ``FEDRAD_DEBUG`` is set).
    """
    command = typer.main.get_command(app)
    try:
        result = command.main(args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        error_line("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        error_line(f"{exc.format_message()} (see {prog_name} --help)")
        sys.exit(2)
    except FedradError as exc:
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("FEDRAD_DEBUG"):
            raise
        error_line(f"unexpected {type(exc).__name__}: {exc} (set FEDRAD_DEBUG=1 for details)")
        sys.exit(1)
    sys.exit(int(result or 0))
