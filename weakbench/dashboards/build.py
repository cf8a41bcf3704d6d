"""One self-contained HTML dashboard from the results table.

Sections (each a ``<section>`` with a stable id, used by the browser test):

* ``#boards`` — one board per headline metric (:func:`weakbench.platform.leaderboard.board_tables`:
  the CAM methods and the trivial baselines on ``max_box_acc_v2``, BBAM on
  ``pseudo_masks/instance_miou``, CCGR on ``mask_rcnn/map_r50``), each a ``<section
  class="board">`` holding, read at a glance from left to right: the row (method, backbone,
  dataset; trivial baselines in grey with a *baseline* badge, flagged rows in red with a *flagged*
  badge), the **verdict** (its paired verdicts over test images and seeds, Holm-corrected over
  the board, where it has per-image results; else against the baseline a row must beat, over
  seeds), mechanism flags in words under it, the **headline** test metric (mean ± std [95 %
  interval]), images · seeds / trials with what the interval covers, up to four more headline-family scores, the
  validation mean that selected, the comparison with ``--baseline`` where that method is on the
  board, cost and MLflow run links; under it the board's legend
  (:func:`weakbench.platform.leaderboard.legend`), a chart of the table's scores with their
  intervals (diagnostics — thresholds, counts — never charted), and a folded table of every
  reported metric, diagnostics included; a ranking-disagreement note (MaxBoxAcc vs MaxBoxAccV2)
  above the table where the two rank rows in opposite orders; then, with ``store_dir``, the
  ``#evaluation-board`` of ``weakbench evaluate`` rows (seed-free, :func:`evaluation_html`);
* ``#sweeps`` — per sweep, over **every** trial that reported the sweep's selecting metric
  (finished, stopped early by the scheduler, failed; last reported value, each status with its
  own marker): an optimisation history (trial value in start order and the best finished value so
  far), per-epoch validation curves read from MLflow's metric history, a parallel-coordinates
  plot (hyperparameters and status → metric) and parameter-vs-metric scatter plots;
* ``#pareto`` — classification versus localisation, one point per configuration (means over
  seeds on the validation split), Pareto front drawn;
* ``#gallery`` — CAM overlays (``overlays/*.png`` artifacts) of each method's selected runs,
  embedded as base64 ``data:`` URIs.

Board content is gathered in one place, :func:`board_view`, from the board's records (its rows as
dicts): a column the leaderboard adds is read there and nowhere else. Sweep content is gathered
by :func:`sweep_views`.

Plotly's JavaScript is inlined once, so the file works offline. Every user-provided string
(run names, tags, parameter values, method and dataset names) is HTML-escaped before it reaches
the page or a Plotly label (Plotly renders a subset of HTML in text).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from weakbench.core import conventions as C
from weakbench.core.io import atomic_write_text
from weakbench.methods import metric_declarations as D
from weakbench.platform.leaderboard import (MIN_SEEDS_BEYOND_NOISE, board_tables, build_boards, build_leaderboard,
                                            format_stat, leaderboard_metrics, legend, ranking_disagreements, title,
                                            trivial_cell, verdicts_cell)
from weakbench.platform.leaderboard import _value_ci  # the CLI's "value [interval]" cell, shared
from weakbench.methods.metric_declarations import higher_is_better
from weakbench.platform.results import metric_columns, param_columns

MAX_SWEEPS = 30
#: most trials per sweep whose metric history is read from MLflow (one request each)
MAX_CURVES = 100
#: most scores in a board's table and chart (the headline included); the rest are in its folded table
MAX_TABLE_SCORES = 5
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
MAX_OVERLAY_BYTES = 2_000_000
#: tag :mod:`weakbench.platform.engine` sets on a run the scheduler (ASHA) stopped early (ended KILLED)
TAG_STOPPED = "weakbench.stopped"
_esc = html.escape


def _fig_html(fig: Any, div_id: str, height: int = 420, top: int = 60) -> str:
    fig.update_layout(height=height, margin=dict(l=70, r=40, t=top, b=60), template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def run_link(mlflow_ui_url: str | None, experiment_id: str | None, run_id: str) -> str:
    """An ``<a>`` to the run page of the MLflow UI (or a plain ``<code>`` when no UI URL is known)."""
    text = _esc(run_id[:8])
    if not mlflow_ui_url or not experiment_id:
        return f'<code title="{_esc(run_id)}">{text}</code>'
    href = f"{mlflow_ui_url.rstrip('/')}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs/{urllib.parse.quote(run_id)}"
    return f'<a class="run" href="{_esc(href)}" title="{_esc(run_id)}" target="_blank" rel="noopener">{text}</a>'


def _display(key: str) -> str:
    """The paper's name of a metric key (``"MaxBoxAccV2"``), the key itself when undeclared."""
    spec = D.lookup(key)
    return spec.display if spec else key


