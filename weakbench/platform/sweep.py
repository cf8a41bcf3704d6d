"""The sweep driver: plan → launch → reconcile (issue #17).

:func:`run_sweep` (what ``weakbench sweep`` runs, and the Python entry point) checks the input,
resolves the options (``--resume`` keeps the sweep's own), opens the sweep directory, its split, its
MLflow parent run and the driver's record (:mod:`weakbench.platform.sweep_state`), then

* **plans** it without Ray (:func:`weakbench.platform.sweep_plan.plan_sweep`: parameter space,
  searcher, seed repeats, scheduler, resources, concurrency), recorded in ``state.json``;
* **launches** it on Ray (:func:`weakbench.platform.launch.launch`, the Ray adapter, which holds
  every private Ray API weakbench uses), recording Tune's events as they happen
  (:mod:`weakbench.platform.tune_record`);
* **reconciles** what happened (:func:`weakbench.platform.reconcile.finish`: MLflow statuses, lost
  trials, the best run, the parent run) and adds the trivial-baseline sweeps the board lacks
  (:func:`weakbench.platform.reconcile.follow_up_baselines`), from Python as from the CLI.

Layout of a sweep directory ``<output>/sweeps/<sweep name>/``::

    splits.json     the stored split (same for every trial)
    sweep.json      options of the sweep (for --resume)
    state.json      the driver's record of what happened (weakbench.platform.sweep_state): every
                    trial's id and configuration before it starts, its outcome from Tune's events,
                    the driver's heartbeat; the sweep's outcome and --resume's re-attaching read it
    tune/           Ray Tune experiment state (restored by --resume)
    train/<trial>-<stage>/  Ray Train runs, one per trial and plan segment (a fit stage and the
                    map/eval stages after it), deterministic names → a restarted job resumes
    products/       shared stage products (weakbench.platform.products), reused by every trial
                    whose upstream settings agree (a BBAM sweep trains its detector once)
    trials/<trial>/ trial scratch space (checkpoint staging, error.txt)

What stays once a trial finishes (unless ``--keep-checkpoints``): its model in MLflow (the final
weights, once), its small final checkpoint cursor, Tune's state; Tune and Train keep only each
trial's latest checkpoint (what a restart needs), and a finished trial's epoch checkpoints, private
products and Train checkpoints are removed (:meth:`weakbench.platform.trial.TrialState.finish`,
:func:`weakbench.platform.launch._remove_train_checkpoints`).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from weakbench.core import conventions as C
from weakbench.core.errors import ConfigError
from weakbench.platform.reconcile import (FinalStatusError, SweepSummary, SweepTarget, finish, first_line,  # noqa: F401
                                          follow_up_baselines, select_best_run)
from weakbench.platform.run_spec import SweepOptions, resumed_options  # noqa: F401 - SweepOptions: this module's API too
from weakbench.platform.search_space import SearchSpace, load_search_space
from weakbench.platform.sweep_plan import (check_gpu_request, describe_sweep, plan_sweep, plan_units,  # noqa: F401
                                           planned_trials, resolve_executor, trial_placement, with_overrides)

def _latest_sweep(sweeps: Path, method: str) -> Path:
    from weakbench.platform.sweep_state import started_sweeps

    cands = started_sweeps(sweeps, f"{method}-*")
    if not cands:
        raise ConfigError(f"--resume: no earlier {method} sweep in {sweeps}; run without --resume first or pass --name")
    return cands[-1]


def resume_target(opts: SweepOptions, method: str) -> Path:
    """The sweep directory ``--resume`` continues: ``--name``'s, else the latest ``method`` sweep
    under ``<output-dir>/sweeps`` (creates nothing; ConfigError when there is none)."""
    sweeps = Path(opts.output_dir).resolve() / "sweeps"
    return sweeps / opts.name if opts.name else _latest_sweep(sweeps, method)


def prepare_sweep_dir(opts: SweepOptions, space: SearchSpace) -> tuple[Path, str]:
    """Resolve the sweep directory and name (new, or the one to resume)."""
    out = Path(opts.output_dir).resolve()
    sweeps = out / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        sweep_dir = resume_target(opts, space.method)
        if not (sweep_dir / "sweep.json").is_file():
            raise ConfigError(f"--resume: {sweep_dir} holds no sweep (sweep.json missing); check --name and --output-dir")
        return sweep_dir, sweep_dir.name
    if opts.name:
        sweep_dir = sweeps / opts.name
        if (sweep_dir / "sweep.json").exists():
            raise ConfigError(f"sweep {opts.name!r} already exists in {sweeps}; pass --resume to continue it or another --name (finished results are never overwritten)")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return sweep_dir, opts.name
    # <method>-<dataset>-<time>-<4 hex>: two sweeps started in the same second into one output
    # directory (or one tracking server) get distinct names; the exclusive mkdir settles a clash
    from weakbench.core.data.synthetic import parse_synthetic, synthetic_name

    variant = parse_synthetic(opts.data)
    data_name = synthetic_name(variant) if variant else Path(opts.data).resolve().name
    if opts.classes:  # a class subset is another dataset: say so in the name (coco128-person)
        from weakbench.core.data.source import parse_classes

        data_name += "-" + "+".join("".join(ch if ch.isalnum() else "_" for ch in c) for c in parse_classes(opts.classes))
    while True:
        name = f"{space.method}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            (sweeps / name).mkdir()
            return sweeps / name, name
        except FileExistsError:
            continue


def run_sweep(opts: SweepOptions, observer=None) -> SweepSummary:
    """Run (or resume) a sweep, then (``opts.baselines``) the trivial-baseline sweeps its board
    lacks; returns its summary (``summary.baselines``: those follow-ups). See the module docstring.

    ``observer`` (a :class:`weakbench.platform.live.SweepObserver`) is told when Tune starts, with
    what it needs to show the sweep, and returns the Tune callbacks to install; it is told when
    the sweep ends (the follow-up sweeps run without it).

    Raises:
        ConfigError / DataError / UnknownNameError: bad input, before any run is created
            (:func:`weakbench.platform.validation.check_sweep_options` first).
        FinalStatusError: the trials' final statuses could not be written.
    """
    t0 = time.time()
    resolved, space = _resolve_options(opts)
    target = _open_sweep(resolved, space)
    summary = _drive(target, observer, t0)
    summary.baselines = follow_up_baselines(opts, summary, run=run_sweep)
    return summary


def _resolve_options(opts: SweepOptions) -> tuple[SweepOptions, SearchSpace]:
    """Check the input and resolve the options the sweep runs with (absolute data path, the space
    file's classes, a GPU share as a GPU trial; on ``--resume`` the sweep's own per-trial options).
    Bad input is refused here, before anything is created."""
    from weakbench.core.data import check_images, open_dataset, resolve_path
    from weakbench.core.data.synthetic import parse_synthetic
    from weakbench.methods import validate_config
    from weakbench.platform.launch import check_ray_target
    from weakbench.platform.validation import check_sweep_options

    check_sweep_options(opts)  # name, paths, output directory, tracking server: before anything is created
    # Ray workers run in other working directories: hand them absolute paths
    if parse_synthetic(opts.data) is None:
        opts = opts.model_copy(update={"data": str(resolve_path(opts.data))})
    space = with_overrides(load_search_space(opts.space), opts.overrides)
    if opts.classes is None and space.classes and not opts.resume:  # the command line's --classes wins
        opts = opts.model_copy(update={"classes": space.classes})
    if opts.overrides:
        validate_config(space.method, space.fixed, source=f"{opts.space} (with command-line overrides)")
    resolve_executor(opts)  # --executor inline with DDP or a GPU is refused before anything is created
    check_gpu_request(opts)  # so is a GPU request that cannot be placed, or --gpu where no GPU is visible
    if opts.gpus_per_trial is not None:  # a GPU share is a GPU trial
        opts = opts.model_copy(update={"use_gpu": True})
    data_cache = str(Path(opts.output_dir).resolve() / "data_cache")
    if not opts.resume:  # bad data fails before anything is created
        check_images(open_dataset(opts.data, cache_dir=data_cache, classes=opts.classes), data_cache)
    check_ray_target(opts)  # after the input: a wrong --data is named whatever Ray does
    return opts, space


def _open_sweep(opts: SweepOptions, space: SearchSpace) -> SweepTarget:
    """Create (or, on ``--resume``, reopen) the sweep: its directory and ``sweep.json``, its split,
    its MLflow experiment and parent run, and the driver's record, started and saved."""
    from weakbench.core.data import check_images, load_splits, make_splits, open_dataset, save_splits
    from weakbench.platform import sweep_state, tracking

    sweep_dir, sweep_name = prepare_sweep_dir(opts, space)
    if opts.resume:
        # a resumed sweep keeps everything that shapes its trials and their checkpoints (the
        # Role.TRIAL options); only where it runs (Role.PLACE: --address, --num-cpus, --max-concurrent...) may change
        opts = resumed_options(opts, json.loads((sweep_dir / "sweep.json").read_text()))
        space = with_overrides(load_search_space(opts.space), opts.overrides)
    # a concrete executor is saved in sweep.json: --resume continues with the one that wrote the
    # checkpoints (an inline trial's checkpoint is a Tune one, a Train trial's a Train one)
    opts = opts.model_copy(update={"executor": resolve_executor(opts)})
    out = Path(opts.output_dir).resolve()
    tracking_uri = opts.tracking_uri or tracking.default_tracking_uri(out)
    data_cache = str(out / "data_cache")
    source = open_dataset(opts.data, cache_dir=data_cache, classes=opts.classes)
    check_images(source, data_cache)  # cached by fingerprint: free after the first check
    if not opts.resume:
        try:  # exclusive: of two sweeps given the same --name at once, the second stops here
            with open(sweep_dir / "sweep.json", "x") as f:
                f.write(json.dumps({**opts.model_dump(), "tracking_uri": tracking_uri, "name": sweep_name}, indent=2))
        except FileExistsError:
            raise ConfigError(f"sweep {sweep_name!r} was just created in {sweep_dir.parent} by another process; "
                              f"pass another --name") from None
    splits_path = sweep_dir / "splits.json"
    if splits_path.exists():
        load_splits(splits_path, source)
    else:
        save_splits(make_splits(source, seed=opts.split_seed), splits_path)

    client = tracking.client_for(tracking_uri)
    # artifacts of the sqlite default under <output-dir>/mlartifacts (a tracking server decides its own)
    exp_id = tracking.ensure_experiment(client, opts.experiment, artifact_root=tracking.default_artifact_root(tracking_uri))
    parent = tracking.get_or_create_parent_run(
        client, exp_id, sweep_name, run_name=sweep_name,
        tags={C.TAG_METHOD: space.method, C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
              C.TAG_SPLIT: "val"},
        params={"space_file": opts.space, "trials": opts.trials, "searcher": opts.searcher, "metric": space.metric,
                "num_workers": opts.num_workers, "executor": opts.executor,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
                **{f"search.{k}": f"{d.kind}{d.values}" for k, d in space.search.items()}})

    # the driver's own record (state.json): loaded on --resume (the trials recorded so far are
    # replayed, not suggested again), the driver and its heartbeat, written before Tune starts
    state = sweep_state.SweepState.load(sweep_dir) or sweep_state.SweepState(sweep_dir / sweep_state.STATE_NAME)
    state.start_driver()
    state.data.update(name=sweep_name, method=space.method, metric=space.metric, mode=space.mode, parent_run_id=parent,
                      tracking_uri=tracking_uri, experiment=opts.experiment)
    state.save()
    return SweepTarget(name=sweep_name, sweep_dir=sweep_dir, space=space, source=source,
                       opts=opts.model_copy(update={"tracking_uri": tracking_uri}), tracking_uri=tracking_uri,
                       client=client, exp_id=exp_id, parent=parent, state=state)


