"""`vtcbench report --plots`: the Pareto front, the efficiency plots' PNGs, their place in the html
page, and retention pictures (PyramidDrop Fig. 5) from synthetic kept indices.

The run folders are synthetic (tests/test_report.py's writer): three runs of one model on two
tasks, one of which recorded the kept image tokens of its first document with its image.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import MODEL, report, write_run

from vtcbench.report import ReportOptions, build_report, render
from vtcbench.report.plots import (
    DPI,
    EFFICIENCY_WIDTH,
    efficiency_plots,
    pareto_front,
    retention_picture,
    write_figures,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = 8  # vtc-tiny's 8x8 image tokens


def _kept_record(root: Path, folder: str, kept: dict[str, list[int]], *, image: bool = True) -> None:
    """Give the run's first record the fields `vtcbench run --keep-indices` writes."""
    path = root / folder
    lines = (path / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    relative = f"retention/{first['task']}__{first['doc_id']}.png"
    first |= {"kept_image_tokens": kept, "image_grid": [GRID, GRID], "retention_image": relative}
    lines[0] = json.dumps(first)
    (path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    if image:
        (path / "retention").mkdir()
        Image.new("RGB", (140, 112), (220, 30, 30)).save(path / relative)  # wider than tall: center-cropped


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plot-results")
    tasks = ("vtcshapes", "gqa")
    write_run(root, f"{MODEL}__vanilla__0000000000", "vanilla", {}, "vanilla", tasks=tasks, prefill=120.0)
    write_run(root, f"{MODEL}__fastv__1111111111", "fastv", {"layer": 2, "drop_ratio": 0.5}, "fastv", tasks=tasks,
              tokens=[576.0, 576.0, 288.0, 288.0], tflops=2.01, prefill=80.0)
    write_run(root, f"{MODEL}__pdrop__2222222222", "pdrop", {"layers": [1, 2, 3], "keep_ratio": 0.5}, "pdrop-0.5",
              tasks=tasks, tokens=[576.0, 288.0, 144.0, 72.0], tflops=0.1, prefill=75.0)
    all_tokens = list(range(GRID * GRID))
    _kept_record(root, f"{MODEL}__pdrop__2222222222", {"0": all_tokens, "1": all_tokens[::2], "3": all_tokens[::8]})
    return root


# -- the Pareto front ---------------------------------------------------------------------------------


def test_pareto_front_on_a_worked_example():
    points = [
        (1.0, 50.0),  # 0: cheapest: on the front
        (2.0, 70.0),  # 1: on the front
        (2.0, 60.0),  # 2: same cost as 1, lower metric: dominated
        (3.0, 70.0),  # 3: same metric as 1, dearer: dominated
        (4.0, 90.0),  # 4: on the front
        (4.0, 90.0),  # 5: equal to 4: neither dominates the other, both on the front
        (5.0, 80.0),  # 6: dearer and worse than 4: dominated
        (float("nan"), 99.0),  # 7: no cost: never on the front
        (0.5, 40.0),  # 8: cheapest of all: on the front
    ]
    assert pareto_front(points) == [8, 0, 1, 4, 5]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(3.0, 1.0), (1.0, 3.0)]) == [1]  # cheaper and better


# -- efficiency plots ---------------------------------------------------------------------------------


