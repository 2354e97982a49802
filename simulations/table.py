"""The comparison of ``fl-sim compare`` as a markdown table, a JSON document and a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.files import json_safe, write_atomic
from simulations.arms import METRICS, OPERATING_POINT, ArmResult, fmt
from simulations.scenario import Scenario


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or not np.isfinite(value) or not np.isfinite(ref) or ref == 0:
        return None
    return value / ref


def cell(arm: ArmResult, metric: str) -> str:
    """``median (worst–best)`` over an arm's draws; the value alone for a single result."""
    spread = arm.spread(metric)
    if len(arm.draws) < 2 or spread["median"] is None:
        return fmt(arm.pooled.get(metric))
    return f"{fmt(spread['median'])} ({fmt(spread['min'])}–{fmt(spread['max'])})"


def ratios(arm: ArmResult, ref: ArmResult | None) -> dict[str, dict[str, float | None]]:
    """Each metric over the pooled arm's: for the median draw and for the worst draw (lowest AUROC)."""
    base = ref.pooled if ref else {}
    worst = (arm.worst() or arm).pooled
    return {"median": {m: _ratio(arm.spread(m)["median"], base.get(m)) for m in METRICS},
            "worst": {m: _ratio(worst.get(m), base.get(m)) for m in METRICS}}


