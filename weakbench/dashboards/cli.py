"""``weakbench dashboard build`` / ``serve``: a Typer sub-app mounted by ``weakbench.cli``.

``build`` refreshes the results store from MLflow when ``--tracking-uri`` is given (only runs not
yet in the store are read), then writes one self-contained HTML file: one board per headline
metric (every method on a board), and per sweep the plots over every trial, with per-epoch curves
read from MLflow's metric history. ``serve`` serves that one
file on 127.0.0.1 until Ctrl-C.
"""

from __future__ import annotations

import http.server
import socketserver
from pathlib import Path
from typing import Optional

import typer

from weakbench.platform.cli_options import BASELINE, EXPERIMENT, REPORT_SPLIT, TRACKING_URI

app = typer.Typer(help="Leaderboard and sweep dashboard: one HTML file that works offline.", no_args_is_help=True)


@app.command("build")
def build(
    store: Path = typer.Option(Path("weakbench_runs/results"), "--store", help="results store directory (Parquet)"),
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = EXPERIMENT,
    out: Optional[Path] = typer.Option(None, "--out", help="output HTML file (default <store>/dashboard.html)"),
    select_metric: Optional[str] = typer.Option(
        None, "--select-metric",
        help="validation metric that selects, e.g. val/max_box_acc_v2: one board ranked by it (default: each "
             "method's headline metric, one board per headline, as `weakbench leaderboard` shows them)"),
    report_split: str = REPORT_SPLIT,
    baseline: str = BASELINE,
    mlflow_ui_url: Optional[str] = typer.Option(None, "--mlflow-ui-url", help="MLflow UI base URL for run links"),
) -> None:
    """Build the dashboard HTML from the results store. With --tracking-uri (or its variables, or
    <store>/../mlflow.db when that file exists, as `weakbench sweep` lays it out) new runs are added
    to the store first and overlays are fetched from MLflow."""
    from weakbench.dashboards.build import build_dashboard
    from weakbench.core.errors import DataError
    from weakbench.core.errors import ConfigError
    from weakbench.platform.results import current_table, writable_dir

    if tracking_uri is None and (Path(store).parent / "mlflow.db").is_file():
        tracking_uri = f"sqlite:///{(Path(store).parent / 'mlflow.db').resolve()}"  # the CLI's default layout
    if out is None and not writable_dir(Path(store)):
        raise ConfigError(f"--store {store}: cannot write dashboard.html there (read-only); fix: pass --out FILE "
                          f"in a writable directory")
    # a store on a read-only mount is read as it is, new runs from MLflow in memory: nothing written there
    table, rep = current_table(tracking_uri, Path(store), experiment)
    if rep is not None:
        typer.echo(f"results store {store}: {rep.n_new} new runs, {rep.n_total} in total")
    elif tracking_uri:
        typer.echo(f"results store {store} is read-only: {table.num_rows} runs read from MLflow, nothing written")
    if table.num_rows == 0:
        raise DataError(f"{store}: the results store is empty; fix: pass --tracking-uri of the MLflow store the sweeps logged to")
    out = out or Path(store) / "dashboard.html"
    counts = build_dashboard(table, out, select_metric=select_metric, report_split=report_split,
                             baseline_method=baseline, tracking_uri=tracking_uri, mlflow_ui_url=mlflow_ui_url,
                             store_dir=store)
    typer.echo(f"wrote {out} ({counts['bytes'] / 1e6:.1f} MB): {counts['boards']} boards, {counts['rows']} leaderboard "
               f"rows, {counts['evaluation_rows']} evaluation rows, {counts['sweeps']} sweeps, "
               f"{counts['images']} overlay images")


def make_server(html_file: Path, port: int = 8765) -> socketserver.TCPServer:
    """An HTTP server on 127.0.0.1:``port`` that answers every GET with ``html_file`` (nothing
    else on disk is reachable). ``port=0`` picks a free port (see ``server.server_address``)."""
    html_file = Path(html_file)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.split("?")[0] not in ("/", "/index.html", "/" + html_file.name):
                self.send_error(404)
                return
            data = html_file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:
            pass

    socketserver.TCPServer.allow_reuse_address = True
    return socketserver.TCPServer(("127.0.0.1", port), Handler)


@app.command("serve")
def serve(
    store: Path = typer.Option(Path("weakbench_runs/results"), "--store", help="results store directory"),
    file: Optional[Path] = typer.Option(None, "--file", help="HTML file to serve (default <store>/dashboard.html)"),
    port: int = typer.Option(8765, "--port", help="port on 127.0.0.1"),
) -> None:
    """Serve the built dashboard on http://127.0.0.1:PORT/ (Ctrl-C to stop)."""
    from weakbench.core.errors import DataError

    html_file = file or Path(store) / "dashboard.html"
    if not html_file.is_file():
        raise DataError(f"{html_file}: no dashboard there; fix: run `weakbench dashboard build --store {store}` first")
    with make_server(html_file, port) as server:
        typer.echo(f"serving {html_file} on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            typer.echo("stopped")