# ---------------------------------------------------------------------- boards: what the page shows
@dataclasses.dataclass
class BoardView:
    """Everything the page shows of one board, gathered by :func:`board_view`.

    Attributes:
        select_metric: the validation key that selected (``"val/max_box_acc_v2"``).
        primary: the reported headline key (``"test/max_box_acc_v2"``).
        title, legend: the board's title and the line under it (:mod:`weakbench.platform.leaderboard`).
        scores: reported score keys shown in the table and charted, the headline first (at most
            :data:`MAX_TABLE_SCORES`): the headline, its box-filled baseline (BBAM, CCGR), then
            the declared scores of :data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER`.
        others: the other reported score keys (variants, rounds, gains): folded table only.
        diagnostics: reported keys with no better direction (thresholds, counts) or undeclared:
            folded table only, never charted.
        baseline_method: the ``--baseline`` method; ``show_baseline``: whether it is on this board.
        against: what a row's verdict compares it with, for the verdict column's header.
        rows: the board's records (:meth:`pyarrow.Table.to_pylist` of the leaderboard), each with
            ``_label`` (``"cam / resnet18"``, `` / dataset`` added when the board spans several),
            ``_role`` (``"baseline"`` for a trivial baseline, else ``"method"``), ``_flags`` (list of
            str: the row's own ``flags`` when the leaderboard gives them, and ``below_trivial``'s
            verdict), ``_verdict`` (the row's ``verdict`` when given, else
            :func:`~weakbench.platform.leaderboard.trivial_cell`), ``_verdicts`` (list of str: the
            row's paired verdicts over test images and seeds, Holm-corrected over the board,
            :func:`~weakbench.platform.leaderboard.verdicts_cell` one per line; empty without
            per-image results), ``_noise`` (what its intervals cover, the row's ``noise``),
            ``_counts`` (``"200 images · 3 seeds / 4 trials"``) and ``_vs_baseline`` (the paired
            comparison with ``baseline_method``, text).
        paired: whether any row has paired verdicts over test images and seeds.
        disagreements: the headline family's ranking disagreements in words
            (:func:`~weakbench.platform.leaderboard.ranking_disagreements`), shown apart from the legend.
    """

    select_metric: str
    primary: str
    title: str
    legend: str
    scores: list[str]
    others: list[str]
    diagnostics: list[str]
    baseline_method: str
    show_baseline: bool
    against: str
    rows: list[dict[str, Any]]
    paired: bool = False
    disagreements: list[str] = dataclasses.field(default_factory=list)


def board_view(lb: pa.Table) -> BoardView:
    """Gather one board for the page from its records (the one place the dashboard reads a
    leaderboard's columns; see :class:`BoardView`)."""
    meta = {k.decode(): v.decode() for k, v in (lb.schema.metadata or {}).items()}
    reported = leaderboard_metrics(lb)
    primary = meta.get("weakbench.primary_metric") or (reported[0] if reported else "")
    box = meta.get("weakbench.box_baseline_metric", "")
    scores, others, diagnostics = [], [], []
    for m in reported:
        spec = D.lookup(m)
        if spec is None or spec.direction is None:
            diagnostics.append(m)
        elif m == primary or m == box or (not spec.base and spec.name in D.DISPLAY_ORDER):
            scores.append(m)
        else:
            others.append(m)
    others = scores[MAX_TABLE_SCORES:] + others
    scores = scores[:MAX_TABLE_SCORES]
    base = meta.get("weakbench.baseline_method", "cam")
    records = lb.to_pylist()
    several = len({r["dataset"] for r in records}) > 1
    for r in records:
        r["_label"] = f"{r['method']} / {r['backbone']}" + (f" / {r['dataset']}" if several else "")
        r["_role"] = "baseline" if r["method"] in C.TRIVIAL_BASELINES else "method"
        flags = r.get("flags") or []
        flags = [flags] if isinstance(flags, str) else [str(f) for f in flags]
        if r.get("below_trivial"):
            flags.append(r.get("trivial_verdict") or "below the trivial baseline")
        r["_flags"] = flags
        r["_verdict"] = r.get("verdict") or trivial_cell(r)
        r["_verdicts"] = [line for line in verdicts_cell(r).split("\n") if line]
        r["_noise"] = r.get("noise") or "seeds only (no per-image results: test images held fixed)"
        images = f"{r['n_images']} images" if r.get("n_images") else "— images"
        r["_counts"] = f"{images} · {r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''} / {r['n_trials']} trials"
        diff = _num(r.get("baseline_diff_mean"))
        vs = r.get("baseline_verdict") or ""
        if not math.isnan(diff):
            vs = f"{diff:+.2f}"
            if not math.isnan(_num(r.get("baseline_diff_ci_low"))):
                vs += f" [{r['baseline_diff_ci_low']:+.1f}, {r['baseline_diff_ci_high']:+.1f}]"
            vs += f" — {r.get('baseline_verdict')}"
        r["_vs_baseline"] = vs
    boxed = any(r.get("trivial_baseline") == "box_filled" for r in records)
    disagreements = ranking_disagreements(lb)
    line = legend(lb)
    for d in disagreements:  # shown in their own note above the table
        line = line.replace(f" Disagreement: {d}.", "")
    paired = any(r["_verdicts"] for r in records)
    return BoardView(
        select_metric=meta.get("weakbench.select_metric", ""), primary=primary, title=title(lb), legend=line,
        scores=scores, others=others, diagnostics=diagnostics, baseline_method=base,
        show_baseline=any(r["method"] == base for r in records),
        against="vs each row's box-filled masks" if boxed else "vs best trivial baseline", rows=records,
        paired=paired, disagreements=disagreements)


def _stat(r: dict[str, Any], m: str) -> tuple[float, str]:
    return _num(r.get(f"{m}.mean")), format_stat(r.get(f"{m}.mean"), r.get(f"{m}.std"), r.get(f"{m}.ci_low"),
                                                 r.get(f"{m}.ci_high"))


def _metric_head(m: str, diagnostic: bool = False) -> str:
    return (f'{_esc(_display(m))}{" (diagnostic)" if diagnostic else ""}<br>'
            f'<span class="key">{_esc(m)}</span>')


def _row_open(r: dict[str, Any]) -> str:
    cls = ["baseline"] if r["_role"] == "baseline" else []
    if r["_flags"]:
        cls.append("flagged")
    if r.get("below_trivial"):
        cls.append("below-trivial")
    attrs = f' data-method="{_esc(r["method"])}" data-role="{r["_role"]}"'
    attrs += ' data-flagged="1"' if r["_flags"] else ""
    attrs += ' data-below-trivial="1"' if r.get("below_trivial") else ""
    return f'<tr class="{" ".join(cls)}"{attrs}>' if cls else f"<tr{attrs}>"


def _td(sort: Any, inner: str, cls: str = "") -> str:
    key = sort if isinstance(sort, str) else ("" if sort is None or math.isnan(sort) else repr(float(sort)))
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-sort="{_esc(str(key))}">{inner}</td>'