def _drive(t: SweepTarget, observer, t0: float) -> SweepSummary:
    """Plan the sweep on the connected cluster, launch it, and reconcile whatever happened (an
    error, an interrupt, the end): MLflow and the record always end up saying it."""
    from weakbench.platform import launch, sweep_state
    from weakbench.platform.tune_record import Recorder, ReattachingSearcher, RecordingCallback

    stop = launch.StopRequest()
    interrupted = False
    error: BaseException | None = None
    recorder = None
    num_planned = t.opts.trials
    try:
        launch.ensure_ray(t.opts)
        plan = plan_sweep(t.space, t.opts, units=plan_units(t.space.method, t.space.defaults_config(), t.source),
                          cluster=launch.cluster_resources())
        num_planned = plan.num_planned
        t.state.data.update(planned=plan.num_planned, plan=plan.model_dump(mode="json"))
        ctx = launch.SweepContext(opts=t.opts, method=t.space.method, data_cache=str(Path(t.opts.output_dir).resolve() / "data_cache"),
                                  splits_path=str(t.sweep_dir / "splits.json"), sweep_dir=str(t.sweep_dir),
                                  parent_run_id=t.parent, sweep_id=t.name, seed_values=plan.seed_values).model_dump()
        recorder = Recorder(t.state, plan.metric)
        sweep_state.ACTIVE = recorder
        recorder.heartbeat(force=True)
        callbacks = [RecordingCallback()] + (observer.prepared(
            sweep_dir=t.sweep_dir, name=t.name, space=t.space, source=t.source, num_planned=plan.num_planned,
            concurrency=plan.max_concurrent, seed_values=plan.seed_values) if observer is not None else [])
        launch.launch(plan, ctx, sweep_dir=t.sweep_dir, resume=t.opts.resume, callbacks=callbacks,
                      wrap_searcher=ReattachingSearcher, stop=stop)
        interrupted = stop.requested
    except KeyboardInterrupt:
        interrupted = True
        stop.at = stop.at or time.time()
        raise
    except Exception as e:
        error = e
        raise
    finally:
        if observer is not None:
            observer.ended()
        if sweep_state.ACTIVE is recorder:
            sweep_state.ACTIVE = None
        try:
            summary = finish(t, num_planned=num_planned, t0=t0, error=error, interrupted=interrupted,
                             interrupted_at=stop.at, interrupt_signal=int(stop.signum))
        except Exception as e:  # noqa: BLE001 - said plainly; the original error, if any, is chained
            out = Path(t.opts.output_dir).resolve()
            raise FinalStatusError(
                f"sweep {t.name}: could not write the trials' final statuses ({type(e).__name__}: {first_line(e)}) "
                f"to MLflow {t.tracking_uri} or {t.state.path}; runs may still read RUNNING there. Free space on (or make "
                f"writable) the disk of --output-dir {out} and of the tracking store, then run `weakbench sweep "
                f"{t.opts.space} --resume --name {t.name}`, which records them") from (error or e)
        if recorder is not None and recorder.write_error is not None:
            summary.warnings.append(f"could not write {t.state.path} ({recorder.write_error}); `weakbench status` may "
                                    f"misread this sweep until a --resume rewrites it: free space on (or make writable) "
                                    f"the disk of --output-dir {Path(t.opts.output_dir).resolve()}")
    return summary
