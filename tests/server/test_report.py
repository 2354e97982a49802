"""The run report's plots and markdown: RunReport alone, no Flower process."""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

import server.app.report as report_module
from common.runfolder import PLOT_FILES
from server.app import plots
from server.app.plots import (
    DPI,
    FIGSIZE,
    MAX_SITE_LINES,
    NO_DP_TEXT,
    plot_series,
    write_plots,
)
from server.app.report import RunReport, load_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# Three rounds, three sites. C trains without DP (no ε, then a null ε), B declines round 2
# and C fails it; B's AUROC is NaN in round 2 (one class missing in its validation split).
TRAIN: dict[int, dict[str, Any]] = {
    1: {
        "sites": {
            "A": {"num-examples": 100, "epsilon": 1.0, "max-epsilon": 8.0, "delta": 1e-5},
            "B": {"num-examples": 80, "epsilon": 1.25, "max-epsilon": 8.0, "delta": 1e-5},
            "C": {"num-examples": 60},
        },
        "declined": {},
        "failed": {},
    },
    2: {
        "sites": {"A": {"num-examples": 100, "epsilon": 2.0, "max-epsilon": 8.0, "delta": 1e-5}},
        "declined": {"B": "site B's privacy budget is spent for this round"},
        "failed": {"C": "connection reset"},
    },
    3: {
        "sites": {
            "A": {"num-examples": 100, "epsilon": 3.0, "max-epsilon": 8.0, "delta": 1e-5},
            "B": {"num-examples": 80, "epsilon": 2.5, "max-epsilon": 8.0, "delta": 1e-5},
            "C": {"num-examples": 60, "epsilon": None},
        },
        "declined": {},
        "failed": {},
    },
}
POOLED_AUROC = {1: 0.625, 2: 0.7, 3: 0.8125}
SITE_AUROC = {
    1: {"A": 0.6, "B": 0.55, "C": 0.7},
    2: {"A": 0.65, "B": NAN},
    3: {"A": 0.75, "B": 0.8, "C": 0.9},
}


def site_eval(auroc: float) -> dict[str, float]:
    return {"auroc": auroc, "sensitivity": 0.5, "specificity": 0.75, "positives": 4.0, "negatives": 8.0}


def three_round_report(run_dir: Path, **kwargs: Any) -> RunReport:
    report = RunReport(run_dir=run_dir, run_id=42, config={"num-server-rounds": 3}, transport="test", **kwargs)
    for r, train in TRAIN.items():
        report.record_train(r, site_metrics=train["sites"], declined=train["declined"], failed=train["failed"],
                            checkpoint=None)
        report.record_evaluate(
            r,
            pooled={"auroc": POOLED_AUROC[r], "sensitivity": 0.5},
            per_site={name: site_eval(v) for name, v in SITE_AUROC[r].items()},
        )
    return report


def many_sites_report(run_dir: Path, n_sites: int, n_rounds: int = 5) -> RunReport:
    report = RunReport(run_dir=run_dir, run_id=7, config={}, transport="test", kind="simulation")
    names = [f"site-{i:03d}" for i in range(n_sites)]
    for r in range(1, n_rounds + 1):
        report.record_train(
            r,
            site_metrics={n: {"num-examples": 10, "epsilon": r * (1 + i / n_sites), "max-epsilon": 4.0 + i % 3}
                          for i, n in enumerate(names)},
            declined={},
            checkpoint=None,
        )
        report.record_evaluate(
            r, pooled={"auroc": 0.5 + r / 20},
            per_site={n: site_eval(NAN if i == 0 else (i * 7 % 13) / 13) for i, n in enumerate(names)},
        )
    return report


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = imread(path)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert image.std() > 0  # something was drawn


def leftovers(run_dir: Path) -> list[str]:
    """PNG files and temporary files of an atomic write."""
    return sorted(p.name for p in run_dir.iterdir() if p.suffix in {".png", ".tmp"})


