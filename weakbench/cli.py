"""The ``weakbench`` command line (typer + rich).

    weakbench sweep search_spaces/cam.yaml --data ../shared/data/coco128 --trials 4
    weakbench status --watch                                      # the latest sweep, live
    weakbench leaderboard --metric max_box_acc_v2
    weakbench register --method cam --metric max_box_acc_v2      # alias @champion
    weakbench predict --model models:/weakbench-cam-coco128@champion some.jpg
    weakbench evaluate ../shared/data/ilsvrc_val1300/metadata --model models:/weakbench-cam-ilsvrc@champion
    weakbench dashboard build && weakbench dashboard serve

Every command reads and writes under ``--output-dir`` (default ``./weakbench_runs``), where the
default MLflow store ``mlflow.db`` lives; ``--tracking-uri`` points anywhere else (a server).
Bad input prints one line naming the file, the field and the fix, and exits with status 2.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.text import Text

from weakbench import __version__
from weakbench.core import conventions as C
from weakbench.platform import output, run_spec
from weakbench.platform.cli_options import (BASELINE, CLASSES, EXPERIMENT, FORMAT, OUTPUT_DIR, REPORT_SPLIT,
                                            SWEEP_EXPERIMENT, TRACKING_URI, format_option, typer_parameter)
from weakbench.core.errors import ConfigError, WeakbenchError
from weakbench.platform.reconcile import searched_params  # noqa: F401 - the CLI's summary uses it

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="weakbench: sweeps, leaderboards and a model registry for weakly supervised localisation.")
# a terminal's width; a pipe's (COLUMNS, else 80) as plain text: tables that do not fit are stacked, never cut
console, err_console = output.console, output.err_console


def _sweep_signature() -> inspect.Signature:
    """The signature of the ``weakbench sweep`` command: one parameter (named as the field) per
    field of SweepOptions that has a command-line form, in declaration order."""
    params = []
    for name in run_spec.SweepOptions.model_fields:
        if run_spec.cli_of(name) is not None:
            annotation, default = typer_parameter(name)
            params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=annotation))
    # the command line's own flag (not an option of the sweep itself)
    params.append(inspect.Parameter("dry_run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool, default=typer.Option(
        False, "--dry-run", help="Print the resolved sweep (fixed values, distributions, planned trials, executor, "
                                 "resources, tracking) and exit 0; starts nothing (no Ray, no MLflow run).")))
    return inspect.Signature(params)


def _options_from_cli(values: dict[str, Any]) -> run_spec.SweepOptions:
    """The SweepOptions of the command line's parsed ``values`` (parameter name → value).

    Raises:
        WeakbenchError: a ``--set`` item that is not KEY=VALUE; a value a field refuses (ConfigError).
    """
    fields = {}
    for name, value in values.items():
        cli = run_spec.cli_of(name)
        if cli.get("key_value"):
            value = _parse_sets(value)
        elif cli.get("negate"):
            value = not value
        elif cli.get("path"):
            value = str(value)
        fields[name] = value
    import pydantic

    from weakbench.platform.validation import options_error

    try:
        return run_spec.SweepOptions(**fields)
    except pydantic.ValidationError as e:  # one line naming the flag, the value and the fix
        raise options_error(e) from None


def _tracking_uri(output_dir: str, tracking_uri: str | None) -> str:
    from weakbench.platform.tracking import default_tracking_uri
    from weakbench.platform.validation import check_tracking_uri

    check_tracking_uri(tracking_uri)  # an unreachable server is named in seconds, not after MLflow's retries
    return tracking_uri or default_tracking_uri(output_dir)


def _parse_sets(sets: list[str]) -> dict:
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WeakbenchError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _metric_name(metric: str) -> str:
    """``"pxap"`` → ``"val/pxap"``; ``"pseudo_masks/miou"`` → ``"val/pseudo_masks/miou"``; a key
    that starts with a split is kept."""
    return metric if metric.split("/", 1)[0] in C.SPLITS else f"val/{metric}"


def _headline(method: str) -> str:
    """The metric a method is ranked by when none is given (``Method.headline_metric``, declared in
    :mod:`weakbench.methods.metric_declarations`)."""
    from weakbench.methods.metric_declarations import headline_metric

    return headline_metric(method)


def _resumed_view(opts) -> tuple[Any, str]:
    """For the first line of ``sweep --resume``: the options the resumed sweep will run with (its
    ``sweep.json``'s per-trial options, :func:`run_spec.resumed_options`) and ``"resuming NAME, "``;
    the command line's options and ``""`` when the sweep cannot be read yet (the sweep itself then
    says what is wrong)."""
    import json

    from weakbench.platform.search_space import load_search_space
    from weakbench.platform.sweep import resume_target

    try:
        d = resume_target(opts, load_search_space(opts.space).method)
        return run_spec.resumed_options(opts, json.loads((d / "sweep.json").read_text())), f"resuming {d.name}, "
    except Exception:  # noqa: BLE001 - the header only; run_sweep raises the real error
        return opts, ""


def sweep(**values: Any) -> None:
    """Run a hyperparameter sweep of one method (Ray Tune + Optuna + ASHA), tracked in MLflow.

    Exit status: 0 when every planned trial finished or was stopped early by ASHA (and at least one finished); 1 when a trial failed (a full disk, a read-only file system or a missing file fails its trial at once, without a retry), a planned trial never ran, no trial finished, or the trials' final statuses could not be written (one line on stderr names the store and the fix); 2 for bad input (nothing started); 130 when interrupted by Ctrl-C (SIGINT) and 143 by SIGTERM (the summary is printed, the parent run ends KILLED and --resume continues the sweep).
    """
    dry_run = values.pop("dry_run", False)
    opts = _options_from_cli(values)
    from weakbench.platform.sweep import resolve_executor
    from weakbench.platform.validation import check_sweep_options

    check_sweep_options(opts)  # bad --name, --data, --output-dir, --tracking-uri: one line, before anything starts

    if dry_run:
        from weakbench.platform.sweep import describe_sweep

        rows = describe_sweep(opts)
        output.render(rows, [output.Column("section", "section"), output.Column("key", "key"),
                             output.Column("value", "value", kind="text")],
                      title=f"weakbench sweep {opts.space} --dry-run (nothing started)")
        return

    shown, resuming = _resumed_view(opts) if opts.resume else (opts, "")
    console.print(f"[bold]weakbench sweep[/] {opts.space} on {opts.data or 'the synthetic default'}: {resuming}"
                  f"{shown.trials} trials, executor={resolve_executor(shown)}", soft_wrap=True)  # one line, paths whole
    s = _run_sweep_with_view(opts, verbose=opts.verbose)
    rows = [("trials", f"{s.num_trials} of {s.num_planned} planned ({s.num_finished} finished, {s.num_stopped} stopped "
                       f"early, {s.num_failed} failed{f', {s.num_restarts} restart(s)' if s.num_restarts else ''})"),
            ("wall time", f"{s.wall_seconds:.0f} s")]
    if s.best_run_id:
        shown = summary_metrics(s.best_metrics, s.metric)
        rows += [(f"best ({s.metric})", f"{s.best_metrics.get(s.metric, float('nan')):.2f}  run {s.best_run_id}"),
                 ("best metrics", ", ".join(f"{k}={v:.2f}" for k, v in shown.items())),
                 ("best params", ", ".join(f"{k}={v}" for k, v in sorted(searched_params(opts.space, s.best_params).items()))
                  + "  (searched; every parameter and metric is in MLflow)")]
    rows += [("MLflow", f"{s.tracking_uri}  (experiment {s.experiment}, parent run {s.parent_run_id})"),
             ("sweep dir", s.sweep_dir)]
    # one unwrapped line per field: the URI, the folder and the run id are never cut or split (copy them whole)
    console.print(Text(f"sweep {s.sweep_name} ({s.method} on {s.dataset})", style="bold"), soft_wrap=True)
    pad = max(len(k) for k, _ in rows)
    for k, v in rows:
        console.print(Text(f"  {k:<{pad}}  {v}"), soft_wrap=True, highlight=False)
    _print_baselines(s)
    for warning in s.warnings:
        err_console.print(Text("warning: ", style="yellow") + Text(warning))
    if s.interrupted:
        err_console.print(Text("interrupted: the parent run is KILLED; continue with --resume --name " + s.sweep_name, style="yellow"))
    elif s.num_finished == 0:
        err_console.print(Text("no trial finished", style="red")
                          + Text("; see the runs' weakbench.error tags and <sweep dir>/trials/*/error.txt"))
    elif s.exit_code:
        err_console.print(Text(f"{s.num_failed} trial(s) failed", style="red")
                          + Text(f", {s.num_planned - s.num_finished - s.num_stopped - s.num_failed} never ran; "
                                 f"see the runs' weakbench.error tags"))
    if s.exit_code:
        raise typer.Exit(s.exit_code)


# the command's flags are SweepOptions' fields (weakbench.platform.run_spec): typer reads the
# parameters from the signature built from them
sweep.__signature__ = _sweep_signature()  # type: ignore[attr-defined]
sweep.__annotations__ = {p.name: p.annotation for p in sweep.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command()(sweep)


_DETAIL = re.compile(r"threshold|_iou\d\d$|num_images|^top5_loc$")


def summary_metrics(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """The metrics the sweep summary shows of the best run: val and test values in the selecting
    metric's stage namespace (``val/pseudo_masks/…`` for ``val/pseudo_masks/instance_miou``), without
    thresholds, per-IoU parts and counts; the selecting metric first. The rest stays in MLflow."""
    ns = metric.split("/")[1:-1]
    prefix = "/".join(ns) + "/" if ns else ""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        head = f"{split}/{prefix}{metric.split('/')[-1]}"
        if head in metrics:
            out[head] = metrics[head]
    for k in sorted(metrics):
        split, _, rest = k.partition("/")
        if split in ("val", "test") and rest.startswith(prefix) and "/" not in rest[len(prefix):] \
                and not _DETAIL.search(rest[len(prefix):]):
            out.setdefault(k, metrics[k])
    return out


def _print_baselines(s) -> None:
    """One line per trivial-baseline sweep that :func:`~weakbench.platform.sweep.run_sweep` added after
    sweep ``s`` (:func:`weakbench.platform.reconcile.follow_up_baselines`); one that was refused is
    reported and does not change the sweep's exit status."""
    for b in s.baselines:
        if b.error is not None:
            err_console.print(Text(f"trivial baseline {b.name}: not added ({b.error})", style="yellow"))
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in b.chosen.items())
        result = f"{b.metric} {b.value:.2f}, test {b.test:.2f}" if b.value is not None and b.test is not None else "no result"
        console.print(f"trivial baseline [bold]{b.name}[/] at {b.input_size} px{f' ({chosen} chosen on val)' if chosen else ''}: "
                      f"{result}  (sweep {b.sweep_name}; --no-baselines skips this)", highlight=False)


