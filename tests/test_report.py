"""cnnkit report and cnnkit explain: every figure for every kind of run, report.json equal to
`cnnkit evaluate --json`, a page that needs no network, and one-line errors."""

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from cnnkit import plots
from cnnkit.checkpoint import list_checkpoints
from cnnkit.cli import main
from cnnkit.viz.report import default_report_folder, write_report

FIGURE_SIZES = {
    "learning_curves.png": plots.SIZES["history"],
    "confusion_matrix.png": plots.SIZES["confusion_matrix"],
    "per_class_accuracy.png": plots.SIZES["per_class_accuracy"],
    "projection.png": plots.SIZES["projection"],
    "network.png": plots.SIZES["network"],
}
GRIDS = {"mistakes.png", "filters.png", "feature_maps_1.png", "feature_maps_2.png", "feature_maps_3.png"}
EVALUATE_KEYS = {
    "checkpoint",
    "epoch",
    "dataset",
    "split",
    "precision",
    "device",
    "accuracy",
    "loss",
    "n",
    "per_class",
    "confusion_matrix",
}


@pytest.fixture(scope="module", params=["tiny_run", "rgb_folder_run", "three_class_run"])
def report(request, tmp_path_factory):
    """(run folder, report folder, report.json) for a digits run, an RGB folder run (4 classes) and a
    3-class run trained without validation."""
    run = request.getfixturevalue(request.param)
    folder = write_report(run, tmp_path_factory.mktemp("report") / "out", precision="fp32")
    return run, folder, json.loads((folder / "report.json").read_text())


def test_every_figure_is_a_png_of_its_stated_size(report):
    _, folder, numbers = report
    files = {figure["file"] for figure in numbers["figures"]}
    feature_maps = {f"feature_maps_{i}.png" for i in range(1, min(3, len(numbers["class_names"])) + 1)}
    assert files == set(FIGURE_SIZES) | {"mistakes.png", "filters.png"} | feature_maps
    for figure in numbers["figures"]:
        with Image.open(folder / figure["file"]) as image:
            assert image.format == "PNG"
            assert image.size == (figure["width"], figure["height"])
        if figure["file"] in FIGURE_SIZES:
            assert image.size == FIGURE_SIZES[figure["file"]]
        else:
            assert figure["file"] in GRIDS and image.width == plots.GRID_WIDTH
        assert figure["title"] and len(figure["caption"]) > 40  # each figure says what it shows


def test_report_json_holds_the_numbers_behind_the_figures(report):
    run, _, numbers = report
    k = len(numbers["class_names"])
    confusion = numbers["confusion_matrix"]
    assert len(confusion) == k and sum(map(sum, confusion)) == numbers["n"]
    assert numbers["epoch"] == len(numbers["history"]) and numbers["dataset"].split(":")[0] in (
        "npz",
        "folder",
    )
    assert numbers["checkpoint"] == str(list_checkpoints(run)[-1])
    confidences = [m["confidence"] for m in numbers["mistakes"]]
    assert confidences == sorted(confidences, reverse=True) and len(confidences) <= 16
    assert all(m["true"] != m["predicted"] for m in numbers["mistakes"])
    for m in numbers["mistakes"]:  # what the mistakes grid writes under each image
        assert m["runner_up"] != m["predicted"] and m["runner_up"] in numbers["class_names"]
        assert m["true_probability"] <= m["runner_up_probability"] <= m["confidence"]
    wrong = numbers["n"] - sum(confusion[i][i] for i in range(k))
    assert len(numbers["mistakes"]) == min(16, wrong)
    projection = numbers["projection"]
    assert len(projection["points"]) == len(projection["indices"]) == min(2000, numbers["n"])
    assert 0 <= projection["explained_variance"][1] <= projection["explained_variance"][0] <= 1
    assert sum(layer["parameters"] for layer in numbers["layers"]) == numbers["parameters"]
    shown = [entry["true"] for entry in numbers["feature_map_images"]]
    assert len(set(shown)) == len(shown) == min(3, k)  # one image of each of the first classes met
    trained_without_validation = run.name == "three"
    assert (numbers["best_epoch"] is None) == trained_without_validation
    assert all((h["valid_loss"] is None) == trained_without_validation for h in numbers["history"])