def test_finish_writes_three_plots_and_lists_them(tmp_path: Path) -> None:
    three_round_report(tmp_path).finish("completed")
    data = load_report(tmp_path)
    assert data["status"] == "completed"
    assert data["plots"] == ["auroc.png", "epsilon.png", "participation.png"] == list(PLOT_FILES)
    for name in data["plots"]:
        assert_valid_png(tmp_path / name)
    assert leftovers(tmp_path) == sorted(PLOT_FILES)  # no temporary file left behind


def test_plot_series_agrees_with_recorded_metrics(tmp_path: Path) -> None:
    three_round_report(tmp_path).finish("completed")
    with open(tmp_path / "report.json") as f:
        series = plot_series(json.load(f))

    auroc = series["auroc"]
    assert auroc["rounds"] == [1, 2, 3]
    assert auroc["pooled"] == [[r, v] for r, v in POOLED_AUROC.items()]
    assert auroc["sites"] == {
        "A": [[1, 0.6], [2, 0.65], [3, 0.75]],
        "B": [[1, 0.55], [2, None], [3, 0.8]],  # NaN → null → a gap
        "C": [[1, 0.7], [3, 0.9]],
    }
    assert "spread" not in auroc

    epsilon = series["epsilon"]
    assert epsilon["sites"] == {"A": [[1, 1.0], [2, 2.0], [3, 3.0]], "B": [[1, 1.25], [3, 2.5]]}  # C: no DP
    assert epsilon["max_epsilon"] == {"A": 8.0, "B": 8.0}
    assert epsilon["max_lines"] == [{"site": None, "label": "max ε (all sites)", "value": 8.0}]

    assert series["participation"] == {
        "rounds": [1, 2, 3], "trained": [3, 1, 3], "declined": [0, 1, 0], "failed": [0, 1, 0],
    }


