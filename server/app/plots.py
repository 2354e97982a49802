"""PNG plots of a run, drawn from ``report.json`` data only.

- ``auroc.png``: pooled AUROC per round (bold) and each site's AUROC (thin);
- ``epsilon.png``: each site's cumulative ε per round and its ``max-epsilon``;
- ``participation.png``: sites that trained, declined and failed per round.

With more than :data:`MAX_SITE_LINES` sites the per-site lines become the
spread across sites (min–max band and median). :func:`plot_series` returns the
exact numbers each figure draws; :func:`write_plots` draws them. Numbers and
site names only: never an image, a label or a patient id.

Matplotlib's object-oriented API with the Agg canvas only (no ``pyplot``, no
global state): the ServerApp may run in a thread of a simulation.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from common.files import write_atomic
from common.runfolder import AUROC_PLOT, EPSILON_PLOT, PARTICIPATION_PLOT, PLOT_FILES, RunFolder
from server.app.learning import finite_number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_TITLES = {
    AUROC_PLOT: "Pooled and per-site AUROC per round",
    EPSILON_PLOT: "ε spent per site per round",
    PARTICIPATION_PLOT: "Sites that trained, declined and failed per round",
}
"""Alt text of each plot in ``report.md``."""

MAX_SITE_LINES = 12
"""Above this many sites, draw the spread across sites instead of one line (and legend entry) each."""
NO_DP_TEXT = "no DP in this run"
FIGSIZE = (8.0, 4.5)  # inches
DPI = 100

Point = list[Any]  # [round, value or None]


# ------------------------------------------------------------------ numbers


def _spread(series: Mapping[str, list[Point]], rounds: Iterable[int]) -> dict[str, list[Any]]:
    """Min, median and max across sites per round (None where no site has a value)."""
    by_round: dict[int, list[float]] = {r: [] for r in rounds}
    for points in series.values():
        for r, value in points:
            if value is not None:
                by_round.setdefault(r, []).append(value)
    ordered = sorted(by_round)
    columns = [by_round[r] for r in ordered]
    return {"rounds": ordered, "min": [min(v) if v else None for v in columns],
            "median": [float(statistics.median(v)) if v else None for v in columns],
            "max": [max(v) if v else None for v in columns], "sites": [len(v) for v in columns]}


def _entries(report: Mapping[str, Any], key: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(round, its ``key`` entry: ``train`` or ``evaluate``) of each round that has one, in report order."""
    for entry in report.get("rounds", []):
        if isinstance(entry.get(key), Mapping):
            yield int(entry["round"]), entry[key]


def _auroc_series(report: Mapping[str, Any]) -> dict[str, Any]:
    pooled: list[Point] = []
    sites: dict[str, list[Point]] = {}
    rounds: list[int] = []
    for r, evaluate in _entries(report, "evaluate"):
        rounds.append(r)
        pooled.append([r, finite_number((evaluate.get("pooled") or {}).get("auroc"))])
        for name, metrics in sorted((evaluate.get("sites") or {}).items()):
            sites.setdefault(str(name), []).append([r, finite_number((metrics or {}).get("auroc"))])
    out: dict[str, Any] = {"rounds": rounds, "pooled": pooled, "sites": sites}
    if len(sites) > MAX_SITE_LINES:
        out["spread"] = _spread(sites, rounds)
    return out


def _epsilon_series(report: Mapping[str, Any]) -> dict[str, Any]:
    sites: dict[str, list[Point]] = {}
    max_epsilon: dict[str, float] = {}
    rounds: list[int] = []
    for r, train in _entries(report, "train"):
        rounds.append(r)
        for name, metrics in sorted((train.get("sites") or {}).items()):
            epsilon = finite_number((metrics or {}).get("epsilon"))
            if epsilon is None:
                continue  # trained without DP (or reported no ε): not on this plot
            sites.setdefault(str(name), []).append([r, epsilon])
            limit = finite_number(metrics.get("max-epsilon"))
            if limit is not None:
                max_epsilon[str(name)] = limit  # the latest one reported
    out: dict[str, Any] = {"rounds": rounds, "sites": sites, "max_epsilon": max_epsilon,
                           "max_lines": _max_lines(max_epsilon, many=len(sites) > MAX_SITE_LINES)}
    if len(sites) > MAX_SITE_LINES:
        out["spread"] = _spread(sites, rounds)
    return out