def render_table(arms: list[ArmResult]) -> str:
    """Markdown: one row per arm; pooled metrics (median and range over draws), ratios to pooled, per-site AUROC."""
    ref = next((a for a in arms if a.arm == "pooled"), None)
    names = sorted({n for a in arms for n in a.sites})
    per_site = len(names) <= 8
    head = ["arm", "draws", *METRICS, *OPERATING_POINT, "AUROC / pooled (median)", "AUROC / pooled (worst)"]
    head += [f"AUROC {n}" for n in names] if per_site else ["site AUROC min", "median", "max"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in arms:
        r = ratios(a, ref)
        row = [a.label, str(max(1, len(a.draws))), *(cell(a, m) for m in (*METRICS, *OPERATING_POINT))]
        row += [fmt(r["median"]["auroc"]), fmt(r["worst"]["auroc"])]
        if per_site:
            row += [fmt(a.sites.get(n, {}).get("auroc")) for n in names]
        else:
            values = np.array([a.sites[n].get("auroc") for n in a.sites if a.sites[n].get("auroc") is not None], float)
            values = values[np.isfinite(values)]
            row += [fmt(float(f(values))) if len(values) else "–" for f in (np.min, np.median, np.max)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot(folder: Path, arms: list[ArmResult]) -> None:
    """Left: pooled AUROC per round (a band from the worst to the best draw, the median as a line);
    right: final pooled AUROC per arm (bar: median draw, whisker: worst–best, dots: sites)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    rounds_ax, final_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for i, a in enumerate(arms):
        colour = colours[i % len(colours)]
        short = a.label.split(" (")[0] + (f" ε={a.epsilon:g}" if a.epsilon else "")
        curves = [d.auroc_per_round for d in a.draws] or ([list(a.curve)] if a.curve else [])
        if curves:
            rows = [[np.nan if v is None else v for v in c] for c in curves if len(c) == len(curves[0])]
            grid = np.array(rows, float)
            x = np.arange(1, grid.shape[1] + 1)
            rounds_ax.plot(x, np.nanmedian(grid, axis=0), color=colour, marker="o", ms=3,
                           label=short + (f" (median of {len(grid)})" if len(grid) > 1 else ""))
            if len(grid) > 1:
                rounds_ax.fill_between(x, np.nanmin(grid, axis=0), np.nanmax(grid, axis=0), color=colour, alpha=0.2)
        elif a.pooled.get("auroc") is not None:
            rounds_ax.axhline(a.pooled["auroc"], color=colour, ls="--", lw=1, label=f"{short} (final)")
        spread = a.spread("auroc")
        final_ax.bar(i, spread["median"] or 0.0, color=colour, alpha=0.8)
        mid, lo, hi = spread["median"], spread["min"], spread["max"]
        if len(a.draws) > 1 and mid is not None and lo is not None and hi is not None:
            final_ax.errorbar(i, mid, yerr=[[mid - lo], [hi - mid]], color="black", capsize=4)
        site_values = [float(v["auroc"]) for v in a.sites.values() if v.get("auroc") is not None]
        final_ax.scatter([i] * len(site_values), site_values, color="black", s=10, zorder=3)
    rounds_ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    rounds_ax.set_xlabel("round")
    rounds_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds_ax.set_ylabel("pooled AUROC (band: worst–best draw)")
    rounds_ax.set_ylim(0.3, 1)
    rounds_ax.legend(fontsize=7, loc="lower right")
    ticks = [a.label.split(" (")[0] + (f"\nε={a.epsilon:g}" if a.epsilon else "") for a in arms]
    final_ax.set_xticks(range(len(arms)), ticks, fontsize=8)
    final_ax.set_ylabel("final AUROC (bar: pooled median, dots: sites)")
    final_ax.set_ylim(0, 1)
    fig.tight_layout()
    tmp = folder / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, folder / "compare.png")


def arm_json(a: ArmResult, ref: ArmResult | None) -> dict[str, Any]:
    """Arm ``a`` as a ``compare.json`` entry: metrics, spread, ratios to ``ref`` (the pooled arm) and draws."""
    r = ratios(a, ref)
    return {
        "arm": a.arm, "label": a.label, "epsilon": a.epsilon, "pooled": a.pooled, "sites": a.sites,
        "seconds": a.seconds, "run_dir": a.run_dir,
        "draws": len(a.draws) or 1,
        "spread": {m: a.spread(m) for m in (*METRICS, *OPERATING_POINT)},
        "ratio_to_pooled": r["median"],
        "ratio_to_pooled_worst": r["worst"],
        "auroc_per_round": [list(d.auroc_per_round) for d in a.draws] or ([list(a.curve)] if a.curve else []),
        "draw_results": [
            {"pooled": d.pooled, "auroc_per_round": d.auroc_per_round, "seconds": d.seconds, "run_dir": d.run_dir}
            for d in a.draws
        ],
    }


def write_comparison(folder: Path, sc: Scenario, run: RunConfig, repeats: int, arms: list[ArmResult]) -> str:
    """Write ``compare.json``, ``compare.md`` and ``compare.png`` into ``folder``; return the markdown table.

    Parameters
    ----------
    folder
        The comparison folder (it exists).
    sc, run
        The scenario compared and the checked run config every arm used (they head the files).
    repeats
        Noise draws per DP arm.
    arms
        Every arm's result, in table order; the ``pooled`` arm, when present, is the reference of the ratios.
    """
    table = render_table(arms)
    ref = next((a for a in arms if a.arm == "pooled"), None)
    data = {"scenario": sc.to_dict(), "epochs": run.num_server_rounds * run.local_epochs, "repeats": repeats,
            "arms": [arm_json(a, ref) for a in arms]}
    write_atomic(folder / "compare.json", json.dumps(json_safe(data), indent=2))
    setup = (
        f"Every arm: {run.num_server_rounds} × {run.local_epochs} epochs, model {run.model}, "
        f"{run.preprocess.image_size}px, {run.optimizer} lr {run.learning_rate:g}, {run.batch_size} patients per step. "
        "Metrics on each site's validation patients; pooled = summed sufficient statistics; "
        "sensitivity/specificity at 0.5 and at the threshold chosen on pooled validation "
        f"({run.operating_point}). DP arms: median (worst–best) over {repeats} independent noise draw(s)."
    )
    head = "\n\n".join([f"# fl-sim compare: {sc.name}", sc.description, setup, table,
                        "![pooled and per-site AUROC per arm](compare.png)"])
    runs = "".join(f"- {a.label}: `{a.run_dir}`\n" for a in arms if a.run_dir)
    write_atomic(folder / "compare.md", f"{head}\n\n{runs}")
    _plot(folder, arms)
    return table