def _run_sweep_with_view(opts, *, verbose: bool):
    """``run_sweep`` with the live view (weakbench.platform.live); unless ``verbose`` everything the process and its children
    write to stdout/stderr goes to ``<sweep dir>/sweep.log``."""
    from weakbench.platform.live import QuietOutput, SweepObserver
    from weakbench.platform.sweep import run_sweep

    if verbose:
        return run_sweep(opts, observer=SweepObserver(console, live=False))
    tmp = Path(opts.output_dir).resolve() / "sweeps" / f".sweep-{os.getpid()}.log"
    quiet = QuietOutput(tmp)
    ok = False
    import ray

    ours = not ray.is_initialized()  # a caller's own Ray instance (a notebook, a test) is left running
    try:
        with quiet:
            view_console = Console(file=quiet.terminal, no_color=not quiet.terminal.isatty())
            observer = SweepObserver(view_console, quiet=quiet)
            try:
                s = run_sweep(opts, observer=observer)
                ok = True
            finally:
                if ours and ray.is_initialized():
                    ray.shutdown()  # its farewells go to the log too
        return s
    except WeakbenchError:
        if quiet.path == tmp:  # refused before anything started: the one-line error says it all
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if not ok and quiet.path.exists() and quiet.path.stat().st_size:
            err_console.print(Text(f"full log: {quiet.path}", style="dim"))