def _max_lines(max_epsilon: Mapping[str, float], *, many: bool) -> list[dict[str, Any]]:
    """The dashed ``max-epsilon`` lines: one when all sites agree, one per site, or lowest and highest."""
    values = sorted(set(max_epsilon.values()))
    if not values:
        return []
    if len(values) == 1:
        return [{"site": None, "label": "max ε (all sites)", "value": values[0]}]
    if not many:
        return [{"site": name, "label": f"max ε {name}", "value": v} for name, v in sorted(max_epsilon.items())]
    return [{"site": None, "label": "max ε (lowest site)", "value": values[0]},
            {"site": None, "label": "max ε (highest site)", "value": values[-1]}]


def _participation_series(report: Mapping[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"rounds": [], "trained": [], "declined": [], "failed": []}
    for r, train in _entries(report, "train"):
        out["rounds"].append(r)
        for key, field in (("trained", "sites"), ("declined", "declined"), ("failed", "failed")):
            out[key].append(len(train.get(field) or {}))
    return out


def plot_series(report: Mapping[str, Any]) -> dict[str, Any]:
    """The exact numbers each plot draws, from ``report.json`` data.

    Returns
    -------
    dict
        ``auroc``: ``rounds`` (evaluated), ``pooled`` ``[[round, auroc], ...]``,
        ``sites`` ``{site: [[round, auroc], ...]}`` (None = NaN/null, a gap) and,
        above :data:`MAX_SITE_LINES` sites, ``spread`` (``rounds``, ``min``,
        ``median``, ``max``, ``sites`` counted per round).
        ``epsilon``: ``rounds`` (trained), ``sites`` ``{site: [[round, ε], ...]}``
        for the rounds a site trained with DP (sites without ε are absent),
        ``max_epsilon`` ``{site: value}``, ``max_lines`` (the dashed lines
        drawn: ``site``, ``label``, ``value``) and ``spread`` as above.
        ``participation``: ``rounds``, ``trained``, ``declined``, ``failed``
        (site counts per round).
    """
    return {"auroc": _auroc_series(report), "epsilon": _epsilon_series(report),
            "participation": _participation_series(report)}


# ------------------------------------------------------------------ drawing


def _nan(values: Iterable[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _colors(names: list[str]) -> dict[str, Any]:
    """Twelve distinct colours (tab20's dark shades, then two light ones), cycled beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tab20: Any = cast(ListedColormap, colormaps["tab20"]).colors
    palette = [tab20[i] for i in (*range(0, 20, 2), 1, 3)]
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def _new_figure(title: str) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins, no layout engine: a layout engine costs a second draw pass per figure.
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.12, top=0.9)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _finish_axes(ax: Axes, rounds: list[int]) -> None:
    """Round numbers on the x axis, and a legend right of the axes (shrunk to leave it room: measured, not guessed)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    if rounds and len(rounds) <= 20:
        ax.set_xticks(sorted(set(rounds)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    if not ax.get_legend_handles_labels()[0]:
        return
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig = cast("Figure", ax.get_figure())
    width = legend.get_window_extent().width / (fig.get_figwidth() * fig.dpi)
    fig.subplots_adjust(right=max(0.5, 0.98 - width - 0.02))


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize="large", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_spread(ax: Axes, spread: Mapping[str, list[Any]], *, color: Any) -> None:
    """Per-site values as a min–max band and a median line (gaps where no site has a value)."""
    n = max(spread["sites"], default=0)
    ax.fill_between(spread["rounds"], _nan(spread["min"]), _nan(spread["max"]), color=color, alpha=0.25,
                    linewidth=0, label=f"min–max of {n} sites")
    ax.plot(spread["rounds"], _nan(spread["median"]), color=color, linewidth=1.5, marker=".", label="median site")


def _draw_sites(ax: Axes, series: Mapping[str, Any], colors: Mapping[str, Any], *, spread_color: str,
                **style: Any) -> None:
    """One line per site, or above :data:`MAX_SITE_LINES` sites their min–max band and median."""
    if "spread" in series:
        _draw_spread(ax, series["spread"], color=spread_color)
        return
    for name, points in sorted(series["sites"].items()):
        ax.plot([p[0] for p in points], _nan(p[1] for p in points), color=colors[name], marker="o", markersize=3,
                label=name, **style)


def _draw_auroc(series: Mapping[str, Any], colors: Mapping[str, Any], title: str) -> Figure:
    fig, ax = _new_figure(f"AUROC per round — {title}")
    if not series["rounds"]:
        _empty(ax, "no evaluated round")
        return fig
    _draw_sites(ax, series, colors, spread_color="tab:blue", linewidth=1.0, alpha=0.85)
    pooled = series["pooled"]
    ax.plot([p[0] for p in pooled], _nan(p[1] for p in pooled), color="black", linewidth=2.8, marker="o",
            markersize=5, label="pooled", zorder=5)
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1.0, label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("AUROC (validation)")
    _finish_axes(ax, series["rounds"])
    return fig


def _draw_epsilon(series: Mapping[str, Any], colors: Mapping[str, Any], title: str) -> Figure:
    fig, ax = _new_figure(f"Privacy spent (ε, cumulative) per round — {title}")
    if not series["sites"]:
        _empty(ax, NO_DP_TEXT)
        return fig
    _draw_sites(ax, series, colors, spread_color="tab:purple", linewidth=1.2)
    for line in series["max_lines"]:
        color = colors[line["site"]] if line["site"] is not None else "tab:red"
        ax.axhline(line["value"], color=color, linestyle="--", linewidth=1.2, label=line["label"])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ε (cumulative over the site's runs)")
    _finish_axes(ax, series["rounds"])
    return fig


def _draw_participation(series: Mapping[str, list[int]], title: str) -> Figure:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _new_figure(f"Sites per round — {title}")
    if not series["rounds"]:
        _empty(ax, "no training round")
        return fig
    bottom = [0] * len(series["rounds"])
    for key, label, color in (("trained", "trained", "tab:green"),
                              ("declined", "declined (privacy budget)", "tab:orange"), ("failed", "failed", "tab:red")):
        ax.bar(series["rounds"], series[key], bottom=bottom, width=0.7, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, series[key], strict=True)]
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("sites")
    _finish_axes(ax, series["rounds"])
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Each plot's PNG bytes, by file name (nothing is written)."""
    series = plot_series(report)
    names = sorted({*series["auroc"]["sites"], *series["epsilon"]["sites"]})
    colors = _colors(names)
    title = f"run {report.get('run_id', '?')}"
    if report.get("kind") and report["kind"] != "deployment":
        title += f" ({report['kind']})"
    return {
        AUROC_PLOT: _png(_draw_auroc(series["auroc"], colors, title)),
        EPSILON_PLOT: _png(_draw_epsilon(series["epsilon"], colors, title)),
        PARTICIPATION_PLOT: _png(_draw_participation(series["participation"], title)),
    }


def write_plots(run_dir: Path, report: Mapping[str, Any]) -> list[str]:
    """Draw the plots of ``report`` into ``run_dir``; the file names written (all of :data:`PLOT_FILES`).

    All figures are rendered before any file is written, each atomically; should a write fail part-way,
    those this call wrote are removed again: either all plots are there, or none is.
    """
    pngs, folder = render_plots(report), RunFolder(run_dir)
    written: list[str] = []
    try:
        for name in PLOT_FILES:
            write_atomic(folder.plot(name), pngs[name])
            written.append(name)
    except BaseException:
        for name in written:
            folder.plot(name).unlink(missing_ok=True)
        raise
    return written
