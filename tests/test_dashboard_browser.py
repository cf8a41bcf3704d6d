"""The dashboard built from real MLflow sweeps, opened in headless Debian Chromium (Playwright).

The store is real: MLflow runs in SQLite (cam, minmaxcam, the centre Gaussian, bbam and ccgr, with
per-epoch validation histories, failed trials and trials stopped early by the scheduler), read into
the Parquet results store by ``weakbench dashboard build``. Skipped, with the reason, only when
Playwright or Chromium is missing. Screenshots at 1,400 and 800 px are saved under
``test-artifacts/`` in the repository root (git-ignored).
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from weakbench.dashboards.build import pareto_front
from weakbench.dashboards.cli import app, make_server
from weakbench.dashboards.synthetic import log_synthetic_sweeps

CHROMIUM = os.environ.get("WEAKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EVIL = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """cam and minmaxcam: 2 configs × 2 seeds of trials (+1 failed, +1 stopped early each) with 2
    overlays per finished run, run names starting with an HTML/JS injection attempt; the centre
    Gaussian (1 seed-free config × 3 seeds), bbam and ccgr: 2 configs × 3 seeds (+1 stopped early
    each). Every trial logs 3 epochs of validation metrics. Dashboard built through the CLI sub-app."""
    tmp = tmp_path_factory.mktemp("dash")
    uri = f"sqlite:///{tmp}/mlflow.db"
    log_synthetic_sweeps(uri, methods=("cam", "minmaxcam"), n_configs=2, n_seeds=2, overlays_per_run=2,
                         failed_runs=1, stopped_runs=1, epochs=3, run_name_prefix=EVIL,
                         artifact_location=(tmp / "artifacts").as_uri())
    log_synthetic_sweeps(uri, methods=("center_gaussian", "bbam", "ccgr"), n_configs=2, n_seeds=3, stopped_runs=1,
                         epochs=3, seed=1)
    store = tmp / "store"
    res = CliRunner().invoke(app, ["build", "--store", str(store), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "29 new runs" in res.output and "3 boards" in res.output and "8 overlay images" in res.output
    return store / "dashboard.html"


def test_dashboard_file_is_offline_and_escaped(built):
    from html.parser import HTMLParser

    text = built.read_text(encoding="utf-8")
    external: list[tuple[str, str | None]] = []
    images: list[str] = []

    class Refs(HTMLParser):  # script bodies are CDATA, so strings inside plotly.js are not tags
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,"):
                images.append(a["src"])
            if tag in ("script", "img", "link", "iframe") and (a.get("src") or a.get("href") or "data:").split(":")[0] not in ("data",):
                external.append((tag, a.get("src") or a.get("href")))

    Refs().feed(text)
    assert external == []  # plotly.js inline, images as data URIs: works offline
    assert EVIL not in text and "&lt;img src=x onerror=" in text
    assert len(images) == 8


def test_pareto_front():
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 2.0, 0.5])
    y = np.array([5.0, 4.0, 1.0, 3.0, 5.0])
    assert pareto_front(x, y).tolist() == [0, 1, 2]  # (2,3) is dominated by (2,4); (0.5,5) by (1,5)


def _chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set WEAKBENCH_CHROMIUM)")
    return sync_api


def _inside(box, width, height):
    return box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width \
        and box["y"] + box["height"] <= height


@pytest.mark.browser
def test_dashboard_in_headless_chromium(built):
    sync_api = _chromium()
    server = make_server(built, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with pytest.raises(urllib.error.HTTPError):  # only the dashboard is served
            urllib.request.urlopen(url + "mlflow.db")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(url, wait_until="load")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 20", timeout=30000)

            # one board per headline: every method reaches the dashboard
            boards = page.locator("section.board")
            assert boards.count() == 3
            assert sorted(boards.evaluate_all("bs => bs.map(b => b.dataset.selectMetric)")) == [
                "val/mask_rcnn/map_r50", "val/max_box_acc_v2", "val/pseudo_masks/instance_miou"]
            methods = page.locator("table.board-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.method)")
            assert sorted(methods) == ["bbam", "cam", "ccgr", "center_gaussian", "minmaxcam"]
            cam_board = page.locator('section.board[data-select-metric="val/max_box_acc_v2"]')
            rows = cam_board.locator("table.board-table tbody tr")
            assert rows.count() == 3

            # at a glance: the row, the verdict, then the headline; the verdict column inside the viewport
            heads = cam_board.locator("table.board-table thead th").all_text_contents()
            assert heads[1].startswith("verdict: vs best trivial baseline") and "MaxBoxAccV2" in heads[2] \
                and "headline" in heads[2]
            for table in page.locator("table.board-table").all():
                table.scroll_into_view_if_needed()
                assert _inside(table.locator("th.verdict").bounding_box(), 1400, 900)
                assert _inside(table.locator("th.headline").bounding_box(), 1400, 900)
            page.evaluate("window.scrollTo(0, 0)")
            assert _inside(page.locator("#leaderboard-table th.verdict").bounding_box(), 1400, 900)
            assert all(_inside(c.bounding_box(), 1400, 900) for c in page.locator("#leaderboard-table td.verdict").all())
            # baselines and flagged rows look different from method rows
            base = cam_board.locator('table.board-table tr[data-method="center_gaussian"]')
            assert base.get_attribute("data-role") == "baseline" and base.locator(".badge.baseline").count() == 1
            assert base.locator("td.verdict").text_content() == "is the best trivial baseline"
            cam = cam_board.locator('table.board-table tr[data-method="cam"]')  # 2 seeds: not shown to beat the baseline
            assert cam.get_attribute("data-flagged") == "1" and "fewer than 3" in cam.locator("td.verdict").text_content()
            colours = {m: cam_board.locator(f'table.board-table tr[data-method="{m}"] td.headline').evaluate(
                "c => getComputedStyle(c).backgroundColor") for m in ("center_gaussian", "cam")}
            bbam = page.locator('table.board-table tr[data-method="bbam"]')  # 3 seeds, well above its box-filled masks
            assert bbam.get_attribute("data-flagged") is None and bbam.get_attribute("data-role") == "method"
            assert "beats the box-filled masks" in bbam.locator("td.verdict").text_content()
            colours["bbam"] = bbam.locator("td.headline").evaluate("c => getComputedStyle(c).backgroundColor")
            assert len(set(colours.values())) == 3, colours
            cell = rows.nth(0).locator("td.headline").text_content()
            assert "±" in cell and "[" in cell  # mean ± std [CI]

            assert page.evaluate("document.querySelector('#leaderboard-table').parentElement.nextElementSibling.id") \
                == "leaderboard-legend"
            line = cam_board.locator(".legend").text_content()
            assert line.startswith("test/max_box_acc_v2 (MaxBoxAccV2): share of images") and "higher is better" in line
            assert "Baseline: center_gaussian / none on synthetic" in line
            hrefs = cam_board.locator("td.runs a").evaluate_all("as => as.map(a => a.href)")
            assert len(hrefs) == 7  # 2 seeds × 2 rows + 3 seeds of the baseline
            assert all(h.startswith("http://127.0.0.1:5000/#/experiments/") and "/runs/" in h for h in hrefs)

            # clicking the method header sorts the rows; clicking again reverses
            header = cam_board.locator("table.board-table th.row")
            header.click()
            first = rows.nth(0).get_attribute("data-method")
            header.click()
            assert first == "cam" and rows.nth(0).get_attribute("data-method") == "minmaxcam"

            # diagnostics (thresholds, counts) stay out of the charts, in the folded table
            chart_titles = page.locator("#boards .js-plotly-plot .annotation-text").all_text_contents()
            assert "MaxBoxAccV2" in chart_titles and "instance mIoU" in chart_titles and "mask mAP^r@0.5" in chart_titles
            assert not {"best threshold", "images", "instances"} & set(chart_titles)
            folded = cam_board.locator("details.all-metrics th.diag").all_text_contents()
            assert any(t.startswith("best threshold (diagnostic)") for t in folded)
            assert any(t.startswith("images (diagnostic)") for t in folded)
            assert page.locator("#boards .js-plotly-plot .point path").count() >= 3 + 4 + 1 + 1  # bars

            # sweeps: every trial with its last value, stopped ones marked; history and curves per sweep
            sweeps = page.locator("#sweeps .sweep")
            assert sweeps.count() == 5
            titles = sweeps.locator("h3").all_text_contents()
            assert sum("1 stopped early" in t for t in titles) == 4  # the centre Gaussian has none
            for k in range(5):
                n_trials = int(titles[k].split(": ")[1].split(" trials")[0])
                assert page.locator(f"#history-{k} .scatterlayer .point").count() == n_trials
                assert page.locator(f"#curves-{k} .scatterlayer .trace").count() == n_trials
            legend = page.locator("#sweeps .legendtext").all_text_contents()
            assert "stopped early" in legend and "best finished so far" in legend
            axis = page.locator("#sweeps text.axis-title").all_text_contents()
            assert {"lr", "batch_size", "crr_weight", "frr_weight", "theta_fg", "context_scale", "status",
                    "val/max_box_acc_v2", "val/mask_rcnn/map_r50"} <= set(axis)
            assert page.locator("#pareto .js-plotly-plot .scatterlayer .point").count() == 5  # 4 configs + baseline
            imgs = page.locator("#gallery img")
            assert imgs.count() == 8
            assert all(w == 48 for w in imgs.evaluate_all("is => is.map(i => i.naturalWidth)"))
            assert page.evaluate("window.__pwned") is None  # injected markup stayed text

            ARTIFACTS.mkdir(exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / "dashboard-1400.png"))
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

            # 800 px: the table scrolls sideways, the row and the verdict stay in view
            page.set_viewport_size({"width": 800, "height": 900})
            page.wait_for_timeout(300)
            assert _inside(page.locator("#leaderboard-table th.verdict").bounding_box(), 800, 900)
            assert page.evaluate("document.documentElement.scrollWidth") <= 800  # no page-wide sideways scroll
            page.screenshot(path=str(ARTIFACTS / "dashboard-800.png"))
            browser.close()
        assert problems == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def built_paired(tmp_path_factory):
    """cam, minmaxcam (its mechanism check failed: one-image sets 64 %) and the centre Gaussian,
    1 config × 3 seeds, each finished trial with per-image test results over 120 images; two
    ``weakbench evaluate`` runs (cam, the centre Gaussian) over 150 images. Built through the CLI."""
    from weakbench.dashboards.synthetic import log_synthetic_evaluations

    tmp = tmp_path_factory.mktemp("dash_paired")
    uri = f"sqlite:///{tmp}/mlflow.db"
    log_synthetic_sweeps(uri, methods=("cam", "minmaxcam", "center_gaussian"), n_configs=1, n_seeds=3,
                         per_image_images=120, extra_metrics={"minmaxcam": {"train/one_image_sets": 64.0}},
                         artifact_location=(tmp / "artifacts").as_uri())
    log_synthetic_evaluations(uri, n_images=150)
    store = tmp / "store"
    res = CliRunner().invoke(app, ["build", "--store", str(store), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "1 boards" in res.output and "2 evaluation rows" in res.output
    return store / "dashboard.html"


@pytest.mark.browser
def test_dashboard_shows_paired_verdicts_flags_and_the_evaluation_board(built_paired):
    """The board's new content reaches the page: Holm-corrected verdicts over test images and seeds,
    what each interval covers with its image and seed counts, a failed mechanism check in words on a
    row styled as flagged, and the seed-free ``weakbench evaluate`` rows on their own board."""
    sync_api = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(built_paired.as_uri(), wait_until="load")
        board = page.locator('section.board[data-select-metric="val/max_box_acc_v2"]')
        assert board.locator("th.verdict").text_content().startswith("verdict: paired over test images and seeds, Holm")
        mm = board.locator('table.board-table tr[data-method="minmaxcam"]')
        assert mm.get_attribute("data-flagged") == "1" and mm.locator(".badge.flagged").count() == 1
        assert "⚑ CRR inactive: 64 % of sets hold one image" in mm.locator("td.verdict .flag").all_text_contents()
        assert mm.locator("td.verdict").evaluate("c => getComputedStyle(c).color") == "rgb(176, 0, 32)"
        verdicts = mm.locator("td.verdict .paired").all_text_contents()
        assert len(verdicts) == 2 and any(v.endswith("cam") and "[" in v for v in verdicts)
        assert all(any(w in v for w in ("beats", "worse than", "not shown different from")) for v in verdicts)
        assert "beyond seed noise" not in board.locator("td.verdict").all_text_contents()[0]
        counts = mm.locator("td.counts").text_content()
        assert "120 images · 3 seeds" in counts and "test images (120) x seeds (3)" in counts
        assert "seed-free" in board.locator('tr[data-method="center_gaussian"] td.counts').text_content()
        assert "paired over test images and seeds, Holm-corrected" in board.locator(".legend").text_content()
        assert "beyond seed noise (≥" not in page.locator("#boards > p.note").text_content()  # every row is paired
        assert _inside(mm.locator("td.verdict").bounding_box(), 1400, 900)

        ev = page.locator('section.eval-board[data-kind="evaluation"]')
        assert ev.count() == 1
        rows = ev.locator("tbody tr")
        assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.method)")) == ["cam", "center_gaussian"]
        cam = ev.locator('tr[data-method="cam"]')
        assert "center_gaussian" in cam.locator("td.verdict .paired").text_content()
        assert "150 images" in cam.locator("td.counts").text_content()
        assert "seed-free" in ev.locator('tr[data-method="center_gaussian"] td.counts').text_content()
        assert "[" in cam.locator("td.headline").text_content()  # value [interval over the images]
        ARTIFACTS.mkdir(exist_ok=True)
        ev.screenshot(path=str(ARTIFACTS / "dashboard-evaluation-board.png"))
        browser.close()
    assert problems == []
