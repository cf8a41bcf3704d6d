"""One self-contained HTML dashboard from the results table.

Sections (each a ``<section>`` with a stable id, used by the browser test):

* ``#leaderboard`` — the sortable leaderboard table (:func:`weakbench.platform.leaderboard.build_leaderboard`):
  test numbers of val-selected configurations, mean ± std [95% bootstrap CI], seeds/trials,
  cost, paired comparison with the baseline, links to the MLflow runs; under it
  (``#leaderboard-legend``) the line of :func:`weakbench.platform.leaderboard.legend`: what the
  headline metric means and which row is the baseline;
* ``#bars`` — one bar chart per reported metric with the 95% intervals as error bars;
* ``#sweeps`` — per sweep, a parallel-coordinates plot (hyperparameters → validation metric) and
  parameter-vs-metric scatter plots (validation split: the split that selects);
* ``#pareto`` — classification versus localisation, one point per configuration (means over
  seeds on the validation split), Pareto front drawn;
* ``#gallery`` — CAM overlays (``overlays/*.png`` artifacts) of each method's selected runs,
  embedded as base64 ``data:`` URIs.

Plotly's JavaScript is inlined once, so the file works offline. Every user-provided string
(run names, tags, parameter values, method and dataset names) is HTML-escaped before it reaches
the page or a Plotly label (Plotly renders a subset of HTML in text).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from weakbench.platform.leaderboard import (MIN_SEEDS_BEYOND_NOISE, build_leaderboard, format_stat, legend,
                                            leaderboard_metrics, title, trivial_cell)
from weakbench.platform.metric_declarations import DEFAULT_SELECT_METRIC, higher_is_better
from weakbench.platform.results import metric_columns, param_columns

MAX_SWEEPS = 30
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
MAX_OVERLAY_BYTES = 2_000_000
_esc = html.escape


def _fig_html(fig: Any, div_id: str, height: int = 420, top: int = 60) -> str:
    fig.update_layout(height=height, margin=dict(l=70, r=40, t=top, b=60), template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def run_link(mlflow_ui_url: str | None, experiment_id: str | None, run_id: str) -> str:
    """An ``<a>`` to the run page of the MLflow UI (or a plain ``<code>`` when no UI URL is known)."""
    text = _esc(run_id[:8])
    if not mlflow_ui_url or not experiment_id:
        return f'<code title="{_esc(run_id)}">{text}</code>'
    href = f"{mlflow_ui_url.rstrip('/')}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs/{urllib.parse.quote(run_id)}"
    return f'<a class="run" href="{_esc(href)}" title="{_esc(run_id)}" target="_blank" rel="noopener">{text}</a>'


# ---------------------------------------------------------------------- leaderboard table
def leaderboard_html(lb: pa.Table, mlflow_ui_url: str | None) -> str:
    metrics = leaderboard_metrics(lb)
    meta = lb.schema.metadata or {}
    sel_metric = meta.get(b"weakbench.select_metric", b"val").decode()
    base = meta.get(b"weakbench.baseline_method", b"cam").decode()
    heads = ["dataset", "method", "backbone", "seeds", "trials", f"{sel_metric} (mean, selects)"]
    heads += [f"{m} (reported)" for m in metrics] + ["GPU-h", "CPU-h", f"vs {base} (paired, same seeds)",
                                                 "vs best trivial baseline", "MLflow runs"]
    out = ['<div class="scroll"><table id="leaderboard-table" class="sortable"><thead><tr>']
    for i, h in enumerate(heads):
        out.append(f'<th data-col="{i}" title="click to sort">{_esc(h)}</th>')
    out.append("</tr></thead><tbody>")
    for r in lb.to_pylist():
        cells = [(r["dataset"], r["dataset"]), (r["method"], r["method"]), (r["backbone"], r["backbone"]),
                 (r["n_seeds"], str(r["n_seeds"])), (r["n_trials"], f"{r['n_trials']} ({r['n_failed']} failed)"),
                 (r["select_mean"], _fmt(r["select_mean"]))]
        for m in metrics:
            cells.append((r[f"{m}.mean"], format_stat(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.ci_low"], r[f"{m}.ci_high"])))
        cells += [(r["gpu_hours"], _fmt(r["gpu_hours"])), (r["cpu_hours"], _fmt(r["cpu_hours"]))]
        diff = _num(r["baseline_diff_mean"])
        vs = r["baseline_verdict"] or ""
        if not math.isnan(diff):
            vs = f"{diff:+.2f}"
            if not math.isnan(_num(r["baseline_diff_ci_low"])):
                vs += f" [{r['baseline_diff_ci_low']:+.1f}, {r['baseline_diff_ci_high']:+.1f}]"
            vs += f" — {r['baseline_verdict']}"
        cells.append((diff, vs))
        cells.append((_num(r.get("trivial_diff_mean")), trivial_cell(r)))
        below = ' class="below-trivial" data-below-trivial="1"' if r.get("below_trivial") else ""
        out.append(f'<tr data-method="{_esc(r["method"])}"{below}>')
        for key, text in cells:
            sort = key if isinstance(key, str) else ("" if key is None or math.isnan(key) else repr(float(key)))
            out.append(f'<td data-sort="{_esc(str(sort))}">{_esc(str(text))}</td>')
        links = " ".join(run_link(mlflow_ui_url, r["experiment_id"], rid) for rid in r["run_ids"])
        out.append(f'<td class="runs">{links}</td></tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


# ---------------------------------------------------------------------- charts
def bar_charts(lb: pa.Table) -> list[str]:
    """One grouped bar chart per reported metric: x = method / backbone, one trace per dataset,
    error bars = 95% bootstrap interval (none with one seed)."""
    import plotly.graph_objects as go

    meta = lb.schema.metadata or {}
    rep = meta.get(b"weakbench.reported_on", b"test").decode()
    sel = meta.get(b"weakbench.select_metric", b"val").decode()
    rows = lb.to_pylist()
    divs = []
    for k, m in enumerate(leaderboard_metrics(lb)):
        fig = go.Figure()
        for d in sorted({r["dataset"] for r in rows}):
            sub = sorted((r for r in rows if r["dataset"] == d), key=lambda r: (r["method"], r["backbone"]))
            mean = np.array([_num(r[f"{m}.mean"]) for r in sub])
            lo = np.array([_num(r[f"{m}.ci_low"]) for r in sub])
            hi = np.array([_num(r[f"{m}.ci_high"]) for r in sub])
            fig.add_trace(go.Bar(
                name=_esc(d), x=[_esc(f"{r['method']} / {r['backbone']}") for r in sub], y=mean,
                error_y=dict(type="data", symmetric=False, array=np.nan_to_num(hi - mean).tolist(),
                             arrayminus=np.nan_to_num(mean - lo).tolist(), visible=True),
                customdata=[[r["n_seeds"], _fmt(_num(r[f"{m}.ci_low"])), _fmt(_num(r[f"{m}.ci_high"]))] for r in sub],
                hovertemplate="%{x}<br>mean %{y:.2f}<br>95% CI [%{customdata[1]}, %{customdata[2]}]<br>"
                              "seeds %{customdata[0]}<extra>" + _esc(d) + "</extra>",
            ))
        fig.update_layout(barmode="group", title=_esc(f"{m} — {rep} split, configuration selected on {sel}; "
                                                      f"mean over seeds, 95% bootstrap CI"),
                          yaxis_title=_esc(m), legend_title="dataset")
        divs.append(_fig_html(fig, f"bar-{k}"))
    return divs


def _param_axes(params: dict[str, np.ndarray], idx: np.ndarray) -> list[tuple[str, np.ndarray, list[str] | None]]:
    """Hyperparameters that vary within ``idx``: ``(name, values float, ticktext or None)``.
    Numeric strings become floats; other strings are coded 0..k-1 with their names as tick text."""
    axes = []
    for name in sorted(params):
        if name == "seed":
            continue
        raw = params[name][idx]
        if len({v for v in raw.tolist()}) < 2:
            continue
        try:
            vals = np.array([math.nan if v is None else float(v) for v in raw.tolist()])
            axes.append((name, vals, None))
        except ValueError:
            cats = sorted({str(v) for v in raw.tolist()})
            code = {c: i for i, c in enumerate(cats)}
            axes.append((name, np.array([code[str(v)] for v in raw.tolist()], dtype=float), cats))
    return axes


def sweep_charts(table: pa.Table, select_metric: str) -> list[tuple[str, list[str]]]:
    """Per sweep (newest first, at most :data:`MAX_SWEEPS`): a parallel-coordinates plot and a
    row of parameter-vs-metric scatter plots, on the selection metric (validation split)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if table.num_rows == 0:
        return []
    finished = table.filter(pc.equal(table["status"], "FINISHED"))
    metric = metric_columns(finished, [select_metric])[select_metric]
    params = param_columns(finished)
    sweeps = finished["sweep_id"].fill_null("").to_numpy(zero_copy_only=False)
    starts = finished["start_time"].cast(pa.int64()).fill_null(0).to_numpy()
    names = finished["run_name"].fill_null("").to_numpy(zero_copy_only=False)
    methods = finished["method"].fill_null("").to_numpy(zero_copy_only=False)
    datasets = finished["dataset"].fill_null("").to_numpy(zero_copy_only=False)
    order = sorted({s for s in sweeps.tolist()}, key=lambda s: -int(starts[sweeps == s].max()))[:MAX_SWEEPS]
    out = []
    for k, sweep in enumerate(order):
        idx = np.nonzero((sweeps == sweep) & ~np.isnan(metric))[0]
        label = f"sweep {sweep[:48] or '(none)'} — {methods[idx[0]] if len(idx) else ''} on {datasets[idx[0]] if len(idx) else ''}"
        if len(idx) == 0:
            continue
        axes = _param_axes(params, idx)[:12]
        divs = []
        if axes:
            dims = []
            for name, vals, cats in axes:
                d = dict(label=_esc(name), values=np.nan_to_num(vals, nan=-1).tolist())
                if cats is not None:
                    d.update(tickvals=list(range(len(cats))), ticktext=[_esc(c) for c in cats])
                dims.append(d)
            dims.append(dict(label=_esc(select_metric), values=metric[idx].tolist()))
            fig = go.Figure(go.Parcoords(line=dict(color=metric[idx].tolist(), colorscale="Viridis", showscale=True),
                                         dimensions=dims))
            fig.update_layout(title=_esc(f"{label}: hyperparameters → {select_metric} ({len(idx)} runs)"))
            divs.append(_fig_html(fig, f"parcoords-{k}", 420, top=110))  # room for the axis labels above
            shown = axes[:6]
            sc = make_subplots(rows=1, cols=len(shown), shared_yaxes=True,
                               subplot_titles=[_esc(n) for n, _, _ in shown])
            hover = [_esc(str(n)) for n in names[idx].tolist()]
            for j, (name, vals, cats) in enumerate(shown, start=1):
                sc.add_trace(go.Scatter(x=vals.tolist(), y=metric[idx].tolist(), mode="markers", text=hover,
                                        marker=dict(size=7, opacity=0.75), name=_esc(name), showlegend=False,
                                        hovertemplate="%{text}<br>%{x}: %{y:.2f}<extra></extra>"), row=1, col=j)
                if cats is not None:
                    sc.update_xaxes(tickvals=list(range(len(cats))), ticktext=[_esc(c) for c in cats], row=1, col=j)
                elif np.nanmin(vals) > 0 and np.nanmax(vals) / np.nanmin(vals) > 50:
                    sc.update_xaxes(type="log", row=1, col=j)
            sc.update_yaxes(title_text=_esc(select_metric), row=1, col=1)
            sc.update_layout(title=_esc(f"{label}: parameter vs {select_metric}"))
            divs.append(_fig_html(sc, f"scatter-{k}", 330))
        out.append((label, divs))
    return out


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated when both ``x`` and ``y`` are maximised, sorted by x.

    A point is dominated when another has ``x' ≥ x`` and ``y' ≥ y`` with one inequality strict.
    """
    order = np.lexsort((-y, -x))  # x descending, then y descending
    front, best_y = [], -math.inf
    for i in order.tolist():
        if y[i] > best_y:
            front.append(i)
            best_y = y[i]
    return np.array(sorted(front, key=lambda i: x[i]), dtype=int)


def pareto_charts(table: pa.Table, select_metric: str) -> list[str]:
    """Classification (``val/cls_acc`` or ``val/cls_map``) versus localisation (``select_metric``),
    one point per configuration (mean over seeds on the selection split), Pareto front as a line;
    one chart per dataset."""
    import plotly.graph_objects as go

    split = select_metric.split("/", 1)[0]
    finished = table.filter(pc.equal(table["status"], "FINISHED"))
    cls_name = next((f"{split}/{n}" for n in ("cls_acc", "cls_map")
                     if np.any(~np.isnan(metric_columns(finished, [f"{split}/{n}"])[f"{split}/{n}"]))), None)
    if cls_name is None or finished.num_rows == 0:
        return []
    mets = metric_columns(finished, [cls_name, select_metric])
    keys = list(zip(*(finished[c].fill_null("").to_pylist() for c in ("dataset", "method", "backbone", "config_group"))))
    agg: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        if not (math.isnan(mets[cls_name][i]) or math.isnan(mets[select_metric][i])):
            agg.setdefault(k, []).append(i)
    divs = []
    for n, d in enumerate(sorted({k[0] for k in agg})):
        fig = go.Figure()
        pts = [(k, float(np.mean(mets[cls_name][v])), float(np.mean(mets[select_metric][v])), len(v))
               for k, v in agg.items() if k[0] == d]
        for mb in sorted({(k[1], k[2]) for k, *_ in pts}):
            sub = [p for p in pts if (p[0][1], p[0][2]) == mb]
            fig.add_trace(go.Scatter(
                x=[p[1] for p in sub], y=[p[2] for p in sub], mode="markers", name=_esc(f"{mb[0]} / {mb[1]}"),
                text=[_esc(f"config {p[0][3]} ({p[3]} runs)") for p in sub], marker=dict(size=9, opacity=0.8),
                hovertemplate="%{text}<br>" + _esc(cls_name) + " %{x:.2f}<br>" + _esc(select_metric) + " %{y:.2f}<extra></extra>",
            ))
        x = np.array([p[1] for p in pts])
        y = np.array([p[2] for p in pts]) * (1 if higher_is_better(select_metric) else -1)
        front = pareto_front(x, y)
        fig.add_trace(go.Scatter(x=x[front].tolist(), y=[pts[i][2] for i in front], mode="lines",
                                 name="Pareto front", line=dict(color="black", dash="dash")))
        fig.update_layout(title=_esc(f"{d}: classification vs localisation, one point per configuration "
                                     f"(mean over seeds, {split} split)"),
                          xaxis_title=_esc(cls_name), yaxis_title=_esc(select_metric))
        divs.append(_fig_html(fig, f"pareto-{n}"))
    return divs


# ---------------------------------------------------------------------- gallery
def _read_artifact(uri: str, tracking_uri: str | None) -> bytes | None:
    parsed = urllib.parse.urlparse(uri)
    try:
        if parsed.scheme in ("", "file"):
            path = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else uri
            if os.path.getsize(path) > MAX_OVERLAY_BYTES:
                return None
            return Path(path).read_bytes()
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
        if os.path.getsize(local) > MAX_OVERLAY_BYTES:
            return None
        return Path(local).read_bytes()
    except Exception:  # noqa: BLE001 - a missing picture must not break the dashboard
        return None


def gallery_html(table: pa.Table, lb: pa.Table, tracking_uri: str | None, mlflow_ui_url: str | None,
                 per_method: int = 8) -> tuple[str, int]:
    """CAM overlays of each leaderboard row's selected runs (up to ``per_method`` per method),
    as base64 PNG data URIs. Returns ``(html, number of images)``."""
    by_id = {r: i for i, r in enumerate(table["run_id"].to_pylist())}
    overlays = table["overlay_uris"].to_pylist()
    names = table["run_name"].to_pylist()
    parts, n_img = [], 0
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in lb.to_pylist():
        by_method.setdefault(r["method"], []).append(r)
    for method in sorted(by_method):
        figs = []
        for r in by_method[method]:
            for rid in r["run_ids"]:
                i = by_id.get(rid)
                for uri in (overlays[i] or []) if i is not None else []:
                    if len(figs) >= per_method:
                        break
                    data = _read_artifact(uri, tracking_uri)
                    if data is None or not data.startswith(b"\x89PNG"):
                        continue
                    b64 = base64.b64encode(data).decode()
                    cap = f"{r['dataset']} · {r['backbone']} · {names[i] or rid[:8]} · {uri.rsplit('/', 1)[-1]}"
                    figs.append(f'<figure><img alt="{_esc(cap)}" src="data:image/png;base64,{b64}">'
                                f"<figcaption>{_esc(cap)} {run_link(mlflow_ui_url, r['experiment_id'], rid)}</figcaption></figure>")
        n_img += len(figs)
        body = "".join(figs) if figs else '<p class="empty">no overlays/*.png artifacts in the selected runs</p>'
        parts.append(f'<div class="method-gallery" data-method="{_esc(method)}"><h3>{_esc(method)}</h3>'
                     f'<div class="grid">{body}</div></div>')
    return "".join(parts), n_img


# ---------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7fb}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9cfdd;font-size:13px}nav a{color:#9fc3ff;margin-right:14px;font-size:13px}
section{background:#fff;margin:18px 24px;padding:16px 20px;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:18px;margin:0 0 8px}h3{font-size:15px;margin:14px 0 6px}.note{color:#566;font-size:13px}
table.sortable{border-collapse:collapse;width:100%;font-size:13px}
table.sortable th{background:#eef1f7;cursor:pointer;text-align:left;padding:6px 8px;position:sticky;top:0;white-space:nowrap}
table.sortable th.asc::after{content:" ▲"}table.sortable th.desc::after{content:" ▼"}
table.sortable td{padding:5px 8px;border-top:1px solid #e4e7ee;white-space:nowrap}
table.sortable tr:hover td{background:#f8faff}tr.below-trivial td{color:#b00020;background:#fff4f4}td.runs a,td.runs code{margin-right:6px;font-family:monospace}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:170px;font-size:11px;color:#445}
figure img{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;border:1px solid #dde;background:#000}
.empty{color:#888;font-style:italic}.scroll{overflow-x:auto}
"""

