"""Make the README's dashboard screenshots: ``docs/dashboard_1400.png``, ``docs/dashboard_800.png``
(the top of the page) and ``docs/dashboard_sweep_1400.png`` (the plots of one sweep).

The runs are **synthetic** (:func:`weakbench.dashboards.synthetic.log_synthetic_sweeps`: invented
numbers, real MLflow runs in SQLite read into a real Parquet results store): cam, minmaxcam and
the centre Gaussian with per-image test results over 260 invented images (so their intervals cover
test images and seeds and their verdicts are paired and Holm-corrected; minmaxcam logs a failed
mechanism check, "CRR inactive: 64 % of sets hold one image"), Top-GAP with two seeds and no
per-image results (seed-only, flagged), BBAM and CCGR, 4 epochs per trial, one trial per sweep
stopped early by the scheduler; and two ``weakbench evaluate`` runs (cam, the centre Gaussian) on
400 invented images for the evaluation board. The page is opened in headless Chromium at 1,400 × 900
and 800 × 900 (viewport, top of the page; at 1,400 also the CCGR sweep's section) and saved as
96-colour PNGs.

    PYTHONPATH=$PWD python docs/dashboard_screenshots.py   # about 40 s on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from weakbench.dashboards.build import build_dashboard
from weakbench.dashboards.synthetic import log_synthetic_evaluations, log_synthetic_sweeps
from weakbench.platform import results

DOCS = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("WEAKBENCH_CHROMIUM", "/usr/bin/chromium")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        art = (Path(tmp) / "artifacts").as_uri()
        log_synthetic_sweeps(uri, methods=("cam", "minmaxcam", "center_gaussian"), n_configs=3, n_seeds=3,
                             stopped_runs=1, epochs=4, artifact_location=art, per_image_images=260,
                             extra_metrics={"minmaxcam": {"train/one_image_sets": 64.0}})
        log_synthetic_sweeps(uri, methods=("bbam", "ccgr"), n_configs=3, n_seeds=3, stopped_runs=1, epochs=4, seed=2)
        log_synthetic_evaluations(uri, n_images=400)
        log_synthetic_sweeps(uri, methods=("topgap",), n_configs=2, n_seeds=2, stopped_runs=1, epochs=4, seed=1)
        results.update_store(uri, Path(tmp) / "store")
        html = Path(tmp) / "dashboard.html"
        build_dashboard(results.read_store(Path(tmp) / "store"), html, tracking_uri=uri, mlflow_ui_url="",
                        store_dir=Path(tmp) / "store",
                        page_title="weakbench dashboard — synthetic demo runs (invented numbers)")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            for width in (1400, 800):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(html.as_uri(), wait_until="load", timeout=180_000)
                page.wait_for_timeout(1500)
                shots = [(DOCS / f"dashboard_{width}.png", page)]
                if width == 1400:
                    shots.append((DOCS / "dashboard_sweep_1400.png",
                                  page.locator("#sweeps .sweep").filter(has_text="ccgr on").first))
                for out, where in shots:
                    where.screenshot(path=str(out))
                    Image.open(out).convert("RGB").quantize(colors=96).save(out, optimize=True)
                    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB", file=sys.stderr)
            browser.close()


if __name__ == "__main__":
    main()