def leaderboard_html(board: BoardView | pa.Table, mlflow_ui_url: str | None, table_id: str = "leaderboard-table") -> str:
    """The board's sortable table (a :class:`BoardView`, or a leaderboard table gathered with
    :func:`board_view`): the row and the verdict first, then the headline (see the module docstring)."""
    v = board if isinstance(board, BoardView) else board_view(board)
    verdict_head = ("verdict: paired over test images and seeds, Holm over the board" if v.paired
                    else f"verdict: {v.against}")
    heads = [("method", "row"), (_esc(verdict_head), "verdict"),
             (_metric_head(v.primary) + " · headline", "headline"),
             ('images · seeds / trials<br><span class="key">interval covers</span>', "counts")]
    heads += [(_metric_head(m), "") for m in v.scores[1:]] + [(_esc(f"{v.select_metric} (mean, selects)"), "")]
    heads += [(_esc(f"vs {v.baseline_method} (paired)"), "vs")] if v.show_baseline else []
    heads += [("GPU-h / CPU-h", ""), ("MLflow runs", "")]
    out = [f'<div class="scroll"><table id="{_esc(table_id)}" class="sortable board-table"><thead><tr>']
    for i, (h, c) in enumerate(heads):
        out.append(f'<th data-col="{i}"' + (f' class="{c}"' if c else "") + f' title="click to sort">{h}</th>')
    out.append("</tr></thead><tbody>")
    for r in v.rows:
        badges = "".join(f'<span class="badge {b}">{b}</span>' for b in
                         (["baseline"] if r["_role"] == "baseline" else []) + (["flagged"] if r["_flags"] else []))
        where = _esc(r["backbone"]) + " · " + _esc(r["dataset"])
        diag = "".join(f'<div class="sub diag">{_esc(d)}</div>' for d in (r.get("diagnostics") or []))
        cells = [_td(r["method"], f'<b>{_esc(r["method"])}</b>{badges}<br><span class="sub">{where}</span>{diag}', "row")]
        flags = "".join(f'<div class="flag">⚑ {_esc(f)}</div>' for f in r["_flags"] if f != r.get("trivial_verdict"))
        verdict = "".join(f'<div class="paired">{_esc(line)}</div>' for line in r["_verdicts"]) if r["_verdicts"] \
            else _esc(r["_verdict"])
        if r["_verdicts"] and r.get("trivial_verdict") == "is the best trivial baseline":
            verdict = _esc(r["trivial_verdict"]) + verdict
        cells.append(_td(_num(r.get("trivial_diff_mean")), verdict + flags, "verdict"))
        mean, text = _stat(r, v.primary)
        cells.append(_td(mean, _esc(text), "headline"))
        cells.append(_td(float(r["n_seeds"]), _esc(r["_counts"]) + (f" ({r['n_failed']} failed)" if r.get("n_failed") else "")
                         + f'<br><span class="sub noise">{_esc(r["_noise"])}</span>', "counts"))
        for m in v.scores[1:]:
            mean, text = _stat(r, m)
            cells.append(_td(mean, _esc(text)))
        cells.append(_td(_num(r.get("select_mean")), _fmt(_num(r.get("select_mean")))))
        if v.show_baseline:
            cells.append(_td(_num(r.get("baseline_diff_mean")), _esc(r["_vs_baseline"]), "vs"))
        cells.append(_td(_num(r.get("cpu_hours")), f"{_fmt(_num(r.get('gpu_hours')))} / {_fmt(_num(r.get('cpu_hours')))}"))
        links = " ".join(run_link(mlflow_ui_url, r.get("experiment_id"), rid) for rid in r["run_ids"])
        out.append(_row_open(r) + "".join(cells) + f'<td class="runs">{links}</td></tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


def all_metrics_html(v: BoardView) -> str:
    """A folded table of every reported metric of the board, diagnostics (thresholds, counts)
    included and marked."""
    keys = v.scores + v.others + v.diagnostics
    diag = set(v.diagnostics)
    head = "".join(f'<th class="{"diag" if m in diag else ""}">{_metric_head(m, m in diag)}</th>' for m in keys)
    body = []
    for r in v.rows:
        cells = "".join(f'<td class="{"diag" if m in diag else ""}">{_esc(_stat(r, m)[1])}</td>' for m in keys)
        body.append(f"{_row_open(r)}<td>{_esc(r['_label'])}</td>{cells}</tr>")
    return (f'<details class="all-metrics"><summary>every reported metric ({len(keys)}: {len(v.scores) + len(v.others)} '
            f'scores, {len(diag)} diagnostics)</summary><div class="scroll"><table class="plain"><thead><tr><th>row</th>'
            f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div></details>')


def evaluation_html(lb: pa.Table, mlflow_ui_url: str | None, experiment_ids: Mapping[str, str] | None = None) -> str:
    """The board of ``weakbench evaluate`` runs (:func:`~weakbench.platform.leaderboard.build_evaluation_board`:
    seed-free rows over every image of a dataset, no split, no selection) as a sortable table: the
    row, its paired verdicts (Holm over the dataset's comparisons), the headline value [95 % interval
    over the images], the number of images and what the interval covers, up to three more
    headline-family values, flags and the run link. ``experiment_ids``: ``{run id: MLflow
    experiment id}`` for the links."""
    meta = {k.decode(): v.decode() for k, v in (lb.schema.metadata or {}).items()}
    primary = meta.get("weakbench.primary_metric", "")
    names = [c[: -len(".mean")] for c in lb.column_names if c.endswith(".mean")]
    names = [primary] + [n for n in names if n != primary and (spec := D.lookup(n)) is not None
                         and spec.direction is not None and not spec.base and spec.name in D.DISPLAY_ORDER][:3]
    heads = [("row", "row"), ("verdict: paired over the images, Holm over the dataset", "verdict"),
             (_metric_head(primary) + " · headline", "headline"),
             ('images<br><span class="key">interval covers</span>', "counts")]
    heads += [(_metric_head(m), "") for m in names[1:]] + [("MLflow run", "")]
    out = ['<div class="scroll"><table id="evaluation-table" class="sortable eval-table"><thead><tr>']
    out += [f'<th data-col="{i}"' + (f' class="{c}"' if c else "") + f' title="click to sort">{h}</th>'
            for i, (h, c) in enumerate(heads)]
    out.append("</tr></thead><tbody>")
    for r in lb.to_pylist():
        role = "baseline" if r["method"] in C.TRIVIAL_BASELINES else "method"
        flags = [str(f) for f in (r.get("flags") or [])]
        lines = [line for line in verdicts_cell(r).split("\n") if line]
        badges = "".join(f'<span class="badge {b}">{b}</span>' for b in
                         (["baseline"] if role == "baseline" else []) + (["flagged"] if flags else []))
        cells = [_td(r["method"], f'<b>{_esc(r["method"])}</b>{badges}<br><span class="sub">'
                                  f'{_esc(r["backbone"])} · {_esc(r["dataset"])}</span>', "row")]
        verdict = "".join(f'<div class="paired">{_esc(line)}</div>' for line in lines) or \
            ('<span class="sub">no declared comparison</span>' if role == "method" else "trivial baseline")
        verdict += "".join(f'<div class="flag">⚑ {_esc(f)}</div>' for f in flags)
        cells.append(_td(lines[0] if lines else "", verdict, "verdict"))
        value = lambda m: (_num(r.get(f"{m}.mean")), _value_ci(r.get(f"{m}.mean"), r.get(f"{m}.ci_low"), r.get(f"{m}.ci_high")))
        mean, text = value(primary)
        cells.append(_td(mean, _esc(text), "headline"))
        cells.append(_td(float(r.get("n_images") or 0), f"{r.get('n_images') or '—'} images · one run"
                                                        f'<br><span class="sub noise">{_esc(r.get("noise") or "")}</span>',
                         "counts"))
        for m in names[1:]:
            mean, text = value(m)
            cells.append(_td(mean, _esc(text)))
        exp = (experiment_ids or {}).get(r["run_id"])
        cells.append(f'<td class="runs">{run_link(mlflow_ui_url, exp, r["run_id"])}</td>')
        attrs = f' data-method="{_esc(r["method"])}" data-role="{role}"' + (' data-flagged="1"' if flags else "")
        cls = " ".join((["baseline"] if role == "baseline" else []) + (["flagged"] if flags else []))
        out.append(f'<tr{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}{attrs}>' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


_ROLE_COLOUR = {"method": "#3b6fd8", "baseline": "#9aa1ad", "flagged": "#d0394d"}


def board_chart(v: BoardView, div_id: str) -> str:
    """One figure per board: a panel per score of its table (never a diagnostic), one bar per row
    (blue: method; grey: trivial baseline; red: flagged), error bars = the row's 95 % interval."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = v.rows
    colours = [_ROLE_COLOUR["flagged"] if r["_flags"] else _ROLE_COLOUR[r["_role"]] for r in rows]
    fig = make_subplots(rows=1, cols=len(v.scores), subplot_titles=[_esc(_display(m)) for m in v.scores])
    for j, m in enumerate(v.scores, start=1):
        mean = np.array([_num(r.get(f"{m}.mean")) for r in rows])
        lo = np.array([_num(r.get(f"{m}.ci_low")) for r in rows])
        hi = np.array([_num(r.get(f"{m}.ci_high")) for r in rows])
        fig.add_trace(go.Bar(
            x=[_esc(r["_label"]) for r in rows], y=mean, marker_color=colours, showlegend=False,
            error_y=dict(type="data", symmetric=False, array=np.nan_to_num(hi - mean).tolist(),
                         arrayminus=np.nan_to_num(mean - lo).tolist(), visible=True),
            customdata=[[r["n_seeds"], _fmt(_num(r.get(f"{m}.ci_low"))), _fmt(_num(r.get(f"{m}.ci_high")))] for r in rows],
            hovertemplate="%{x}<br>mean %{y:.2f}<br>95% interval [%{customdata[1]}, %{customdata[2]}]<br>"
                          "seeds %{customdata[0]}<extra>" + _esc(m) + "</extra>"), row=1, col=j)
    fig.update_layout(title=_esc(f"{v.primary.split('/')[0]} scores with 95 % intervals (blue: method, grey: "
                                 f"baseline, red: flagged)"))
    return _fig_html(fig, div_id, 290, top=70)


# ---------------------------------------------------------------------- sweeps: every trial
@dataclasses.dataclass
class TrialView:
    """One trial of a sweep as the sweep plots show it.

    Attributes:
        status: ``"finished"``, ``"stopped early"`` (by the scheduler: KILLED with the tag
            :data:`TAG_STOPPED`), ``"interrupted"`` (KILLED with ``weakbench.interrupted``),
            ``"killed"`` (KILLED, no MLflow tags read), ``"failed"``.
        value: the last reported value of the sweep's metric (NaN when none).
        history: ``[(step, value), …]`` of that metric from MLflow (steps are epochs), empty when
            not read.
    """

    run_id: str
    name: str
    status: str
    start: int
    params: dict[str, Any]
    value: float
    history: list[tuple[int, float]]


@dataclasses.dataclass
class SweepView:
    """One sweep: its method, dataset, selecting metric (``metric``, a ``val/`` key), trials in
    start order, and ``curves_note`` (why no curves were read, ``""`` when they were)."""

    sweep_id: str
    method: str
    dataset: str
    metric: str
    trials: list[TrialView]
    curves_note: str


_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}
_STATUS_STYLE = {  # marker symbol, colour, line dash
    "finished": ("circle", "#3b6fd8", "solid"), "stopped early": ("x", "#e08a1e", "dash"),
    "interrupted": ("diamond-open", "#7a5bc4", "dot"), "killed": ("x", "#e08a1e", "dash"),
    "failed": ("triangle-down", "#d0394d", "dot"),
}


def _mlflow_sweep(tracking_uri: str | None, experiment_ids: list[str], sweep_id: str, run_ids: list[str],
                  key: str) -> tuple[dict[str, dict[str, str]], dict[str, list[tuple[int, float]]], str]:
    """Tags and ``key``'s metric history of a sweep's runs from MLflow: ``(tags by run, history by
    run, note)``; the note says why nothing was read (no tracking URI, unreachable store)."""
    if not tracking_uri:
        return {}, {}, "no MLflow tracking URI given: per-epoch curves need the metric history"
    try:
        from weakbench.platform.tracking import client_for

        client = client_for(tracking_uri)
        wanted = set(run_ids)
        tags: dict[str, dict[str, str]] = {}
        safe = sweep_id.replace("'", "")
        if safe == sweep_id and experiment_ids:
            for run in client.search_runs(experiment_ids, filter_string=f"tags.`{C.TAG_SWEEP_ID}` = '{safe}'",
                                          max_results=5000):
                if run.info.run_id in wanted:
                    tags[run.info.run_id] = dict(run.data.tags)
        hist = {}
        for rid in run_ids[:MAX_CURVES]:
            hist[rid] = sorted((int(m.step), float(m.value)) for m in client.get_metric_history(rid, key))
        note = "" if len(run_ids) <= MAX_CURVES else f"curves of the first {MAX_CURVES} trials only"
        return tags, hist, note
    except Exception as e:  # noqa: BLE001 - an unreachable store must not break the dashboard
        return {}, {}, f"MLflow metric history not read ({type(e).__name__}: {str(e)[:120]})"


def sweep_views(table: pa.Table, tracking_uri: str | None = None, select_metric: str | None = None) -> list[SweepView]:
    """Per sweep (newest first, at most :data:`MAX_SWEEPS`): every terminal trial whose last
    reported values include the sweep's selecting metric — ``select_metric`` when the sweep logged
    it, else its method's headline (:func:`~weakbench.methods.metric_declarations.default_select_metric`)
    — with its status and, from MLflow at ``tracking_uri``, its per-epoch history."""
    if table.num_rows == 0:
        return []
    metrics = metric_columns(table)
    params = param_columns(table)
    sweeps = table["sweep_id"].fill_null("").to_numpy(zero_copy_only=False)
    starts = table["start_time"].cast(pa.int64()).fill_null(0).to_numpy()
    names = table["run_name"].fill_null("").to_pylist()
    ids = table["run_id"].to_pylist()
    status = table["status"].fill_null("").to_pylist()
    methods = table["method"].fill_null("").to_pylist()
    datasets = table["dataset"].fill_null("").to_pylist()
    exps = table["experiment_id"].fill_null("").to_pylist()
    order = sorted(set(sweeps.tolist()), key=lambda s: -int(starts[sweeps == s].max()))[:MAX_SWEEPS]
    out = []
    for sweep in order:
        idx = np.nonzero(sweeps == sweep)[0]
        method = methods[idx[0]]
        key = select_metric if select_metric and np.any(~np.isnan(metrics.get(select_metric, np.array([np.nan]))[idx])) \
            else (D.default_select_metric(method) if method else D.DEFAULT_SELECT_METRIC)
        values = metrics.get(key, np.full(table.num_rows, np.nan))
        idx = sorted((i for i in idx.tolist() if not math.isnan(values[i])), key=lambda i: (starts[i], names[i]))
        if not idx:
            continue
        run_ids = [ids[i] for i in idx]
        tags, hist, note = _mlflow_sweep(tracking_uri, sorted({exps[i] for i in idx if exps[i]}), sweep, run_ids, key)
        trials = []
        for i in idx:
            st = _STATUS.get(status[i], status[i].lower())
            t = tags.get(ids[i], {})
            if st == "killed" and t.get(TAG_STOPPED):
                st = "stopped early"
            elif st == "killed" and t.get(C.TAG_INTERRUPTED):
                st = "interrupted"
            trials.append(TrialView(ids[i], names[i] or ids[i][:8], st, int(starts[i]),
                                    {k: v[i] for k, v in params.items() if v[i] is not None},
                                    float(values[i]), hist.get(ids[i], [])))
        out.append(SweepView(sweep, method, datasets[idx[0]], key, trials, note))
    return out


def _param_axes(trials: list[TrialView]) -> list[tuple[str, np.ndarray, list[str] | None]]:
    """Hyperparameters that vary over ``trials``: ``(name, values float, ticktext or None)``.
    Numeric strings become floats; other strings are coded 0..k-1 with their names as tick text."""
    axes = []
    for name in sorted({k for t in trials for k in t.params}):
        if name == "seed":
            continue
        raw = [t.params.get(name) for t in trials]
        if len(set(raw)) < 2:
            continue
        try:
            axes.append((name, np.array([math.nan if v is None else float(v) for v in raw]), None))
        except ValueError:
            cats = sorted({str(v) for v in raw})
            code = {c: i for i, c in enumerate(cats)}
            axes.append((name, np.array([code[str(v)] for v in raw], dtype=float), cats))
    return axes


def _counts(trials: list[TrialView]) -> str:
    c: dict[str, int] = {}
    for t in trials:
        c[t.status] = c.get(t.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(c.items(), key=lambda kv: list(_STATUS_STYLE).index(kv[0])
                                                      if kv[0] in _STATUS_STYLE else 99))


def sweep_charts(sw: SweepView, k: int) -> list[str]:
    """The plots of one sweep (see the module docstring), as HTML divs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    trials, m = sw.trials, sw.metric
    hib = higher_is_better(m)
    divs = []
    # optimisation history: every trial's last value in start order, best finished value so far
    fig = go.Figure()
    for st in [s for s in _STATUS_STYLE if any(t.status == s for t in trials)]:
        pts = [(n, t) for n, t in enumerate(trials, start=1) if t.status == st]
        sym, col, _ = _STATUS_STYLE[st]
        fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=[t.value for _, t in pts], mode="markers", name=st,
                                 marker=dict(symbol=sym, color=col, size=9, line=dict(width=1.5, color=col)),
                                 text=[_esc(t.name) for _, t in pts],
                                 hovertemplate="trial %{x}: %{text}<br>%{y:.2f}<extra>" + st + "</extra>"))
    best, xs, ys = None, [], []
    for n, t in enumerate(trials, start=1):
        if t.status == "finished":
            best = t.value if best is None else (max if hib else min)(best, t.value)
        if best is not None:
            xs.append(n)
            ys.append(best)
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line_shape="hv", name="best finished so far",
                                 line=dict(color="#1d2330", width=2)))
    fig.update_layout(title=_esc(f"optimisation history: {m}, last value per trial"),
                      xaxis_title="trial (in start order)", yaxis_title=_esc(m))
    pair = [_fig_html(fig, f"history-{k}", 340)]
    # per-epoch validation curves from MLflow
    if any(t.history for t in trials):
        fig = go.Figure()
        shown: set[str] = set()
        for t in trials:
            if not t.history:
                continue
            sym, col, dash = _STATUS_STYLE.get(t.status, _STATUS_STYLE["killed"])
            fig.add_trace(go.Scatter(x=[s for s, _ in t.history], y=[v for _, v in t.history], mode="lines+markers",
                                     name=t.status, legendgroup=t.status, showlegend=t.status not in shown,
                                     line=dict(color=col, dash=dash, width=1.5), marker=dict(size=5), opacity=0.8,
                                     hovertemplate=_esc(t.name) + "<br>epoch %{x}: %{y:.2f}<extra>" + t.status + "</extra>"))
            shown.add(t.status)
        fig.update_layout(title=_esc(f"validation curves: {m} per epoch"), xaxis_title="epoch", yaxis_title=_esc(m))
        if max(s for t in trials for s, _ in t.history) <= 20:
            fig.update_xaxes(dtick=1)
        pair.append(_fig_html(fig, f"curves-{k}", 340))
    divs.append(f'<div class="pair">{"".join(pair)}</div>')
    axes = _param_axes(trials)[:12]
    if axes:
        values = [t.value for t in trials]
        sts = sorted({t.status for t in trials})
        dims = []
        for name, vals, cats in axes:
            d = dict(label=_esc(name), values=np.nan_to_num(vals, nan=-1).tolist())
            if cats is not None:
                d.update(tickvals=list(range(len(cats))), ticktext=[_esc(c) for c in cats])
            dims.append(d)
        if len(sts) > 1:
            dims.append(dict(label="status", values=[sts.index(t.status) for t in trials],
                             tickvals=list(range(len(sts))), ticktext=sts))
        dims.append(dict(label=_esc(m), values=values))
        fig = go.Figure(go.Parcoords(line=dict(color=values, colorscale="Viridis", showscale=True), dimensions=dims))
        fig.update_layout(title=_esc(f"hyperparameters → {m} ({len(trials)} trials)"))
        divs.append(_fig_html(fig, f"parcoords-{k}", 420, top=110))  # room for the axis labels above
        shown_axes = axes[:6]
        sc = make_subplots(rows=1, cols=len(shown_axes), shared_yaxes=True,
                           subplot_titles=[_esc(n) for n, _, _ in shown_axes])
        for j, (name, vals, cats) in enumerate(shown_axes, start=1):
            for st in [s for s in _STATUS_STYLE if any(t.status == s for t in trials)]:
                sel = [i for i, t in enumerate(trials) if t.status == st]
                sym, col, _ = _STATUS_STYLE[st]
                sc.add_trace(go.Scatter(x=vals[sel].tolist(), y=[trials[i].value for i in sel], mode="markers",
                                        text=[_esc(trials[i].name) for i in sel], name=st, legendgroup=st,
                                        showlegend=j == 1, marker=dict(size=8, symbol=sym, color=col, opacity=0.8),
                                        hovertemplate="%{text}<br>%{x}: %{y:.2f}<extra>" + st + "</extra>"), row=1, col=j)
            if cats is not None:
                sc.update_xaxes(tickvals=list(range(len(cats))), ticktext=[_esc(c) for c in cats], row=1, col=j)
            elif np.nanmin(vals) > 0 and np.nanmax(vals) / np.nanmin(vals) > 50:
                sc.update_xaxes(type="log", row=1, col=j)
        sc.update_yaxes(title_text=_esc(m), row=1, col=1)
        sc.update_layout(title=_esc(f"parameter vs {m}"))
        divs.append(_fig_html(sc, f"scatter-{k}", 330))
    return divs


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