_SORT_JS = """
(function(){
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('th').forEach(function(th, col){
      th.addEventListener('click', function(){
        var asc = !th.classList.contains('asc');
        table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
        th.classList.add(asc ? 'asc' : 'desc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){
          var x = a.cells[col].getAttribute('data-sort') || '', y = b.cells[col].getAttribute('data-sort') || '';
          var nx = parseFloat(x), ny = parseFloat(y), r;
          if (x === '' && y !== '') return 1; if (y === '' && x !== '') return -1;
          if (!isNaN(nx) && !isNaN(ny)) r = nx - ny; else r = x.localeCompare(y);
          return asc ? r : -r;
        });
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""


def build_dashboard(
    table: pa.Table,
    out: Path,
    *,
    select_metric: str = DEFAULT_SELECT_METRIC,
    report_split: str = "test",
    baseline_method: str = "cam",
    tracking_uri: str | None = None,
    mlflow_ui_url: str | None = None,
    page_title: str = "weakbench — leaderboard and sweeps",
    n_boot: int = 2000,
) -> dict[str, int]:
    """Write the dashboard HTML for ``table`` (one row per run) to ``out`` (atomically).

    Args:
        table: results table (:func:`weakbench.platform.results.read_store`).
        out: output ``.html`` path (parent directories are created).
        select_metric, report_split, baseline_method, n_boot: passed to
            :func:`~weakbench.platform.leaderboard.build_leaderboard`.
        tracking_uri: used to download overlay artifacts that are not local files.
        mlflow_ui_url: base URL of the MLflow UI for run links; default: the tracking URI when it
            is ``http(s)``, else ``http://127.0.0.1:5000`` (where ``mlflow ui --backend-store-uri
            <tracking uri>`` serves a sqlite store); ``""`` shows run ids without links.

    Returns:
        counts of what was drawn: ``{"rows", "bar_charts", "sweeps", "pareto_charts", "images", "bytes"}``.
    """
    import plotly.offline

    out = Path(out)
    if mlflow_ui_url is None:
        is_server = bool(tracking_uri) and tracking_uri.startswith(("http://", "https://"))
        mlflow_ui_url = tracking_uri if is_server else DEFAULT_MLFLOW_UI
    ui_note = (f'Run ids link to the MLflow UI at <code>{_esc(mlflow_ui_url)}</code>'
               + (f' (start it with <code>mlflow ui --backend-store-uri {_esc(tracking_uri)}</code>)'
                  if tracking_uri and mlflow_ui_url == DEFAULT_MLFLOW_UI else "") + "."
               if mlflow_ui_url else "")
    lb = build_leaderboard(table, select_metric=select_metric, report_split=report_split,
                           baseline_method=baseline_method, n_boot=n_boot)
    bars = bar_charts(lb)
    sweeps = sweep_charts(table, select_metric)
    pareto = pareto_charts(table, select_metric)
    gallery, n_img = gallery_html(table, lb, tracking_uri, mlflow_ui_url)
    n_runs, n_failed = table.num_rows, int(pc.sum(pc.equal(table["status"], "FAILED")).as_py() or 0)

    sweep_html = "".join(
        f'<div class="sweep"><h3>{_esc(label)}</h3>{"".join(divs) or "<p class=empty>no hyperparameter varies</p>"}</div>'
        for label, divs in sweeps) or '<p class="empty">no finished runs with the selection metric</p>'
    pareto_html = "".join(pareto) or (
        f'<p class="empty">no classification metric (cls_acc, cls_map) on the {_esc(select_metric.split("/")[0])} split</p>')
    body = f"""