def test_page_opens_from_disk_with_no_network(report):
    _, folder, numbers = report
    # the one address named: the links that open a mistake in `cnnkit serve`'s page (nothing is fetched)
    page = re.sub(
        r'href="http://127\.0\.0\.1:8000/\?test=\d+&amp;epoch=\d+"', "", (folder / "index.html").read_text()
    )
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!--", "")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert set(linked) == {f["file"] for f in numbers["figures"]} | {"report.json"}
    assert all((folder / name).is_file() for name in linked)
    assert f"{100 * numbers['accuracy']:.2f}%" in page and "<table>" in page


def test_page_links_every_figure_full_size_and_states_its_wall_time(report):
    _, folder, numbers = report
    page = (folder / "index.html").read_text()
    for figure in numbers["figures"]:  # the picture itself and the caption open the PNG alone
        assert page.count(f'href="{figure["file"]}"') == 2
    assert "flex-wrap: wrap" in page and '<div class="table"><table>' in page  # nothing wider than a phone
    assert 0 < numbers["seconds"] < 600 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", numbers["made"])
    assert f"in {numbers['seconds']:.1f} s (wall time, from the start of the command to this page)" in page


def test_the_footer_time_counts_from_the_given_start(tiny_run, tmp_path):
    import time

    folder = write_report(tiny_run, tmp_path / "r", precision="fp32", started=time.time() - 100)
    assert 100 <= json.loads((folder / "report.json").read_text())["seconds"] < 700


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "options"),
    [("tiny_run", []), ("rgb_folder_run", ["--checkpoint", "best", "--split", "valid"])],
)
def test_report_json_agrees_with_evaluate_json(cli, request, tmp_path, run, options):
    run = request.getfixturevalue(run)
    made = cli("report", run, *options, "--out", tmp_path / "r")
    assert made.code == 0, made.err
    assert f"report: {tmp_path / 'r' / 'index.html'}" in made.out
    evaluated = cli("evaluate", run, *options, "--json")
    assert evaluated.code == 0, evaluated.err
    expected = json.loads(evaluated.out)
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(expected) == EVALUATE_KEYS
    assert {
        key: numbers[key] for key in EVALUATE_KEYS
    } == expected  # same model, split and precision: same numbers


def test_default_folder_is_the_runs_report_folder(tiny_run, tmp_path):
    newest = list_checkpoints(tiny_run)[-1]
    assert default_report_folder(tiny_run) == tiny_run / "report"
    assert default_report_folder(newest) == tiny_run / "report"
    assert default_report_folder(tmp_path / "model.safetensors") == tmp_path / "model-report"


def test_help_does_not_import_matplotlib():
    code = (
        "import sys\n"
        "from cnnkit.cli import main\n"
        "for argv in (['--help'], ['report', '--help'], ['explain', 'conv2d', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "report" in result.stdout and "explain" in result.stdout


# --- errors: one line, exit code 2 ---


def one_line_error(capsys, *argv) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cnnkit: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


def test_report_errors_are_one_line(capsys, tmp_path, tiny_run, three_class_run):
    assert "no such checkpoint" in one_line_error(capsys, "report", tmp_path / "missing")
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    assert "is a file, not a folder" in one_line_error(capsys, "report", tiny_run, "--out", a_file)
    assert "cannot create the report folder" in one_line_error(
        capsys, "report", tiny_run, "--out", a_file / "inside"
    )
    assert "no epoch is best" in one_line_error(capsys, "report", three_class_run, "--checkpoint", "best")
    assert "has no valid split" in one_line_error(capsys, "report", three_class_run, "--split", "valid")
    assert "argument --checkpoint" in one_line_error(capsys, "report", tiny_run, "--checkpoint", "soon")
    assert "missing.npz" in one_line_error(
        capsys, "report", tiny_run, "--dataset", f"npz:{tmp_path}/missing.npz"
    )


@pytest.mark.slow
def test_an_unwritable_out_is_one_line_from_a_real_process(cli, tmp_path, tiny_run):
    (tmp_path / "taken").write_text("")
    cli("report", tiny_run, "--out", tmp_path / "taken" / "report").assert_one_line_error(
        "taken", "cannot create the report folder"
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["conv2d", "--x", "1,2;3"], "argument --x"),
        (["conv2d", "--x", "1,nan"], "argument --x"),
        (["conv2d", "--padding", "-1"], "argument --padding"),
        (["conv2d", "--stride", "0"], "argument --stride"),
        (["conv1d", "--w", ",".join(["1"] * 41)], "argument --w"),
        (["conv1d", "--padding", "1,2"], "argument --padding"),
        (["pool", "--padding", "full"], "argument --padding"),
        (["conv2d", "--x", "1,2;3,4", "--w", "1,2,3;4,5,6;7,8,9", "--padding", "0"], "larger than x"),
        (["pool", "--x", "1,2;3,4", "--size", "3", "--padding", "valid"], "larger than x"),
        (["pool", "--out", "pool.jpg"], "ending in .png"),
        (["conv3d"], "invalid choice"),
    ],
)
def test_explain_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    assert fragment in one_line_error(capsys, "explain", *argv)
    assert not list(tmp_path.iterdir())  # nothing written