@app.command()
def status(
    sweep_name: Optional[str] = typer.Argument(None, metavar="[SWEEP]", help="Sweep name (default: the latest sweep under --output-dir)."),
    output_dir: str = OUTPUT_DIR,
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: Optional[str] = SWEEP_EXPERIMENT,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the sweep ends (Ctrl-C stops watching, not the sweep)."),
    interval: float = typer.Option(5.0, "--interval", help="Seconds between refreshes with --watch."),
    fmt: output.OutputFormat = FORMAT,
):
    """Show a sweep's trials (running elsewhere, or finished): configuration, status, epoch / stage, latest and best
    validation metric, elapsed time, estimate left. Reads the driver's record <output-dir>/sweeps/<name>/state.json
    where it is readable here (it says when the sweep's driver is gone) and the sweep's MLflow runs (--tracking-uri for a
    cluster's server)."""
    from weakbench.platform.live import load_view

    def view():
        return load_view(sweep_name, output_dir=output_dir, tracking_uri=tracking_uri, experiment=experiment)

    v = view()
    if fmt.value in ("csv", "json"):  # the trials only; the header line is for people
        output.render(v.records(), v.columns(), fmt=fmt)
        return
    if not watch or not console.is_terminal:  # a pipe gets the table once, even with --watch
        console.print(v.header())
        output.render(v.records(), v.columns(), fmt=fmt)
        if v.note:
            console.print(Text(v.note, style="dim"), soft_wrap=True)
        return
    import time

    from rich.live import Live

    try:
        with Live(v.renderable(), console=console, refresh_per_second=1, redirect_stderr=False) as live:
            while v.ended is None:
                time.sleep(max(0.5, interval))
                v = view()
                live.update(v.renderable())
    except KeyboardInterrupt:
        pass


