"""The dashboard built from real MLflow sweeps, opened in headless Debian Chromium (Playwright).

Skipped, with the reason, only when Playwright or Chromium is missing. The screenshot is saved
under ``test-artifacts/`` in the repository root (git-ignored).
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
    """2 methods × 2 configs × 2 seeds of trials (+1 failed each) with 2 overlays per run, run names
    starting with an HTML/JS injection attempt; dashboard built through the CLI sub-app."""
    tmp = tmp_path_factory.mktemp("dash")
    uri = f"sqlite:///{tmp}/mlflow.db"
    log_synthetic_sweeps(uri, methods=("cam", "minmaxcam"), n_configs=2, n_seeds=2, overlays_per_run=2,
                         failed_runs=1, run_name_prefix=EVIL, artifact_location=(tmp / "artifacts").as_uri())
    store = tmp / "store"
    res = CliRunner().invoke(app, ["build", "--store", str(store), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "10 new runs" in res.output and "8 overlay images" in res.output
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


@pytest.mark.browser
def test_dashboard_in_headless_chromium(built):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set WEAKBENCH_CHROMIUM)")
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
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 9", timeout=30000)

            rows = page.locator("#leaderboard-table tbody tr")
            assert rows.count() == 2
            methods = rows.evaluate_all("rs => rs.map(r => r.cells[1].textContent)")
            assert sorted(methods) == ["cam", "minmaxcam"]
            cell = rows.nth(0).locator("td").nth(6).text_content()
            assert "±" in cell and "[" in cell  # mean ± std [CI]
            assert page.locator("#leaderboard h2").text_content().endswith("selected on val (val/max_box_acc_v2), reported on test")
            # under the table: what the headline means and which row is the baseline (none here: the command)
            assert page.evaluate("document.querySelector('#leaderboard-table').parentElement.nextElementSibling.id") \
                == "leaderboard-legend"
            line = page.locator("#leaderboard-legend").text_content()
            assert line.startswith("test/max_box_acc_v2 (MaxBoxAccV2): share of images") and "higher is better" in line
            assert "No baseline on" in line and "weakbench sweep search_spaces/center_gaussian.yaml" in line
            hrefs = page.locator("#leaderboard-table td.runs a").evaluate_all("as => as.map(a => a.href)")
            assert len(hrefs) == 4  # 2 seeds × 2 rows
            assert all(h.startswith("http://127.0.0.1:5000/#/experiments/") and "/runs/" in h for h in hrefs)

            # clicking the method header sorts the rows; clicking again reverses
            page.locator("#leaderboard-table th", has_text="method").click()
            first = rows.nth(0).locator("td").nth(1).text_content()
            page.locator("#leaderboard-table th", has_text="method").click()
            assert {first, rows.nth(0).locator("td").nth(1).text_content()} == {"cam", "minmaxcam"}

            # every section is populated and its charts drew
            assert page.locator("#bars .js-plotly-plot").count() == 4  # test/{cls_acc,max_box_acc,max_box_acc_v2,pxap}
            assert page.locator("#bars .js-plotly-plot .point path").count() >= 8  # 2 bars per chart
            assert page.locator("#sweeps .js-plotly-plot").count() == 4  # 2 sweeps × (parcoords + scatter)
            assert page.locator("#parcoords-0 canvas").count() >= 1 and page.locator("#parcoords-1 canvas").count() >= 1
            titles = page.locator("#sweeps text.axis-title").all_text_contents()
            assert {"lr", "batch_size", "crr_weight", "frr_weight", "val/max_box_acc_v2"} <= set(titles)
            assert page.locator("#sweeps .js-plotly-plot .scatterlayer .point").count() >= 8
            assert page.locator("#pareto .js-plotly-plot .scatterlayer .point").count() == 4  # 4 configurations
            imgs = page.locator("#gallery img")
            assert imgs.count() == 8
            assert all(w == 48 for w in imgs.evaluate_all("is => is.map(i => i.naturalWidth)"))
            assert page.evaluate("window.__pwned") is None  # injected markup stayed text

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
        assert problems == []
    finally:
        server.shutdown()
        server.server_close()