def pareto_charts(table: pa.Table, select_metric: str, first_id: int = 0) -> list[str]:
    """Classification (``val/cls_acc`` or ``val/cls_map``) versus localisation (``select_metric``),
    one point per configuration (mean over seeds on the selection split), Pareto front as a line;
    one chart per dataset, ``div`` ids ``pareto-<first_id + n>``."""
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
        divs.append(_fig_html(fig, f"pareto-{first_id + n}"))
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


def gallery_html(table: pa.Table, rows: Sequence[dict[str, Any]], tracking_uri: str | None,
                 mlflow_ui_url: str | None, per_method: int = 8) -> tuple[str, int]:
    """CAM overlays of each board row's selected runs (``rows``: the boards' records, up to
    ``per_method`` images per method), as base64 PNG data URIs. Returns ``(html, number of images)``."""
    by_id = {r: i for i, r in enumerate(table["run_id"].to_pylist())}
    overlays = table["overlay_uris"].to_pylist()
    names = table["run_name"].to_pylist()
    parts, n_img = [], 0
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
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
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;color:#c9cfdd;font-size:13px}nav a{color:#9fc3ff;margin-right:14px;font-size:13px}
section{background:#fff;margin:14px 16px;padding:14px 18px;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section.board{margin:14px 0 0;padding:0;box-shadow:none}
h2{font-size:18px;margin:0 0 8px}h3{font-size:15px;margin:14px 0 6px}.note{color:#566;font-size:13px}
table.sortable,table.plain{border-collapse:collapse;width:100%;font-size:13px}
table.sortable th,table.plain th{background:#eef1f7;text-align:left;padding:6px 8px;white-space:nowrap;vertical-align:bottom}
table.sortable th{cursor:pointer}
table.sortable th.asc::after{content:" ▲"}table.sortable th.desc::after{content:" ▼"}
table.sortable td,table.plain td{padding:5px 8px;border-top:1px solid #e4e7ee;white-space:nowrap;vertical-align:top}
th .key{font-weight:normal;color:#667;font-family:monospace;font-size:11px}
td.row{position:sticky;left:0;background:#fff;z-index:1}th.row{position:sticky;left:0;z-index:2}
table.sortable td.verdict{white-space:normal;min-width:190px;max-width:270px}th.verdict{background:#e3e9f7}
td.headline{font-weight:600;background:#f3f6fd}th.headline{background:#dde6f9}
table.sortable td.vs{white-space:normal;min-width:160px;max-width:240px;color:#445}
.sub{color:#667;font-size:11px}.flag{color:#b00020;font-size:12px;margin-top:2px}
.badge{display:inline-block;font-size:10px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;
padding:1px 5px;border-radius:3px;margin-left:6px;vertical-align:1px}
.badge.baseline{background:#e4e6ea;color:#4c5361}.badge.flagged{background:#fde3e6;color:#b00020}
tr.baseline td{background:#f4f5f7;color:#4c5361;font-style:italic}tr.baseline td.row{background:#f4f5f7}
tr.flagged td{background:#fff4f4}tr.flagged td.row{background:#fff4f4;box-shadow:inset 4px 0 0 #d0394d}
tr.flagged td.verdict{color:#b00020}
td.verdict .paired{margin-bottom:2px}.disagree{background:#fff7e0;border-left:4px solid #e0a100;padding:4px 8px;
font-size:13px;margin:4px 0}table.sortable td.counts{white-space:normal;min-width:150px;max-width:210px}
section.eval-board{margin:18px 0 0}
table.sortable tr:hover td{background:#f8faff}td.runs a,td.runs code{margin-right:6px;font-family:monospace}
td.diag,th.diag{color:#778}details.all-metrics{margin:8px 0 4px;font-size:13px}details summary{cursor:pointer;color:#345}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:170px;font-size:11px;color:#445;overflow-wrap:anywhere}
figure img{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;border:1px solid #dde;background:#000}
.empty{color:#888;font-style:italic}.scroll{overflow-x:auto}.plotly-graph-div{overflow:hidden;max-width:100%}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}@media (max-width:1000px){.pair{grid-template-columns:1fr}}
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
    select_metric: str | None = None,
    report_split: str = "test",
    baseline_method: str = "cam",
    tracking_uri: str | None = None,
    mlflow_ui_url: str | None = None,
    page_title: str = "weakbench — leaderboard and sweeps",
    n_boot: int = 2000,
    per_image: Mapping[str, Any] | None = None,
    store_dir: Path | None = None,
) -> dict[str, int]:
    """Write the dashboard HTML for ``table`` (one row per run) to ``out`` (atomically).

    Args:
        table: results table (:func:`weakbench.platform.results.read_store`).
        out: output ``.html`` path (parent directories are created).
        select_metric: ``None`` (default): one board per headline metric
            (:func:`~weakbench.platform.leaderboard.board_tables`); a ``val/…`` key: one board
            ranked by it.
        report_split, baseline_method, n_boot: passed to
            :func:`~weakbench.platform.leaderboard.build_leaderboard`.
        per_image: ``{run id: per-image table}`` of the reported split
            (:func:`weakbench.platform.results.read_per_image`), for intervals over test images and
            seeds; ``None``: seed-only intervals (the rows say so). Ignored with ``store_dir``.
        store_dir: the results store ``table`` was read from: the boards are built as
            ``weakbench leaderboard`` builds them (:func:`~weakbench.platform.leaderboard.build_boards`:
            the store's per-image results, and the board of its ``weakbench evaluate`` runs,
            shown after the trial boards).
        tracking_uri: MLflow store to read the sweeps' metric histories and run tags from, and to
            download overlay artifacts that are not local files; ``None``: no per-epoch curves, and
            a KILLED trial reads "killed" (stopped early or interrupted, not told apart).
        mlflow_ui_url: base URL of the MLflow UI for run links; default: the tracking URI when it
            is ``http(s)``, else ``http://127.0.0.1:5000`` (where ``mlflow ui --backend-store-uri
            <tracking uri>`` serves a sqlite store); ``""`` shows run ids without links.

    Returns:
        counts of what was drawn: ``{"boards", "rows", "evaluation_rows", "bar_charts", "sweeps",
        "pareto_charts", "images", "bytes"}`` (``boards`` and ``rows``: the trial boards).

    Raises:
        ConfigError: ``select_metric`` is malformed, undeclared or a diagnostic (from
            :func:`~weakbench.platform.leaderboard.build_leaderboard`).
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
    parts = board_tables(table, select_metric)
    if store_dir is not None:
        built = build_boards(table, store_dir, select_metric=select_metric, report_split=report_split,
                             baseline_method=baseline_method, n_boot=n_boot)
    else:
        built = [build_leaderboard(part, select_metric=key, report_split=report_split, baseline_method=baseline_method,
                                   n_boot=n_boot, per_image=per_image) for key, part in parts]
    is_eval = [(lb.schema.metadata or {}).get(b"weakbench.kind") == b"evaluation" for lb in built]
    views = [board_view(lb) for lb, e in zip(built, is_eval) if not e]
    evaluations = [lb for lb, e in zip(built, is_eval) if e]
    sweeps = sweep_views(table, tracking_uri, select_metric)
    pareto: list[str] = []
    for key, part in parts:
        pareto += pareto_charts(part, key, len(pareto))
    rows = [r for v in views for r in v.rows]
    gallery, n_img = gallery_html(table, rows, tracking_uri, mlflow_ui_url)
    n_runs, n_failed = table.num_rows, int(pc.sum(pc.equal(table["status"], "FAILED")).as_py() or 0)

    boards_html = []
    for b, v in enumerate(views):
        table_id = "leaderboard-table" if b == 0 else f"leaderboard-table-{b}"
        legend_id = "leaderboard-legend" if b == 0 else f"leaderboard-legend-{b}"
        boards_html.append(
            f'<section class="board" id="board-{b}" data-select-metric="{_esc(v.select_metric)}">'
            f'<h3>{_esc(_display(v.primary))} board · {len(v.rows)} row{"s" if len(v.rows) != 1 else ""} · {_esc(v.title)}</h3>'
            + "".join(f'<p class="disagree">⚠ Ranking disagreement: {_esc(d)} (means only: the two metrics disagree; '
                      f'neither difference is tested).</p>' for d in v.disagreements)
            + f"{leaderboard_html(v, mlflow_ui_url, table_id)}"
            f'<p class="note legend" id="{legend_id}">{_esc(v.legend)}</p>'
            f'{all_metrics_html(v)}{board_chart(v, f"bar-{b}") if v.rows else ""}</section>')
    sweep_html = "".join(
        f'<div class="sweep"><h3>{_esc(f"sweep {sw.sweep_id[:12]} — {sw.method} on {sw.dataset}: {len(sw.trials)} trials ({_counts(sw.trials)})")}</h3>'
        + (f'<p class="note">{_esc(sw.curves_note)}</p>' if sw.curves_note else "")
        + "".join(sweep_charts(sw, k)) + "</div>"
        for k, sw in enumerate(sweeps)) or '<p class="empty">no trial reported its sweep\'s selecting metric</p>'
    exp_ids = dict(zip(table["run_id"].to_pylist(), table["experiment_id"].to_pylist())) \
        if "experiment_id" in table.column_names else {}
    n_eval = sum(lb.num_rows for lb in evaluations)
    for e, lb in enumerate(evaluations):
        boards_html.append(
            f'<section class="eval-board" id="evaluation-board{"" if e == 0 else f"-{e}"}" data-kind="evaluation">'
            f'<h3>Evaluations (weakbench evaluate) · {lb.num_rows} row{"s" if lb.num_rows != 1 else ""} · every image of '
            f'each dataset, no split, no selection, seed-free</h3>{evaluation_html(lb, mlflow_ui_url, exp_ids)}'
            f'<p class="note legend">Each row: the latest finished <code>weakbench evaluate</code> run of a '
            f'configuration, its value [95 % bootstrap interval over the images]; verdicts paired image by image '
            f'against the rows the method declares, Holm-corrected over each dataset\'s comparisons; rows scored on '
            f'different images are never compared. No seed noise is covered: a trained row is one model.</p></section>')
    pareto_html = "".join(pareto) or '<p class="empty">no classification metric (cls_acc, cls_map) on the val split</p>'
    paired, seed_only = any(v.paired for v in views), any(not r.get("n_images") for v in views for r in v.rows)
    intro_noise = " ".join(
        (["Where a row has per-image results its interval is a bootstrap over test images and seeds, and its verdicts "
          "compare it image by image with the rows its method declares, Holm-corrected over the board's comparisons "
          "(a verdict needs the corrected 95 % interval of the difference to exclude 0)."] if paired else [])
        + ([f"A row without per-image results has seed-only intervals and a verdict beyond seed noise (≥ "
            f"{MIN_SEEDS_BEYOND_NOISE} seeds), test images held fixed."] if seed_only else [])
        + ["Each row says what its interval covers."])
    body = f"""
<header><h1>{_esc(page_title)}</h1>
<p>{n_runs} runs ({n_failed} failed) · {len(views)} board{"s" if len(views) != 1 else ""} ({
    ", ".join(_esc(_display(v.primary)) for v in views)}){f" · {n_eval} evaluation rows" if n_eval else ""} · selected on val,
reported on {_esc(report_split)}</p>
<nav><a href="#boards">boards</a><a href="#sweeps">sweeps</a><a href="#pareto">Pareto</a><a href="#gallery">CAM gallery</a></nav></header>
<section id="boards"><h2>Leaderboards, one per headline metric</h2>
<p class="note">Each row: the configuration with the best mean validation headline over its seeds; its
<b>{_esc(report_split)}</b> metrics as mean ± std over seeds [95 % interval]. {intro_noise}
<span class="badge baseline">baseline</span> rows are the baselines a row must beat (the best trivial baseline; for
BBAM and CCGR its own box-filled masks); <span class="badge flagged">flagged</span> rows are not shown to beat it, or
fail a mechanism check (the reason in words under the verdict). Thresholds and counts are diagnostics, in each board's
folded table, never charted. Click a column to sort. {ui_note}</p>
{"".join(boards_html)}</section>
<section id="sweeps"><h2>Sweeps</h2><p class="note">Every trial that reported its sweep's selecting metric (the
method's validation headline): finished ●, stopped early by the scheduler ✕, failed ▼, each at its last reported
value.</p>{sweep_html}</section>
<section id="pareto"><h2>Classification vs localisation</h2>{pareto_html}</section>
<section id="gallery"><h2>CAM gallery</h2><p class="note">Overlays logged by the selected runs of each method.</p>{gallery}</section>
"""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(page_title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="weakbench"><link rel="icon" href="data:,">'
            f"<style>{_CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{body}<script>{_SORT_JS}</script></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return {"boards": len(views), "rows": len(rows), "evaluation_rows": n_eval, "bar_charts": sum(1 for v in views if v.rows),
            "sweeps": len(sweeps), "pareto_charts": len(pareto), "images": n_img, "bytes": len(page.encode())}


def leaderboard_json(lb: pa.Table) -> str:
    """The leaderboard as JSON rows (for scripts that want the numbers without HTML)."""
    return json.dumps(lb.to_pylist(), default=str)


__all__: Sequence[str] = ("build_dashboard", "board_view", "BoardView", "evaluation_html", "sweep_views", "SweepView", "TrialView",
                          "pareto_front", "run_link", "leaderboard_html")