@app.command()
def leaderboard(
    metric: Optional[str] = typer.Option(None, "--metric", help="Validation metric that selects the configuration (val/ prefix implied). "
                                         "Default: each method's headline metric, one board per headline "
                                         "(max_box_acc_v2 for CAM methods, pseudo_masks/instance_miou for BBAM)."),
    output_dir: str = OUTPUT_DIR,
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = EXPERIMENT,
    report_split: str = REPORT_SPLIT,
    baseline: str = BASELINE,
    store: Optional[Path] = typer.Option(None, "--store", help="Results store directory (default <output-dir>/results)."),
    fmt: output.OutputFormat = format_option(help=(
        "table (fits the terminal, or the pipe's width as plain text), markdown, csv (one row per board row) or json "
        "(every board as plain records: intervals, images and seeds behind them, flags, verdicts).")),
):
    """Update the Parquet results store from MLflow and print the leaderboard (csv: one row per board row with each
    metric's mean, std and 95% CI bounds and the board's selecting metric in column `board`; json: every board's records)."""
    from weakbench.platform import leaderboard as lb_mod
    from weakbench.platform import results

    uri = _tracking_uri(output_dir, tracking_uri)
    store_dir = store or Path(output_dir) / "results"
    # a store on a read-only mount is not written: the runs are read from MLflow into memory
    table, report = results.current_table(uri, Path(store_dir), experiment=experiment)
    boards = lb_mod.build_boards(table, store_dir, select_metric=_metric_name(metric) if metric else None,
                                 report_split=report_split, baseline_method=baseline)
    if fmt.value == "json":
        import json

        print(json.dumps({"boards": [lb_mod.board_records(lb) for lb in boards], "store": str(store_dir),
                          "runs": report.n_total if report is not None else table.num_rows}, indent=1, default=str))
        return
    rows: list[dict] = []
    columns: dict[str, output.Column] = {"board": output.Column("board", "board")}
    for lb in boards:
        evaluation = (lb.schema.metadata or {}).get(b"weakbench.kind") == b"evaluation"
        key = (lb.schema.metadata or {}).get(b"weakbench.select_metric", b"").decode()
        if fmt.value == "csv":  # one table of every method board's rows
            if not evaluation:
                rows += [{"board": key, **r} for r in lb.to_pylist()]
                columns.update({c.key: c for c in lb_mod.board_columns(lb)})
        elif evaluation:
            console.print(lb_mod.render_evaluation_rich(lb))
        else:
            output.render(lb.to_pylist(), lb_mod.board_columns(lb), fmt=fmt, title=lb_mod.title(lb),
                          notes=[lb_mod.board_caption(lb), lb_mod.legend(lb)])
    if fmt.value == "csv":
        output.render(rows, list(columns.values()), fmt=fmt)
    (err_console if fmt.value == "csv" else console).print(
        f"results store: {store_dir} ({report.n_total} runs, {report.n_new} new)" if report is not None else
        f"results store: {store_dir} is read-only; {table.num_rows} runs read from MLflow, nothing written",
        soft_wrap=True, highlight=False)