def test_figures_draw_the_series(tmp_path: Path) -> None:
    """What plot_series says is what the figures show."""
    series = plot_series(three_round_report(tmp_path).to_json())
    colors = plots._colors(["A", "B", "C"])
    ax = plots._draw_auroc(series["auroc"], colors, "t").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["pooled"].get_xdata()) == [1, 2, 3]
    assert list(lines["pooled"].get_ydata()) == list(POOLED_AUROC.values())
    assert math.isnan(lines["B"].get_ydata()[1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B", "C", "pooled", "chance"]

    ax = plots._draw_epsilon(series["epsilon"], colors, "t").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"A", "B", "max ε (all sites)"}
    assert list(lines["B"].get_ydata()) == [1.25, 2.5]

    ax = plots._draw_participation(series["participation"], "t").axes[0]
    heights = [[p.get_height() for p in c] for c in ax.containers]
    assert heights == [[3, 1, 3], [0, 1, 0], [0, 1, 0]]


def test_each_site_gets_its_own_max_epsilon_line_when_they_differ(tmp_path: Path) -> None:
    report = RunReport(run_dir=tmp_path, run_id=1, config={}, transport="test")
    report.record_train(1, site_metrics={"A": {"epsilon": 1.0, "max-epsilon": 8.0},
                                         "B": {"epsilon": 2.0, "max-epsilon": 4.0}}, declined={}, checkpoint=None)
    lines = plot_series(report.to_json())["epsilon"]["max_lines"]
    assert [(x["site"], x["value"]) for x in lines] == [("A", 8.0), ("B", 4.0)]


def test_many_sites_draw_the_spread_not_a_line_each(tmp_path: Path) -> None:
    n_sites = 40
    report = many_sites_report(tmp_path, n_sites)
    report.finish("completed")
    data = load_report(tmp_path)
    assert data["plots"] == list(PLOT_FILES)
    for name in data["plots"]:
        assert_valid_png(tmp_path / name)

    series = plot_series(data)
    assert len(series["auroc"]["sites"]) == n_sites > MAX_SITE_LINES
    spread = series["auroc"]["spread"]
    assert spread["rounds"] == [1, 2, 3, 4, 5]
    assert spread["sites"] == [n_sites - 1] * 5  # site-000's AUROC is NaN: not counted
    values = [(i * 7 % 13) / 13 for i in range(1, n_sites)]
    assert spread["min"] == [min(values)] * 5 and spread["max"] == [max(values)] * 5
    assert spread["median"] == [statistics.median(values)] * 5

    eps = series["epsilon"]
    assert eps["spread"]["min"] == [float(r) for r in range(1, 6)]
    assert eps["spread"]["max"] == [r * (1 + (n_sites - 1) / n_sites) for r in range(1, 6)]
    assert [x["value"] for x in eps["max_lines"]] == [4.0, 6.0]  # lowest and highest, not 40 lines

    colors = plots._colors(list(series["auroc"]["sites"]))
    for fig in (plots._draw_auroc(series["auroc"], colors, "t"), plots._draw_epsilon(eps, colors, "t")):
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert len(labels) <= 5 and not any(label.startswith("site-") for label in labels)


def test_no_dp_and_no_rounds_still_draw(tmp_path: Path) -> None:
    report = RunReport(run_dir=tmp_path, run_id=3, config={}, transport="test")
    report.record_train(1, site_metrics={"A": {"num-examples": 5}, "B": {"num-examples": 5, "epsilon": None}},
                        declined={}, checkpoint=None)
    series = plot_series(report.to_json())
    assert series["epsilon"]["sites"] == {} and series["epsilon"]["max_lines"] == []
    ax = plots._draw_epsilon(series["epsilon"], {}, "t").axes[0]
    assert [t.get_text() for t in ax.texts] == [NO_DP_TEXT]

    empty = tmp_path / "empty"
    RunReport(run_dir=empty, run_id=4, config={}, transport="test").finish("failed")  # failed before round 1
    data = load_report(empty)
    assert data["status"] == "failed" and data["plots"] == list(PLOT_FILES)
    for name in PLOT_FILES:
        assert_valid_png(empty / name)


def test_markdown_has_per_site_table_and_plots(tmp_path: Path) -> None:
    three_round_report(tmp_path).finish("completed")
    markdown = (tmp_path / "report.md").read_text()
    assert "- kind: deployment" in markdown
    assert "## Per-site validation metrics (last evaluated round)" in markdown
    assert "| site | AUROC | sensitivity | specificity | examples |" in markdown
    assert "| A | 0.750 | 0.500 | 0.750 | 12 |" in markdown
    assert "| C | 0.900 | 0.500 | 0.750 | 12 |" in markdown
    assert "![Pooled and per-site AUROC per round](auroc.png)" in markdown
    assert "(epsilon.png)" in markdown and "(participation.png)" in markdown


def test_markdown_before_finish_has_no_plots(tmp_path: Path) -> None:
    report = three_round_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Per-site validation metrics (last evaluated round)" in markdown
    assert ".png" not in markdown and load_report(tmp_path)["plots"] == []
    report.record_evaluate(4, pooled={"auroc": 0.9}, per_site={"A": {"auroc": NAN}})
    assert "| A | – | – | – |" in (tmp_path / "report.md").read_text()  # NaN shown as a dash, no examples


def test_threshold_columns_and_final_line(tmp_path: Path) -> None:
    report = RunReport(run_dir=tmp_path, run_id=5, config={"operating-point": "youden"}, transport="test")
    report.record_evaluate(1, pooled={"auroc": 0.8, "sensitivity": 0.0, "specificity": 1.0, "threshold": 0.37,
                                      "sensitivity-at-threshold": 0.7, "specificity-at-threshold": 0.65}, per_site={})
    markdown = (tmp_path / "report.md").read_text()
    assert "| 1 | 0.800 | 0.000 | 1.000 | 0.370 | 0.700 | 0.650 |" in markdown
    assert ("- final (round 1): AUROC 0.800; at threshold 0.5 sensitivity 0.000, specificity 1.000; "
            "at threshold 0.37 (Youden's J) sensitivity 0.700, specificity 0.650") in markdown
    assert load_report(tmp_path)["final"]["threshold"] == 0.37
    assert load_report(tmp_path)["warnings"] == [] and load_report(tmp_path)["learning"] == {}


def test_learning_flags_become_warnings_once_per_change(tmp_path: Path) -> None:
    report = RunReport(run_dir=tmp_path, run_id=6, config={}, transport="test")
    statuses = ["unclear", "not-learning", "not-learning", "learning", "below-chance"]
    for r, status in enumerate(statuses, start=1):
        report.record_learning(r, {"status": status, "round": r, "message": f"Round {r}: {status}"})
    data = load_report(tmp_path)
    assert data["warnings"] == [
        {"round": 2, "status": "not-learning", "message": "Round 2: not-learning"},
        {"round": 5, "status": "below-chance", "message": "Round 5: below-chance"},
    ]
    assert data["learning"]["status"] == "below-chance"
    head = (tmp_path / "report.md").read_text().split("## Pooled")[0]
    assert "> **Warning:** Round 2: not-learning" in head and "> **Warning:** Round 5: below-chance" in head
    assert "Since then" not in head  # still flagged
    resumed = RunReport.load(tmp_path, keep_rounds=3)  # rounds 4-5 are redone: their verdicts go with them
    assert [w["round"] for w in resumed.to_json()["warnings"]] == [2]


def test_kind_simulation(tmp_path: Path) -> None:
    three_round_report(tmp_path, kind="simulation").finish("completed")
    assert load_report(tmp_path)["kind"] == "simulation"
    assert "- kind: simulation" in (tmp_path / "report.md").read_text()


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("no fonts today")


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (report_module, "write_plots"),  # the whole writer
        (plots, "_draw_epsilon"),  # the second figure, after the first was rendered
        (plots, "_png"),  # the PNG encoder
    ],
)
def test_plot_failure_leaves_a_valid_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, target: Any, name: str
) -> None:
    monkeypatch.setattr(target, name, _raise)
    monkeypatch.setattr(logging.getLogger("server"), "propagate", True)  # in case Flower's handlers took it
    report = three_round_report(tmp_path)
    with caplog.at_level(logging.WARNING, logger="server"):
        report.finish("stopped: every site's privacy budget is spent")
    data = load_report(tmp_path)
    assert data["status"] == "stopped: every site's privacy budget is spent" and data["plots"] == []
    assert data["finished"] is not None
    markdown = (tmp_path / "report.md").read_text()
    assert "stopped: every site's privacy budget is spent" in markdown and ".png" not in markdown
    assert leftovers(tmp_path) == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no fonts today" in warnings[0].getMessage()


def test_write_failure_part_way_leaves_no_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full on the second PNG: the first is removed again, nothing half-written stays."""
    real = plots.write_atomic
    calls = []

    def flaky(path: Path, data: bytes | str) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(plots, "write_atomic", flaky)
    report = three_round_report(tmp_path)
    report.finish("completed")
    assert calls == ["auroc.png", "epsilon.png"]
    assert load_report(tmp_path)["plots"] == [] and leftovers(tmp_path) == []


def test_write_plots_in_a_thread(tmp_path: Path) -> None:
    """The ServerApp of a simulation runs in a thread: no pyplot, no main-thread GUI."""
    data = three_round_report(tmp_path).to_json()
    result: list[Any] = []
    threads = [threading.Thread(target=lambda d=d: result.append(write_plots(d, data)))
               for d in (tmp_path / "t1", tmp_path / "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert result == [list(PLOT_FILES)] * 2
    for d in ("t1", "t2"):
        for name in PLOT_FILES:
            assert_valid_png(tmp_path / d / name)
