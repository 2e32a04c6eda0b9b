"""`tempflow report` on what a run leaves behind while it runs or after a crash (a metrics.jsonl whose last
line is incomplete, a record logged again after a resume, a damaged line), and its figures as the page shows
them: text no smaller than 12 px, legends beside the data, the gold reward's standard error as a band, and
series that coincide drawn once under a joint label."""

import json
import re
from pathlib import Path

import pytest

from tempflow import plots, report
from tempflow.cli import main


def _history(iteration: int) -> dict:
    return {"iteration": iteration, "reward/mean": 0.2 + 0.01 * iteration, "monitor/diversity": 0.15,
            "train/ratio_mean": 1.0, "train/clip_fraction": 0.0, "groups/zero_spread_fraction": 0.0}


def _evaluation(iteration: int) -> dict:
    strict = 0.5 - 0.02 * iteration  # the gold reward is also an evaluation reward: the same numbers twice
    return {"iteration": iteration, "eval/reward": 0.3, "eval/gold": strict, "eval/gold_se": 0.05,
            "eval/gold/shapes_strict": strict, "eval/shapes_strict": strict, "monitor/kl_to_reference": 1e-4,
            "eval_task/shapes_strict/counting": strict, "eval_task/shapes_strict/colors": 0.9}


def _write_lines(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def _records(iterations: int) -> list[dict]:
    records = []
    for i in range(iterations):
        if i % 3 == 0:
            records.append(_evaluation(i))
        records.append(_history(i))
    return records


def test_a_partial_last_line_is_left_out_and_the_page_says_so_once(tmp_path, capsys):
    cut = json.dumps(_history(6))[:40]  # the writer was stopped (or is still) in the middle of the line
    run = _write_lines(tmp_path / "run", _records(6), tail=cut)
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    loaded = report.load_run(run)
    assert [h["iteration"] for h in loaded["history"]] == [0, 1, 2, 3, 4, 5]
    assert [e["iteration"] for e in loaded["evaluations"]] == [0, 3]
    page = (run / "report" / "report.html").read_text()
    assert page.count("is incomplete") == 1 and "line 9" in page  # 6 + 2 records, then the cut line
    assert "running or crashed" in page and page.count("data:image/svg+xml;base64,") == 2


def test_a_complete_last_line_without_its_newline_is_read(tmp_path):
    records = _records(4)
    run = _write_lines(tmp_path / "run", records[:-1], tail=json.dumps(records[-1]))
    loaded = report.load_run(run)
    assert len(loaded["history"]) == 4 and not loaded["notes"]


@pytest.mark.parametrize("bad, why", [
    ('{"iteration": 2, "reward/me', "not valid JSON"),
    ("[1, 2]", "not a metrics record"),
    ('{"reward/mean": 0.3}', "not a metrics record"),
])
def test_a_bad_line_before_the_last_names_the_file_and_the_line(tmp_path, capsys, bad, why):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(_history(0)), json.dumps(_history(1)), bad, json.dumps(_history(3))]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run / 'metrics.jsonl'}, line 3: {why}" in err


def test_a_record_logged_again_after_a_resume_replaces_the_first(tmp_path):
    resumed = {**_history(1), "reward/mean": 0.9}  # iteration 1 ran again from the checkpoint after it
    run = _write_lines(tmp_path / "run", [_history(0), _history(1), _history(2), resumed, _history(2)])
    history = report.load_run(run)["history"]
    assert [h["iteration"] for h in history] == [0, 1, 2] and history[1]["reward/mean"] == 0.9


def test_a_damaged_summary_falls_back_to_the_lines(tmp_path):
    run = _write_lines(tmp_path / "run", _records(3))
    (run / "metrics.json").write_text('{"iterations": 3, "hist')
    loaded = report.load_run(run)
    assert len(loaded["history"]) == 3 and "metrics.json is not valid JSON" in loaded["notes"][0]
    (run / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON"):
        report.load_run(run)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report draws, kept open (instead of written and closed) to be inspected."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, paths: figures.append(fig))
    monkeypatch.setattr(report, "save_figure", lambda fig, paths: figures.append(fig))
    yield figures
    for fig in figures:
        plots.plt.close(fig)


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text().replace("\n", " ") for t in legend.get_texts()]


def test_legends_sit_beside_the_data_and_gold_has_its_band(tmp_path, drawn):
    run = {"history": [_history(i) for i in range(12)], "guards": [{"guard": "gold_drop", "iteration": 8}],
           "evaluations": [_evaluation(i) for i in (0, 4, 8, 12)]}
    plots.plot_reward_curve(run["history"], tmp_path / "unused.svg", run["evaluations"],
                            guard_iterations=[8])
    report.plot_monitors(run, tmp_path / "unused.svg")
    assert len(drawn) == 2
    for fig in drawn:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:  # entirely to the right of the plotting area
                assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
            assert "gold_se" not in " ".join(_legend_labels(ax))
    held_out = drawn[0].axes[0]
    labels = _legend_labels(held_out)
    assert "gold = gold/shapes_strict = shapes_strict" in labels  # one curve, not three on one another
    assert "gold: ± 2 standard errors" in labels and "guard fired" in labels
    band = held_out.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.5 - 0.02 * 12 - 0.1) and band.max() == pytest.approx(0.5 + 0.1)
    proxy = drawn[1].axes[0]
    assert "gold reward, held-out: ± 2 standard errors" in _legend_labels(proxy)


def test_coinciding_series_are_merged_and_the_rest_keep_apart():
    series = {"a": ([0, 1], [0.5, 0.25]), "b": ([0, 1], [0.5, 0.25 + 1e-9]), "c": ([0, 1], [0.5, 0.3]),
              "d": ([], [])}
    assert [label for label, _, _ in plots.coinciding_series(series)] == ["a = b", "c"]


def test_the_page_shows_every_text_at_12_px_or_more(tmp_path):
    """SVG figures at their own size (1 pt = 4/3 CSS px), sample grids at their pixels over their DPI, none
    wider than the page; the smallest font of a figure times its scale on the page is at least 12 px."""
    import torch

    run = _write_lines(tmp_path / "run", _records(10))
    (run / "samples").mkdir()
    images = torch.rand(8, 3, 64, 64)
    captions = [f"a photo of {n} cyan triangles and a red circle" for n in range(8)]
    plots.save_before_after_grid(images, images.flip(0), captions, run / "samples" / "before_after.png")
    page = report.write_report(run).read_text()
    max_width = int(re.search(r"max-width:(\d+)px", page)[1])
    for svg_name in ("reward_curve.svg", "monitors.svg"):
        svg = (run / "report" / svg_name).read_text()
        width_pt = float(re.search(r'<svg[^>]* width="([\d.]+)pt"', svg)[1])
        assert width_pt * 4 / 3 <= max_width
        sizes = [float(s) for s in re.findall(r"font-size: ([\d.]+)px", svg)]  # user units: pt
        assert sizes and min(sizes) * 4 / 3 >= 12
    widths = [int(w) for w in re.findall(r'<img src="data:image/png;base64,[^"]+" width="(\d+)"', page)]
    assert len(widths) == 1 and widths[0] <= max_width
    from PIL import Image

    with Image.open(run / "samples" / "before_after.png") as grid:
        dpi = grid.info["dpi"][0]
        assert widths[0] == round(grid.width / dpi * 96) and dpi >= 2 * 96  # sharp on high-density screens
    assert plots.SMALLEST_FONT_PT * 4 / 3 >= 12  # the grid's captions: drawn at that size, shown at 96 px/in
    assert int(re.search(r"figcaption\{font-size:(\d+)px", page)[1]) >= 12