@app.command()
def register(
    method: str = typer.Option(..., "--method", help="Method whose best run is registered."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Validation metric that picks the run (default: the method's headline metric)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Restrict to runs on this dataset name."),
    model_name: Optional[str] = typer.Option(None, "--name", help="Registered model name (default weakbench-<method>-<dataset>)."),
    alias: str = typer.Option("champion", "--alias", help="Alias to point at the new version."),
    output_dir: str = OUTPUT_DIR,
    tracking_uri: Optional[str] = TRACKING_URI,
):
    """Register the best run's model (chosen on validation) and set an alias (default @champion)."""
    from weakbench.platform import registry

    key = _metric_name(metric or _headline(method))
    info = registry.register_best(_tracking_uri(output_dir, tracking_uri), method, select_metric=key,
                                  dataset=dataset, model_name=model_name, alias=alias)
    if info.new:
        console.print(f"registered [bold]{info.name}[/] version {info.version} from run {info.run_id} "
                      f"({key} = {info.metric_value:.2f}); alias @{alias}")
    else:
        console.print(f"run {info.run_id} ({key} = {info.metric_value:.2f}) already is [bold]{info.name}[/] version "
                      f"{info.version}: no version added; alias @{alias} points at it")
    console.print(f"load it with: weakbench predict --model models:/{info.name}@{alias} IMAGE...")


@app.command()
def predict(
    images: List[Path] = typer.Argument(..., help="Image files (JPEG/PNG)."),
    model: str = typer.Option(..., "--model", "-m", help="MLflow model URI, e.g. models:/weakbench-cam-coco128@champion."),
    out: Path = typer.Option(Path("predictions"), "--overlay-dir", "--out",
                             help="Directory for the overlay PNGs (--out is the older spelling; -o is --output-dir, the store)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Probability a class needs beyond the top one."),
    output_dir: str = OUTPUT_DIR,
    tracking_uri: Optional[str] = TRACKING_URI,
):
    """Load a model by URI, predict classes and write CAM overlay PNGs."""
    from weakbench.platform.predict import load_predictor, predict_images

    predictor = load_predictor(model, _tracking_uri(output_dir, tracking_uri))
    for p in predict_images(predictor, list(images), out, threshold=threshold):
        console.print(f"{p.image}: " + ", ".join(f"{c} ({q:.2f})" for c, q in zip(p.classes, p.probabilities))
                      + " → " + ", ".join(str(o) for o in p.overlays))


@app.command()
def evaluate(
    data: Optional[str] = typer.Argument(None, help="Dataset directory, scored whole (every image, no split); omit for the synthetic default."),
    classes: Optional[str] = CLASSES,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A logged model, e.g. models:/weakbench-cam-ilsvrc@champion."),
    method: Optional[str] = typer.Option(None, "--method", help="Or a method that needs no training (center_gaussian, whole_image, cam with epochs=0)."),
    space: Optional[Path] = typer.Option(None, "--space", help="Or a search-space file whose method and fixed values to score (e.g. "
                                         "search_spaces/cam_lite0_zero_epoch.yaml); --set overrides them."),
    sets: List[str] = typer.Option([], "--set", help="The method's hyperparameters, KEY=VALUE (repeatable), e.g. --set sigma=0.25."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Evaluation frame in pixels (default: the model's / method's)."),
    interval: Optional[float] = typer.Option(None, "--interval", help="CAM threshold step (default: the config's cam_curve_interval)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Score only the first N images."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log an MLflow evaluation run (tag weakbench.kind=evaluation, metrics all/<name>)."),
    output_dir: str = OUTPUT_DIR,
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = EXPERIMENT,
):
    """Score a registered model, or a method that needs no training, on a whole dataset; print the board's metrics."""
    from weakbench.platform.evaluation import evaluate_dataset
    from weakbench.methods.metric_declarations import DISPLAY_ORDER

    params = _parse_sets(sets)
    if space is not None:
        method, params = _space_config(space, method, params)

    def notice(line: str) -> None:
        err_console.print(Text("warning: ", style="yellow") + Text(line), soft_wrap=True, highlight=False)

    res = evaluate_dataset(data, tracking_uri=_tracking_uri(output_dir, tracking_uri), model_uri=model, method=method,
                           params=params, experiment=experiment, cache_dir=Path(output_dir) / "data_cache",
                           classes=classes, input_size=input_size, cam_curve_interval=interval, batch_size=batch_size,
                           max_images=max_images, log=log, progress=True, notice=notice)
    rank = {h: i for i, h in enumerate(DISPLAY_ORDER)}
    rows = [{"metric": k, "value": res.metrics[k]} for k in sorted(res.metrics, key=lambda k: (rank.get(k, len(rank)), k))]
    output.render(rows, [output.Column("metric", "metric"), output.Column("value", "value", kind="number")],
                  title=f"{res.evaluated} on {res.dataset}: {res.num_images} images (every image, no split)")
    if res.run_id:
        console.print(f"logged evaluation run {res.run_id} ({res.seconds:.0f} s)")


def _space_config(path: Path, method: str | None, sets: dict) -> tuple[str, dict]:
    """``(method, hyperparameters)`` of ``evaluate --space FILE``: the file's method and fixed values,
    ``--set`` on top. A file that searches an axis (other than a one-value seed grid) is refused: an
    evaluation scores one configuration.

    Raises:
        ConfigError: ``--method`` names another method; the file searches an axis that ``--set`` does not fix.
    """
    from weakbench.platform.search_space import load_search_space

    sp = load_search_space(path)
    if method is not None and method != sp.method:
        raise ConfigError(f"--space {path} is a {sp.method} space but --method is {method}; drop --method")
    open_axes = [k for k, d in sp.search.items() if k not in sets and not (d.kind in ("grid", "choice") and len(d.values) == 1)]
    if open_axes:
        raise ConfigError(f"--space {path}: searches {', '.join(open_axes)}; an evaluation scores one configuration: fix each "
                          f"with --set, e.g. --set {open_axes[0]}={sp.search[open_axes[0]].values[0]}")
    one = {k: d.values[0] for k, d in sp.search.items() if k not in sets}
    return sp.method, {**sp.fixed, **one, **sets}


@app.command()
def methods(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", help="A method: list its hyperparameters."),
    fmt: output.OutputFormat = FORMAT,
):
    """List the registered methods (pipeline shape, default search space); with NAME, the method's hyperparameters:
    the paper's symbol, type, default, allowed range, the default search space's distribution and what each means."""
    from weakbench.methods import describe_hyperparameters, get_method_class, list_methods

    if name is None:
        rows = []
        for m in list_methods():
            cls = get_method_class(m)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            rows.append({"name": m, "shape": cls.shape, "description": doc, "search_space": str(cls.default_search_space())})
        cols = [output.Column("name", "method"), output.Column("shape", "shape"),
                output.Column("description", "description"), output.Column("search_space", "default search space", kind="path")]
        output.render(rows, cols, fmt=fmt, title="Registered methods", notes=["weakbench methods NAME lists a method's hyperparameters."])
        return
    cls = get_method_class(name)
    rows = describe_hyperparameters(name)
    space_file, searched = cls.default_search_space(), {}
    try:
        from weakbench.platform.search_space import load_search_space

        space = load_search_space(space_file)
        searched = {k: f"{d.kind} {d.values}" for k, d in space.search.items()}
        fixed = dict(space.fixed)
    except Exception:  # noqa: BLE001 - the schema is the answer; the space file only adds a column
        fixed = {}
    for r in rows:
        r["search"] = searched.get(r["name"]) or (f"fixed {fixed[r['name']]}" if r["name"] in fixed else "")
    cols = [output.Column("name", "name"), output.Column("paper", "paper"), output.Column("type", "type"),
            output.Column("default", "default", text=lambda r: "None" if r["default"] is None else str(r["default"])),
            output.Column("range", "range"), output.Column("search", f"in {Path(space_file).name}"),
            output.Column("description", "description")]
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    output.render(rows, cols, fmt=fmt, title=f"{name} ({cls.shape}): {doc}",
                  notes=[f"The method's own hyperparameters first, then those every method shares. Set one with "
                         f"--set KEY=VALUE or in a search-space file (default {space_file})."])


@app.command("data")
def data_info(
    path: Optional[str] = typer.Argument(None, help="Dataset directory; omit for the synthetic default "
                                                     "(synthetic:touching, synthetic:hard: its variants)."),
    classes: Optional[str] = CLASSES,
    output_dir: str = OUTPUT_DIR,
):
    """Check a dataset (annotations, boxes inside their images, every image decodes) and print its size, classes and fingerprint,
    and what was checked."""
    import json

    from weakbench.core.data import check_images, open_dataset

    cache = Path(output_dir) / "data_cache"
    src = open_dataset(path, cache_dir=cache, classes=classes)  # parses the annotations; a box outside its image is refused here
    decoded_now = check_images(src, cache, console=err_console, progress=err_console.is_terminal)  # cached per fingerprint
    n_boxes = sum(len(src.annotations(rec.index).boxes) for rec in src.records)
    n = len(src.records)
    if decoded_now:
        images = f"all {n} images decode at their declared sizes (checked now)"
    else:
        marker = cache / "checked" / f"{src.fingerprint}.json"
        try:
            import datetime as dt

            when = dt.datetime.fromtimestamp(json.loads(marker.read_text())["checked_at"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        except (OSError, ValueError, KeyError):
            when = "earlier"
        images = f"all {n} images decode at their declared sizes (checked {when}; same fingerprint, {marker})"
    console.print(f"{src.name}: {n} images, {src.num_classes} classes, {n_boxes} boxes, multilabel={src.multilabel}",
                  soft_wrap=True, highlight=False)
    console.print(f"checked: the annotations parse ({type(src).__name__}); every box lies inside its image; {images}",
                  soft_wrap=True, highlight=False)
    console.print(f"fingerprint {src.fingerprint}; root {src.root}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------- weakbench registry
registry_app = typer.Typer(help="Registered models: list versions and aliases, roll an alias back.", no_args_is_help=True)


@registry_app.command("list")
def registry_list(name: Optional[str] = typer.Argument(None, help="only this registered model"),
                  tracking_uri: Optional[str] = TRACKING_URI, output_dir: str = OUTPUT_DIR,
                  fmt: output.OutputFormat = FORMAT) -> None:
    """List registered models, their versions, aliases and selection metric."""
    from weakbench.platform import registry

    listed = registry.list_registered(_tracking_uri(output_dir, tracking_uri), name)

    def number(v: str | None) -> float | None:
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    rows = [{"name": r.name, "version": r.version, "aliases": ["@" + a for a in r.aliases], "run_id": r.run_id or "",
             "select_metric": r.tags.get("weakbench.select_metric", ""), "select_value": number(r.tags.get("weakbench.select_value")),
             "created_utc": r.created.strftime("%Y-%m-%d %H:%M"), "format": r.model_format,
             "uri": f"models:/{r.name}/{r.version}"}
            for r in listed]
    cols = [output.Column("name", "name"), output.Column("version", "version", kind="number"),
            output.Column("aliases", "aliases", text=lambda r: ", ".join(r["aliases"])),
            output.Column("run_id", "run id", kind="path"), output.Column("select_metric", "selected by"),
            output.Column("select_value", "value", kind="number",
                          text=lambda r: "" if r["select_value"] is None else f"{r['select_value']:.2f}"),
            output.Column("created_utc", "created (UTC)"), output.Column("format", "format"),
            output.Column("uri", "model URI", kind="path")]
    if rows or fmt.value not in ("table", "markdown"):
        output.render(rows, cols, fmt=fmt, title="Registered models")
    else:
        output.console.print("no registered models")
    refused = [r for r in listed if r.model_format.startswith("refused")]
    if refused:
        from weakbench.platform.model_format import UNSAFE_PICKLE_ENV

        typer.echo(f"{len(refused)} version(s) cannot be loaded (e.g. {refused[0].name} version {refused[0].version}: "
                   f"{refused[0].model_format}); a pickled model loads only with {UNSAFE_PICKLE_ENV}=1 (unsafe)", err=True)


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(..., help="registered model name, e.g. weakbench-cam-coco128"),
    alias: str = typer.Option("champion", "--alias", help="alias to move back"),
    tracking_uri: Optional[str] = TRACKING_URI,
    output_dir: str = OUTPUT_DIR,
) -> None:
    """Move NAME@ALIAS back to the version it pointed at before."""
    from weakbench.platform import registry

    version = registry.rollback(_tracking_uri(output_dir, tracking_uri), name, alias)
    typer.echo(f"{name}@{alias} -> version {version}")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        console.print(f"weakbench {__version__}")
        raise typer.Exit()


def _mount_subapps() -> None:
    try:
        from weakbench.dashboards.cli import app as dashboard_app

        app.add_typer(dashboard_app, name="dashboard", no_args_is_help=False, help="Build or serve the leaderboard dashboard (one offline HTML file).")
    except ImportError:
        pass
    app.add_typer(registry_app, name="registry", no_args_is_help=False, help="List registered models; roll an alias back.")


_mount_subapps()


def usage_line(e: Exception) -> str:
    """The one line ``weakbench`` prints for a command-line usage error ``e`` (a click/typer
    ``UsageError``: unknown option, missing argument, bad value, a group without its command):
    the command path, what is wrong (the option or argument by name) and the fix."""
    from typer._click import exceptions as cx

    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "weakbench"
    see = f"see `{where} --help`"
    if ctx is not None and hasattr(ctx.command, "list_commands") and e.format_message() == "Missing command.":
        names = ctx.command.list_commands(ctx)
        return f"{where}: a command is missing; fix: `{where} COMMAND` with COMMAND one of {', '.join(names)} ({see})"
    if isinstance(e, cx.NoSuchOption):
        fix = f"did you mean {' or '.join(sorted(e.possibilities))}? " if e.possibilities else ""
        return f"{where}: no such option {e.option_name}; {fix}{see} for the options"
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    return f"{where}: {' '.join(msg.split())} ({see})"


def _usage_errors() -> tuple[type, ...]:
    """The usage-error classes of the command line: typer 0.29's vendored click (whose classes are
    not subclasses of click's) and click itself where it is installed."""
    from typer._click import exceptions as cx

    classes: list[type] = [cx.ClickException]
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:  # typer ≥ 0.29 does not need click
        pass
    return tuple(classes)


def main() -> None:
    """Console-script entry point. Exit status 2 with one line on stderr for bad input: a usage error
    of any command or sub-command (unknown option, missing or extra argument, a value out of range, a
    group such as ``weakbench registry`` without its command) and a WeakbenchError. ``weakbench`` with
    no arguments prints the top-level help on stdout and exits 0: it is how a new user discovers the
    commands, not a mistake."""
    # MLflow reads this when it is imported: no "Creating initial MLflow database tables..." lines
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if len(sys.argv) <= 1:
        sys.argv.append("--help")
    try:
        # standalone_mode=False: click returns (not raises) the exit code of typer.Exit
        code = app(standalone_mode=False, prog_name="weakbench")
        sys.exit(code if isinstance(code, int) else 0)
    except WeakbenchError as e:
        # printed literally: Rich markup would eat bracketed text such as "[x, y, w, h]"
        err_console.print(Text("error:", style="red") + Text(" " + str(e)), highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))  # 2: bad input; an error that is not the input's says otherwise
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except _usage_errors() as e:
        from typer._click import exceptions as cx

        if not isinstance(e, cx.UsageError) and type(e).__name__ != "UsageError" and not hasattr(e, "ctx"):
            e.show()  # a click FileError and the like: click's own one line
            sys.exit(getattr(e, "exit_code", 1))
        err_console.print(Text("error:", style="red") + Text(" " + usage_line(e)), highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
