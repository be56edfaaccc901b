"""``kdbench report RUN --format html``: one self-contained page, checked in a real browser.

Runs are fabricated as stores on disk (the rows of tests/test_tables.py, no training) and the
page is made by the command line. Headless Chromium (the system executable, driven by
Playwright) loads it from disk with every request other than ``file:`` and ``data:`` aborted
and recorded, and the page is checked: no console errors, no failed requests, the leaderboard
cells equal ``--format json``'s numbers, sorting by a header reorders rows, each section of a
groups and a corruptions run is there, the page reads with JavaScript off, follows the dark
scheme, hides its navigation in print, and a screenshot is not blank.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from kdbench.reports import RunData
from kdbench.store import Store, read_epoch_rows
from tests.conftest import kdbench_main
from tests.test_tables import corruptions_run, groups_run, leaderboard_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The browser the tests drive: $KDBENCH_CHROMIUM, else a Chromium on PATH."""
    env = os.environ.get("KDBENCH_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


# ---------------------------------------------------------------- fabricated runs on disk


def write_store(run: RunData) -> Path:
    """``run``'s rows as a real run directory (results.sqlite, the grid and its cells)."""
    import yaml

    grid = yaml.safe_dump({"name": run.run_dir.name, **run.grid}, allow_unicode=True, sort_keys=False)
    store = Store(run.run_dir / "results.sqlite")
    try:
        for row in run.cells:
            cell = {**row["config"], "id": row["id"]}
            epochs = read_epoch_rows(run.run_dir / "cells" / row["id"] / "metrics.jsonl")
            result = {k: row.get(k) for k in ("status", "metrics", "env", "error", "wall_s")}
            store.record({**result, "cell": cell, "attempt": row.get("attempts", 1)}, epochs or None)
        for tid, t in run.teachers.items():
            store.record_teacher({"id": tid, "label": "T"}, t["metrics"], {}, t.get("wall_s", 5.0))
        store.record_grid(grid, [c["id"] for c in run.cells])
    finally:
        store.close()
    return run.run_dir


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A plain RGB PNG (stdlib only): the pictures `kdbench cka` and ConfiG leave in a run."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def add_pictures(run_dir: Path, cell_id: str) -> None:
    """A CKA heatmap in analysis/ and a ConfiG round grid with its metrics row in a cell."""
    (run_dir / "analysis").mkdir(exist_ok=True)
    (run_dir / "analysis" / "cka_pair0.png").write_bytes(png_bytes(40, 30, (200, 60, 40)))
    cdir = run_dir / "cells" / cell_id
    (cdir / "config").mkdir(parents=True, exist_ok=True)
    (cdir / "config" / "round_001.png").write_bytes(png_bytes(64, 20, (20, 90, 200)))
    row = {"stage": "config", "epoch": 1, "round": 1, "config/n": 8.0}
    row.update(
        {"config/t_source": 0.41, "config/t_after": 0.93, "config/f_source": 0.2, "config/f_after": 0.5}
    )
    with open(cdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


kdbench = kdbench_main


def make_page(capsys, run_dir: Path, *options: str) -> Path:
    code, text = kdbench(capsys, "report", str(run_dir), "--format", "html", *options)
    assert code == 0, text
    return run_dir / "report.html"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three run directories: a leaderboard (failed and pending cells, per-epoch rows, papers,
    pictures), a groups run and a corruptions run."""
    out = {}
    for name, build in (
        ("leaderboard", leaderboard_run),
        ("groups", groups_run),
        ("corruptions", corruptions_run),
    ):
        d = tmp_path_factory.mktemp(name)
        out[name] = write_store(build(d))
    add_pictures(out["leaderboard"], "c4")
    return out


# ---------------------------------------------------------------- without a browser


def test_cli_writes_run_report_html_by_default_and_names_it(capsys, runs):
    run_dir = runs["groups"]
    code, text = kdbench(capsys, "report", str(run_dir), "--format", "html")
    assert code == 0, text
    page = run_dir / "report.html"
    assert f"wrote {page}" in text and "<table" not in text  # the page is written, its path printed
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    target = run_dir / "elsewhere.html"
    code, text = kdbench(capsys, "report", str(run_dir), "--format", "html", "-o", str(target))
    assert code == 0 and target.read_text() == page.read_text()


def test_page_references_nothing_outside_itself(capsys, runs):
    text = make_page(capsys, runs["leaderboard"], "--baseline", "ce").read_text()

    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if r[:5] != "data:"]
    assert "<link" not in text and "@import" not in text
    assert set(re.findall(r"url\((.)", text)) == {"#"}  # only an SVG's own clip paths
    assert "default-src 'none'" in text  # and the page forbids the browser any other source


def test_other_kinds_render_as_a_page_of_their_tables(capsys, runs):
    code, text = kdbench(
        capsys, "report", str(runs["corruptions"]), "--kind", "corruptions", "--format", "html"
    )
    assert code == 0, text
    page = (runs["corruptions"] / "report.html").read_text()
    assert "mCE (ce=100)" in page and page.count("<table") == 1 and 'id="leaderboard"' not in page


def test_without_matplotlib_the_page_keeps_its_tables_and_says_why_a_chart_is_missing(runs, monkeypatch):
    from kdbench.reports import ReportArgs, html
    from kdbench.reports import html_charts as charts

    monkeypatch.setattr(charts, "available", lambda: False)
    text = html.page(corruptions_run(runs["corruptions"]), ReportArgs(fmt="html"))
    assert "<svg" not in text
    assert "chart not drawn (needs matplotlib: pip install &quot;kdbench[plot]&quot;)" in text
    assert text.count("<table") == 4  # leaderboard, every metric, per corruption, per severity


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip(
            "no Chromium found (apt-get install -y chromium, or set KDBENCH_CHROMIUM to a Chromium binary)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the browser tests drive Chromium with Playwright: pip install 'kdbench[browser]'",
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        yield b
        b.close()


class Visit:
    """A page loaded from disk with the network off: what it requested, logged and failed."""

    def __init__(self, browser, path: Path, **context):
        self.context = browser.new_context(offline=True, **context)
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def _route(self, route) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def assert_clean(self) -> None:
        assert self.blocked == [] and self.failed == [] and self.errors == []
        assert all(u.startswith(("file:", "data:")) for u in self.requests), self.requests

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser):
    opened: list[Visit] = []

    def open_(path: Path, **context) -> Visit:
        opened.append(Visit(browser, path, **context))
        return opened[-1]

    yield open_
    for v in opened:
        v.close()


def table_cells(page, selector: str) -> dict:
    """Headers and rows (text and data-value of each cell) of a table, as the browser shows it."""
    return page.eval_on_selector(
        selector,
        """t => ({
            head: Array.from(t.tHead.rows[0].cells, c => c.textContent),
            rows: Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => ({
                text: c.textContent, value: c.getAttribute('data-value'), bold: !!c.querySelector('strong')
            })))
        })""",
    )


def _stat_text(m: dict) -> str:
    text = f"{m['mean']:.2f}"
    if m["spread"] is not None and not math.isnan(m["spread"]):
        text += f" ± {m['spread']:.2f}"
    return text + f" ({m['n']})"


def test_leaderboard_cells_equal_the_json_report(capsys, runs, visit):
    run_dir = runs["leaderboard"]
    code, text = kdbench(capsys, "report", str(run_dir), "--format", "json", "--baseline", "ce")
    assert code == 0, text
    records = json.loads(text[text.index("[") :])
    v = visit(make_page(capsys, run_dir, "--baseline", "ce"))
    v.assert_clean()
    t = table_cells(v.page, "#leaderboard-table")
    head = t["head"]
    rows = {r[0]["text"].removesuffix(" (baseline)"): r for r in t["rows"]}
    checked = 0
    for rec in records:
        cell = rows[rec["method"]][head.index(rec["column"])]
        if rec["status"] != "done":
            assert cell["text"] == ("failed" if rec["status"] == "failed" else "not run yet")
            continue
        m = rec["metrics"]["top1"]
        assert float(cell["value"]) == m["mean"]  # the exact number, for sorting
        assert cell["text"].startswith(_stat_text(m)), (cell, m)
        assert cell["bold"] == rec["best"]
        if rec["significance"] and rec["significance"].get("undefined"):
            assert cell["text"].endswith("†")
        if rec["paper"]:  # the column after it: the published number and ours − paper
            paper = rows[rec["method"]][head.index(rec["column"]) + 1]["text"]
            diff = f"{rec['paper']['diff']:+.2f}".replace("-", "−")
            assert paper.startswith(f"{rec['paper']['value']:.2f} [") and paper.endswith(f"({diff})")
            checked += 1
        checked += 1
    assert checked == 8 + 3  # teacher, ce, kd, dkd in two columns; three published numbers


def test_clicking_a_header_sorts_the_rows(capsys, runs, visit):
    v = visit(make_page(capsys, runs["leaderboard"]))
    header = v.page.locator("#leaderboard-table thead th").nth(3)  # digits: T→S
    assert "digits" in header.inner_text()

    def order() -> list[str]:
        return [r[0]["text"] for r in table_cells(v.page, "#leaderboard-table")["rows"]]

    assert order() == ["teacher", "ce", "kd", "dkd", "fit_net"]
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert order() == ["ce", "dkd", "kd", "teacher", "fit_net"]  # numbers up, "failed" last
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    assert order() == ["teacher", "kd", "dkd", "ce", "fit_net"]
    first = v.page.locator("#leaderboard-table thead th").first
    first.click()
    assert order() == ["ce", "dkd", "fit_net", "kd", "teacher"]  # text columns sort as text
    v.assert_clean()


def _sections(page) -> list[str]:
    return page.eval_on_selector_all("section", "ss => ss.map(s => s.id)")


def test_groups_run_page_has_its_sections(capsys, runs, visit):
    v = visit(make_page(capsys, runs["groups"]))
    v.assert_clean()
    assert _sections(v.page) == ["leaderboard", "groups", "shift"]
    groups = v.page.locator("#groups")
    assert "per-group accuracy" in groups.inner_text()
    assert groups.locator("figure.chart svg").count() == 1  # worst-group vs average
    labels = groups.locator("figure.chart svg text").all_text_contents()
    ticks = [s for s in labels if s in ("teacher", "ce", "kd", "kd+dfr")]
    assert ticks == ["teacher", "ce", "kd", "kd+dfr"]  # the teacher first
    assert "error decomposition" in v.page.locator("#shift").inner_text()


def test_corruptions_run_page_has_its_sections(capsys, runs, visit):
    v = visit(make_page(capsys, runs["corruptions"]))
    v.assert_clean()
    assert _sections(v.page) == ["leaderboard", "corruptions"]
    section = v.page.locator("#corruptions")
    text = section.inner_text()
    assert "mCE (ce=100)" in text and "rel. mCE" in text and "per severity" in text
    severity = table_cells(v.page, "#corruptions table >> nth=1")
    assert severity["head"] == ["method", "clean ↑", "severity 1 ↑", "severity 3 ↑"]
    assert [r[0]["text"] for r in severity["rows"]] == ["teacher", "ce", "kd"]
    assert section.locator("figure.chart svg").count() == 1  # the line chart


def test_leaderboard_run_page_shows_curves_pictures_and_unfinished_cells(capsys, runs, visit):
    v = visit(make_page(capsys, runs["leaderboard"]))
    v.assert_clean()
    assert _sections(v.page) == ["leaderboard", "curves", "cka", "config", "unfinished"]
    assert v.page.locator("#curves figure.chart svg").count() == 2  # one per column
    sizes = v.page.eval_on_selector_all("img", "ims => ims.map(i => [i.complete, i.naturalWidth])")
    assert sizes == [[True, 40], [True, 64]]  # the pictures decode from their data: URIs
    caption = v.page.locator("#config figcaption").inner_text()
    assert "round 1" in caption and "t 0.41 → 0.93" in caption and "f 0.20 → 0.50" in caption
    unfinished = v.page.locator("#unfinished").inner_text()
    assert "CUDA out of memory" in unfinished and "pending" in unfinished
    facts = v.page.locator("dl.facts").inner_text()
    assert "1 failed" in facts and "1 pending" in facts and "cell time" in facts


def test_page_reads_without_javascript(capsys, runs, visit):
    v = visit(make_page(capsys, runs["leaderboard"]), java_script_enabled=False)
    t = table_cells(v.page, "#leaderboard-table")
    assert len(t["rows"]) == 5 and t["rows"][2][1]["text"].startswith("84.90 ± 0.36 (3)")
    assert v.page.locator("th.sort").count() == 0  # no sort affordance without the script


def _luminance(css: str) -> float:
    r, g, b = (int(x) for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_colour_scheme_follows_the_system_and_print_drops_navigation(capsys, runs, visit):
    path = make_page(capsys, runs["groups"])
    bg = "getComputedStyle(document.body).backgroundColor"
    light, dark = visit(path, color_scheme="light"), visit(path, color_scheme="dark")
    assert _luminance(light.page.evaluate(bg)) > 0.9 and _luminance(dark.page.evaluate(bg)) < 0.2
    nav = "getComputedStyle(document.querySelector('nav')).display"
    assert dark.page.evaluate(nav) != "none"
    dark.page.emulate_media(media="print")
    assert dark.page.evaluate(nav) == "none" and _luminance(dark.page.evaluate(bg)) > 0.9


def test_screenshot_is_not_blank(capsys, runs, visit):
    from PIL import Image, ImageStat

    v = visit(make_page(capsys, runs["corruptions"]), viewport={"width": 1000, "height": 800})
    shot = Image.open(io.BytesIO(v.page.screenshot(full_page=True))).convert("L")
    assert shot.height > 800  # the page is longer than a screen
    assert ImageStat.Stat(shot).var[0] > 100  # text, tables and a chart, not one flat colour


# ---------------------------------------------------------------- real runs, shrunk

#: the three example grids, shrunk to a minute of CPU: (grid, --set overrides, expected sections)
SHRUNK = {
    "quickstart": (
        "examples/quickstart.yaml",
        ["datasets=[{mnist5k: {limit: 600}}]", "methods=[ce, kd]", "seeds=[0]"],
        ["leaderboard", "curves"],
    ),
    "groups": (
        "examples/groups.yaml",
        [
            "datasets.0.spurious.base={mnist5k: {limit: 600}}",
            "pairs.0.teacher_dataset.spurious.base={mnist5k: {limit: 600}}",
            "methods=[ce, kd]",
            "seeds=[0]",
            "eval.dfr=false",
        ],
        ["leaderboard", "groups", "shift"],
    ),
    "corruptions": (
        "examples/corruptions.yaml",
        [
            "datasets=[{mnist5k: {limit: 600}}]",
            "methods=[ce, kd]",
            "seeds=[0]",
            "eval.corruptions=[gaussian_noise, fog]",
            "eval.severities=[1, 3]",
            "teacher_train.swa=null",
        ],
        ["leaderboard", "corruptions"],
    ),
}


@pytest.mark.slow
def test_real_shrunk_example_runs_pass_the_browser_checks(capsys, tmp_path, visit):
    """The example grids (shrunk with --set) run for real, and each report page is clean,
    offline, has its sections, and shows the leaderboard numbers of --format json."""
    from tests.conftest import ROOT, kdbench_cli

    for name, (grid, sets, sections) in SHRUNK.items():
        run_dir = tmp_path / name
        args = [f"--set={s}" for s in [*sets, "train.epochs=1", "teacher_train.epochs=1"]]
        r = kdbench_cli("run", str(ROOT / grid), "--out", str(run_dir), "--workers", "1", *args)
        assert r.returncode == 0, r.stderr + r.stdout
        v = visit(make_page(capsys, run_dir))
        v.assert_clean()
        assert "for the last kdbench run" in v.page.locator("dl.facts").inner_text()  # its wall time
        got = _sections(v.page)
        assert all(s in got for s in sections), (name, got)
        code, text = kdbench(capsys, "report", str(run_dir), "--format", "json")
        assert code == 0, text
        records = json.loads(text[text.index("[") :])
        t = table_cells(v.page, "#leaderboard-table")
        rows = {r[0]["text"]: r for r in t["rows"]}
        assert {rec["method"] for rec in records} == set(rows), name
        for rec in records:  # every leaderboard cell is the JSON report's number
            cell = rows[rec["method"]][t["head"].index(rec["column"])]
            assert rec["status"] == "done", rec
            assert float(cell["value"]) == rec["metrics"]["top1"]["mean"]
            assert cell["text"].startswith(_stat_text(rec["metrics"]["top1"]))


def test_page_shows_the_wall_time_of_the_last_run(capsys, tmp_path):
    """`kdbench run` records its wall time in the store; the page's facts show it."""
    from kdbench.store import META_LAST_RUN

    run_dir = write_store(groups_run(tmp_path))
    page = make_page(capsys, run_dir).read_text()
    assert "wall time" not in page  # a run made before the record: nothing invented
    store = Store(run_dir / "results.sqlite")
    try:
        record = {"wall_s": 125.5, "finished": "2026-12-06T03:00:00+00:00", "done": 7, "failed": 1}
        store.set_meta(META_LAST_RUN, json.dumps(record))
    finally:
        store.close()
    page = make_page(capsys, run_dir).read_text()
    assert "<dt>wall time</dt><dd>2.1 min for the last kdbench run (7 done, 1 failed" in page