def test_plots_are_written_as_pngs_of_paper_size(results, tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    folder = tmp_path / "plots"
    outcome = report(results, "--plots-dir", str(folder))
    assert outcome.exit_code == 0, outcome.output
    assert plt.get_fignums() == open_before  # no pyplot figure left behind
    written = sorted(p.name for p in folder.iterdir())
    assert written == sorted([f"efficiency__{MODEL}__gqa.png", f"efficiency__{MODEL}__vtcshapes.png",
                              f"retention__{MODEL}__pdrop__2222222222__vtcshapes__0.png"])  # no temporary files left
    for name in written:
        assert f"wrote {folder / name}" in outcome.stderr
    for name in written:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        with Image.open(folder / name) as image:
            width, height = image.size
            assert image.info.get("dpi", (DPI, DPI))[0] == pytest.approx(DPI, abs=1)
        if name.startswith("efficiency"):
            assert width == round(EFFICIENCY_WIDTH * DPI) == 1300
            assert 2.5 * DPI <= height <= 4.5 * DPI
        else:  # three panels of 1.7 inches, a title line
            assert (width, height) == (round((3 * 1.7 + 0.2) * DPI), round((1.7 + 0.24 + 0.2 + 0.08) * DPI))


def test_plots_go_to_report_plots_under_results_by_default(results, tmp_path):
    copy = tmp_path / "results"
    for run in results.iterdir():
        if run.is_dir() and run.name != "report-plots":
            (copy / run.name).mkdir(parents=True)
            for path in run.rglob("*"):
                target = copy / run.name / path.relative_to(run)
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    target.write_bytes(path.read_bytes())
    plain = report(copy)
    outcome = report(copy, "--plots")
    assert outcome.exit_code == 0, outcome.output
    assert len(list((copy / "report-plots").glob("*.png"))) == 3
    assert outcome.stdout == plain.stdout  # the tables do not change


def test_efficiency_plot_figures_carry_their_panels_and_words(results):
    options = ReportOptions(results=results)
    figures = efficiency_plots(options)
    assert [f.name for f in figures] == [f"efficiency__{MODEL}__vtcshapes.png", f"efficiency__{MODEL}__gqa.png"]
    for figure in figures:
        assert figure.panels == tuple(f"{figure.name.split('__')[2][:-4]} vs. {x}" for x in ("compute", "prefill time"))
        assert "TFLOPs" in figure.caption and "ms" in figure.caption and "Pareto" in figure.caption
        assert "fastv" in figure.alt and "pdrop" in figure.alt and "vanilla" in figure.alt
        with Image.open(io.BytesIO(figure.png)) as image:
            assert image.size == (figure.width, figure.height)


def _plotted(results: Path, **options) -> dict[str, str]:
    """{task: the metric its efficiency plot draws}, read from the captions."""
    figures = efficiency_plots(ReportOptions(results=results, **options))
    return {m.group(1): m.group(2) for f in figures if (m := re.match(rf"(\w+) \({MODEL}\): (\w+)", f.caption))}


def test_the_efficiency_plot_draws_the_headline_metric_not_the_first_column(results):
    assert _plotted(results) == {"vtcshapes": "overall", "gqa": "exact_match"}
    # --metrics lists color first; the plot still draws overall; gqa shows none of them: its primary metric
    assert _plotted(results, metrics=("color", "count", "overall")) == {"vtcshapes": "overall", "gqa": "exact_match"}
    # without overall among the columns (and the primary metric, overall, not shown): the first column
    assert _plotted(results, metrics=("count", "color")) == {"vtcshapes": "count", "gqa": "exact_match"}
    # --plot-metric picks a shown metric; a task without it keeps its default
    chosen = _plotted(results, metrics=("color", "count", "overall"), plot_metric="count")
    assert chosen == {"vtcshapes": "count", "gqa": "exact_match"}
    assert _plotted(results, plot_metric="exact_match") == {"vtcshapes": "overall", "gqa": "exact_match"}


def test_an_unknown_plot_metric_is_one_line_with_the_choices(results, tmp_path):
    folder = tmp_path / "plots"
    outcome = report(results, "--metrics", "color,overall", "--plot-metric", "colour", "--plots-dir", str(folder))
    assert outcome.exit_code == 2, outcome.output
    message = outcome.output.strip()
    assert "\n" not in message
    assert "'colour'" in message and "valid choices: color, exact_match, overall" in message
    assert not folder.exists()  # refused before anything is written
    # --plot-metric implies --plots (written to <results>/report-plots)
    copy = tmp_path / "results"
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("report-plots"))
    outcome = report(copy, "--plot-metric", "overall")
    assert outcome.exit_code == 0, outcome.output
    assert len(list((copy / "report-plots").glob("efficiency__*.png"))) == 2