def test_explain_to_an_unwritable_file_is_one_line(capsys, tmp_path):
    (tmp_path / "taken").write_text("")
    assert "cannot write" in one_line_error(
        capsys, "explain", "pool", "--out", tmp_path / "taken" / "pool.png"
    )


def test_explain_writes_the_chapters_example_by_default_and_others_on_request(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "conv2d"]) == 0
    assert capsys.readouterr().out == "wrote conv2d.png\n"
    default = Image.open(tmp_path / "conv2d.png")
    assert default.format == "PNG"
    out = tmp_path / "strided.png"
    argv = ["explain", "conv2d", "--x", "1,2,3;4,5,6;7,8,9", "--w", "1,0;0,-1", "--stride", "2", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert Image.open(out).size != default.size


# --- the page in a real browser, on a desktop and on a phone ---


@pytest.mark.slow
def test_the_page_fits_a_phone_and_shows_figures_at_a_readable_size(report):
    """At 390 px nothing is wider than the screen (the numbers and the table wrap); each figure is shown at
    its own pixel size, its text as drawn, in a box that scrolls sideways. At 1280 px figures fit the page."""
    import os
    import shutil
    from pathlib import Path

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("CNNKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.skip(f"no chromium at {chromium}")
    _, folder, numbers = report
    measure = """() => ({
        page: document.documentElement.scrollWidth,
        numbers: document.querySelector('.numbers').getBoundingClientRect().right,
        table: document.querySelector('.table').scrollWidth,
        images: [...document.querySelectorAll('figure img')].map((i) => i.getBoundingClientRect().width),
        boxes: [...document.querySelectorAll('.picture')].map((b) => b.getBoundingClientRect().right),
        scrolling: [...document.querySelectorAll('.picture')].filter((b) => b.scrollWidth > b.clientWidth).length})"""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            seen = {}
            for width in (390, 1280):
                page = browser.new_page(viewport={"width": width, "height": 844})
                page.goto((folder / "index.html").as_uri())
                page.wait_for_load_state("load")
                seen[width] = page.evaluate(measure)
                page.close()
        finally:
            browser.close()
    widths = [figure["width"] for figure in numbers["figures"]]
    phone, desktop = seen[390], seen[1280]
    assert phone["page"] <= 390 and phone["numbers"] <= 390 and phone["table"] <= 390
    assert max(phone["boxes"]) <= 390 and phone["images"] == pytest.approx(widths, abs=3)
    assert desktop["page"] <= 1280 and max(desktop["images"]) <= 1260 and desktop["scrolling"] == 0


def test_each_mistake_links_to_the_page_at_the_reports_epoch(report):
    _, folder, numbers = report
    page = (folder / "index.html").read_text()
    for m in numbers["mistakes"]:  # the page's URL format: ?test=INDEX&epoch=N (docs/serve-page.md)
        assert f'href="http://127.0.0.1:8000/?test={m["index"]}&amp;epoch={numbers["epoch"]}"' in page
    assert ("cnnkit serve" in page) == bool(numbers["mistakes"])