<header><h1>{_esc(page_title)}</h1>
<p>{n_runs} runs ({n_failed} failed) · {lb.num_rows} leaderboard rows · {_esc(title(lb))}</p>
<nav><a href="#leaderboard">leaderboard</a><a href="#bars">metrics</a><a href="#sweeps">sweeps</a>
<a href="#pareto">Pareto</a><a href="#gallery">CAM gallery</a></nav></header>
<section id="leaderboard"><h2>{_esc(title(lb))}</h2>
<p class="note">Per (dataset, method, backbone): the configuration with the best mean {_esc(select_metric)} over its
seeds is selected on the <b>{_esc(select_metric.split("/")[0])}</b> split; its <b>{_esc(report_split)}</b> metrics are
reported as mean ± std over seeds [95% bootstrap CI] ("n/a" with one seed). Trials and cost count every run of the
search. The comparison with {_esc(baseline_method)} pairs runs on the same seeds. Rows in red (✗) do not beat the best
trivial baseline (centre Gaussian or whole image, no training; for BBAM and CCGR their own box-filled masks) beyond
seed noise, or have fewer than
{MIN_SEEDS_BEYOND_NOISE} seeds to show it. A seed-free row (no training and nothing random: the trivial baselines, a
CAM at 0 epochs from the pretrained head) is a constant: other rows' seeds are tested against it, and two seed-free
rows differ exactly. Click a column to sort. {ui_note}</p>
{leaderboard_html(lb, mlflow_ui_url)}
<p class="note legend" id="leaderboard-legend">{_esc(legend(lb))}</p></section>
<section id="bars"><h2>Reported metrics with 95% intervals</h2>{"".join(bars)}</section>
<section id="sweeps"><h2>Sweeps</h2><p class="note">Hyperparameters against the selection metric
({_esc(select_metric)}), one line or point per finished run.</p>{sweep_html}</section>
<section id="pareto"><h2>Classification vs localisation</h2>{pareto_html}</section>
<section id="gallery"><h2>CAM gallery</h2><p class="note">Overlays logged by the selected runs of each method.</p>{gallery}</section>
"""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(page_title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="weakbench"><link rel="icon" href="data:,">'
            f"<style>{_CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{body}<script>{_SORT_JS}</script></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return {"rows": lb.num_rows, "bar_charts": len(bars), "sweeps": len(sweeps), "pareto_charts": len(pareto),
            "images": n_img, "bytes": len(page.encode())}


def leaderboard_json(lb: pa.Table) -> str:
    """The leaderboard as JSON rows (for scripts that want the numbers without HTML)."""
    return json.dumps(lb.to_pylist(), default=str)


__all__: Sequence[str] = ("build_dashboard", "pareto_front", "run_link", "leaderboard_html")
