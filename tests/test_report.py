"""report.html as a user sees it: every curve is the column of stats.jsonl it names (read back from the
SVG), every file it shows exists, the grids' cells are 64 px or more, a killed write leaves the
previous page, and in headless Chromium every image loads and nothing overflows a 1280 px window."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runs
from conftest import ENV, ROOT

CHART_SERIES = {"loss_G", "loss_D", "loss_adv", "loss_ils", "w_ils", "ada_p", "ada_rt", "mask_area", "mask_binary", "r1"}


def curves(page):
    """{series: [(kimg, value), ...]} read back from the page's SVG: each polyline's pixel points mapped
    through the ranges its <svg> states."""
    out = {}
    for svg in re.findall(r"<svg .*?</svg>", page, re.S):
        attrs = {k: float(v) for k, v in re.findall(r'data-(x0|x1|y0|y1|left|right|top|bottom)="([^"]+)"', svg.split(">")[0])}
        for name, points in re.findall(r'<polyline data-series="([^"]+)"[^>]*points="([^"]*)"', svg):
            pts = []
            for p in points.split():
                px, py = map(float, p.split(","))
                x = attrs["x0"] + (px - attrs["left"]) / (attrs["right"] - attrs["left"]) * (attrs["x1"] - attrs["x0"])
                y = attrs["y0"] + (attrs["bottom"] - py) / (attrs["bottom"] - attrs["top"]) * (attrs["y1"] - attrs["y0"])
                pts.append((x, y))
            out[name] = pts
    return out


def mismatches(page, stats):
    """Where the page's curves differ from stats.jsonl: [(series, why)]; empty when every point is its value."""
    bad = []
    for name, pts in curves(page).items():
        want = [(r["kimg"], r[name]) for r in stats if name in r]
        if len(pts) != len(want):
            bad.append((name, f"{len(pts)} points, stats.jsonl has {len(want)}"))
            continue
        for (x, y), (kx, ky) in zip(pts, want):
            span = max(abs(ky), 1e-3)
            if abs(x - kx) > 1e-3 * max(kx, 1) or abs(y - ky) > 2e-3 * max(span, 1):
                bad.append((name, f"({x:.4g}, {y:.4g}) drawn for ({kx:.4g}, {ky:.4g})"))
                break
    return bad


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A tiny run trained, scored by the U-Net and MINE, and its report written."""
    out = tmp_path_factory.mktemp("report") / "run"
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), "--preset", "tiny", "--device", "cpu", "--evaluate",
                        "--eval-preset", "tiny", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"report: {out / 'report.html'}" in r.stdout.splitlines()[-1]  # the main job's last line
    return out


def test_every_curve_is_the_column_it_names(tiny_run):
    out = tiny_run
    page = (out / "report.html").read_text()
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    drawn = curves(page)
    assert set(drawn) == CHART_SERIES  # every curve the page promises is drawn
    assert not mismatches(page, stats)


def test_a_curve_drawn_from_the_wrong_column_is_caught(tiny_run):
    out = tiny_run
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    wrong = runs.svg_chart("Losses", dict(loss_G=[(r["kimg"], r["loss_D"]) for r in stats]), "loss")
    assert mismatches(wrong, stats) and mismatches(wrong, stats)[0][0] == "loss_G"


def test_every_file_the_page_shows_exists_and_the_cells_are_64_px(scored_run):
    page = (scored_run / "report.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert {"segmentation.png", "hidden.png"} <= set(sources) and any(s.startswith("grid-") for s in sources)
    for src in sources:
        assert (scored_run / src).is_file(), src
    grids = sorted(scored_run.glob("grid-*.png"))
    assert [s for s in sources if s.startswith("grid-")] == [g.name for g in reversed(grids)]  # latest first
    w, h = Image.open(grids[-1]).size
    assert h >= 4 * 64 and w >= 8 * 64  # four rows of eight cells of 64 px or more (the run is 16 px)
    for label in ("background", "foreground", "composite", "mask", "ILSGAN -&gt; U-Net", "MI sum, Eq. (11)",
                  "baseline: all foreground", "ILS warm-up ends", "target 0.6", "eta 0.25", "kimg (thousands"):
        assert label in page, label


def test_a_killed_write_leaves_the_previous_report(tiny_run, monkeypatch):
    run = tiny_run
    before = (run / "report.html").read_text()
    (run / "stats.jsonl").write_text((run / "stats.jsonl").read_text() + json.dumps(dict(kimg=9.0, loss_G=1.0)) + "\n")
    real = Path.write_text

    def dies(self, text, *a, **k):  # half of the new page is on disk when the kill comes
        real(self, text[: len(text) // 2])
        raise runs.Interrupt(15)
    monkeypatch.setattr(Path, "write_text", dies)
    with pytest.raises(runs.Interrupt):
        runs.write_report(run)
    monkeypatch.undo()
    assert (run / "report.html").read_text() == before


CHECK = """<script>addEventListener('load', () => {
  const imgs = [...document.images], wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth + 1);
  document.body.setAttribute('data-check', JSON.stringify({width: innerWidth, scroll: document.documentElement.scrollWidth,
    images: imgs.length, broken: imgs.filter(i => !i.complete || !i.naturalWidth).map(i => i.src),
    svgs: document.querySelectorAll('svg').length, lines: document.querySelectorAll('svg polyline').length,
    overflowing: wide.map(e => e.tagName)}));
});</script>"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium here (.ci/run installs Debian's)")
def test_the_report_in_a_browser_at_1280_px(scored_run, tmp_path):
    """Rendered by headless Chromium: every image loads, every chart has its lines, nothing is wider
    than the window; the screenshot is the window's width and has the page's content in it."""
    shutil.copytree(scored_run, tmp_path / "run")
    page = tmp_path / "run" / "checked.html"  # the report, with a check script that only this test adds
    page.write_text((scored_run / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
             "--virtual-time-budget=5000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"data-check=\"([^\"]+)\"", dom)
    assert found, dom[-2000:]
    check = json.loads(found[1].replace("&quot;", '"'))
    assert check["width"] == 1280 and check["scroll"] <= 1280 and not check["overflowing"], check
    assert check["images"] >= 4 and not check["broken"], check
    assert check["svgs"] >= 5 and check["lines"] >= len(CHART_SERIES), check
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", (scored_run / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    image = np.array(Image.open(shot).convert("L"), dtype=np.float32)
    assert image.shape[1] == 1280
    assert (image < 200).mean() > 0.05  # charts, tables and images, not a blank page