def test_html_embeds_one_data_png_per_figure_and_nothing_external(results, tmp_path):
    outcome = report(results, "--format", "html", "--plots-dir", str(tmp_path / "plots"))
    assert outcome.exit_code == 0, outcome.output
    page = outcome.stdout
    written = sorted((tmp_path / "plots").glob("*.png"))
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == len(written) == 3
    sources = [re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag) for tag in images]
    assert all(sources)
    assert sorted(base64.b64decode(s.group(1), validate=True) for s in sources) == sorted(p.read_bytes() for p in written)
    assert all(re.search(r'alt="[^"]{20,}"', tag) for tag in images)
    assert page.count("<figcaption>") == 3
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|//[a-z0-9]|url\(", text, re.IGNORECASE)  # no external URL
    assert re.findall(r'(?:src|href)="([^"]{0,22})', page) == ["data:image/png;base64,"] * 3
    # the same figures through the API
    built = build_report(ReportOptions(results=results, plots=True))
    assert render(built, "html").count('<img src="data:image/png;base64,') == len(built.figures) == 3
    assert "<img" not in render(build_report(ReportOptions(results=results)), "html")


def test_write_figures_replaces_atomically(results, tmp_path):
    figures = build_report(ReportOptions(results=results, plots=True)).figures
    first = write_figures(figures, tmp_path)
    second = write_figures(figures, tmp_path)
    assert first == second and sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in figures)


# -- retention pictures -------------------------------------------------------------------------------


def _red_pixels(png: bytes) -> int:
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)).sum())


def test_retention_picture_has_a_panel_per_distinct_kept_set():
    image = Image.new("RGB", (112, 112), (220, 30, 30))  # 8x8 patches of 14 pixels
    every = list(range(GRID * GRID))
    kept = {"0": every, "2": every[::2], "3": every[::2], "4": every[:8]}  # layer 3 keeps what layer 2 did
    figure = retention_picture(image, kept, (GRID, GRID), name="r.png")
    assert figure.panels == ("layer 0: 64 tokens", "layer 2: 32 tokens", "layer 4: 8 tokens")
    assert figure.width == round((3 * 1.7 + 0.2) * DPI)
    # the dropped patches are greyed out: the red area in proportion to the kept tokens, against
    # three panels of the same size that keep 64 + 63 + 62 tokens
    nearly = retention_picture(image, {"0": every, "1": every[:-1], "2": every[:-2]}, (GRID, GRID))
    assert nearly.panels == ("layer 0: 64 tokens", "layer 1: 63 tokens", "layer 2: 62 tokens")
    assert _red_pixels(figure.png) / _red_pixels(nearly.png) == pytest.approx((64 + 32 + 8) / (64 + 63 + 62), rel=0.04)


def test_retention_picture_of_a_pre_llm_pooling_and_of_bad_indices():
    anchors = {"0": list(range(0, 64, 4))}  # pooled before the LLM: no full set
    assert retention_picture(None, anchors, [8, 8]).panels == ("layer 0: 16 tokens",)
    with pytest.raises(ValueError, match="outside"):
        retention_picture(None, {"0": [0, 64]}, (8, 8))
    with pytest.raises(ValueError):
        retention_picture(None, {}, (8, 8))


def test_a_missing_retention_image_is_noted_and_drawn_plain(results, tmp_path):
    root = tmp_path / "results"
    write_run(root, f"{MODEL}__fastv__1111111111", "fastv", {"layer": 2}, "fastv", tasks=("vtcshapes",))
    _kept_record(root, f"{MODEL}__fastv__1111111111", {"0": list(range(64)), "2": list(range(32))}, image=False)
    built = build_report(ReportOptions(results=root, plots=True))
    retention = [f for f in built.figures if f.name.startswith("retention")]
    assert len(retention) == 1 and retention[0].panels == ("layer 0: 64 tokens", "layer 2: 32 tokens")
    assert any("not found" in note for note in built.figure_notes)
