"""The results store: one row per trial run, in Parquet, built incrementally from MLflow.

Layout on disk (Hive-style directories, one or more Parquet files per partition)::

    <store>/dataset=<name>/method=<name>/part-<utc time>-<8 hex>.parquet

Every file carries the full :data:`SCHEMA` (the ``dataset`` and ``method`` columns are stored in
the files too; the directories only group the files so that a query for one dataset or method
touches few of them). Directory names are percent-encoded (``urllib.parse.quote``).

* :func:`update_store` appends only the runs not yet in the store (matched on ``run_id``): the
  terminal (``FINISHED``, ``FAILED``, ``KILLED``) child runs tagged ``weakbench.kind = "trial"``.
  Runs still ``RUNNING`` or ``SCHEDULED`` are left for a later update.
* Writes are atomic: each file is written under a hidden temporary name (``.part-….tmp``) in its
  final directory, flushed, ``fsync``-ed and renamed with :func:`os.replace`; readers skip
  hidden files, so a crash leaves either the whole file or nothing visible.
* A run already in the store is read again when its ``end_time`` changed (a restarted trial
  continues its own MLflow run, so a ``FAILED`` row can later become ``FINISHED``); the new row
  is appended and supersedes the old one.
* :func:`read_store` returns one :class:`pyarrow.Table` with one row per run id: the most
  recently ingested row (also when two concurrent updates both wrote a run).
* Each run's per-image results (:mod:`weakbench.core.metrics.per_image`, their own schema
  version) are copied from its MLflow artifacts into ``<store>/_per_image/<run id>/<split>.parquet``
  by :func:`update_store` (:func:`copy_per_image`); :func:`read_per_image` reads them for the
  board's bootstrap over test images.
* The terminal evaluation runs of ``weakbench evaluate`` (``weakbench.kind = "evaluation"``) go
  to a store of their own inside it, ``<store>/_evaluations/`` (:data:`EVALUATION_STORE_DIR`),
  read by :func:`weakbench.platform.leaderboard.build_evaluation_board`.
* :func:`compact_store` rewrites each partition into one file (write new, then delete old; a
  crash in between leaves duplicates that :func:`read_store` drops).

The schema is versioned (:data:`SCHEMA_VERSION`, stored in every file's schema metadata under
``weakbench.schema_version``); reading a file of another version raises :class:`DataError`
telling the user to rebuild the store. Columns are documented in ``docs/results_schema.md``.

``config_group`` is the key of a *configuration*: the sha256 (16 hex chars) of the sorted-keys
JSON of the run's MLflow params **without** ``seed``. The tag ``weakbench.config_hash`` cannot
serve, because it hashes the whole config, seed included; runs that differ only by seed share a
``config_group``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from weakbench.core import conventions as C
from weakbench.core.conventions import DEFAULT_EXPERIMENT
from weakbench.core.errors import DataError
from weakbench.core.io import atomic_write, fsync_dir

SCHEMA_VERSION = 1
_VERSION_KEY = b"weakbench.schema_version"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_TS = pa.timestamp("ms", tz="UTC")

#: The results-table schema, version :data:`SCHEMA_VERSION`. See ``docs/results_schema.md``.
SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_name", pa.string()),
        pa.field("experiment_id", pa.string()),
        pa.field("sweep_id", pa.string()),
        pa.field("parent_run_id", pa.string()),
        pa.field("trial_id", pa.string()),
        pa.field("method", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("dataset_fingerprint", pa.string()),
        pa.field("selection_split", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("start_time", _TS),
        pa.field("end_time", _TS),
        pa.field("duration_s", pa.float64()),
        pa.field("git_commit", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("config_group", pa.string()),
        pa.field("weakbench_version", pa.string()),
        pa.field("device", pa.string()),
        pa.field("num_workers", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("params", pa.map_(pa.string(), pa.string())),
        pa.field("metrics", pa.map_(pa.string(), pa.float64())),
        pa.field("artifact_uri", pa.string()),
        pa.field("model_uri", pa.string()),
        pa.field("overlay_uris", pa.list_(pa.string())),
        pa.field("ingested_at", _TS),
    ],
    metadata={_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    """What :func:`update_store` did.

    Attributes:
        n_new: runs added by this update.
        n_total: runs in the store after the update.
        paths: the Parquet files written (empty when nothing was new).
        n_updated: runs already in the store whose MLflow ``end_time`` changed (resumed
            trials), re-read; their new row supersedes the old one.
    """

    n_new: int
    n_total: int
    paths: list[Path]
    n_updated: int = 0


# ---------------------------------------------------------------------- helpers
def config_group(params: Mapping[str, Any]) -> str:
    """Key of a configuration: sha256 (first 16 hex chars) of the sorted-keys JSON of ``params``
    with ``seed`` removed and every value turned into ``str`` (as MLflow stores params)."""
    clean = {str(k): str(v) for k, v in params.items() if k != "seed"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def _ms_to_dt(ms: int | None) -> _dt.datetime | None:
    if ms is None:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000.0, tz=_dt.timezone.utc)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a results table with :data:`SCHEMA` from row dicts.

    Missing keys become nulls; ``params`` and ``metrics`` are dicts; ``config_group`` is computed
    from ``params`` when absent. ``start_time``/``end_time`` accept ``datetime`` or epoch ms.

    Raises:
        DataError: a row has no ``run_id``.
    """
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for i, row in enumerate(rows):
        if not row.get("run_id"):
            raise DataError(f"results row {i}: field 'run_id' is missing; every row needs the MLflow run id")
        r = dict(row)
        params = {str(k): str(v) for k, v in (r.get("params") or {}).items()}
        r["params"] = list(params.items())
        r["metrics"] = [(str(k), float(v)) for k, v in (r.get("metrics") or {}).items()]
        r.setdefault("config_group", config_group(params))
        for key in ("start_time", "end_time", "ingested_at"):
            if isinstance(r.get(key), (int, float)):
                r[key] = _ms_to_dt(int(r[key]))
        for name in cols:
            cols[name].append(r.get(name))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _run_to_row(run: Any, overlays: list[str], now: _dt.datetime) -> dict[str, Any]:
    info, data = run.info, run.data
    tags, params = data.tags, data.params
    start, end = info.start_time, info.end_time
    seed = _int_or_none(tags.get(C.TAG_SEED, params.get("seed")))
    model_uri = tags.get(C.TAG_MODEL_URI)
    return {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment_id": info.experiment_id,
        "sweep_id": tags.get(C.TAG_SWEEP_ID),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "trial_id": tags.get(C.TAG_TRIAL_ID),
        "method": tags.get(C.TAG_METHOD),
        "backbone": tags.get(C.TAG_BACKBONE, params.get("backbone")),
        "dataset": tags.get(C.TAG_DATASET),
        "dataset_fingerprint": tags.get(C.TAG_DATASET_FINGERPRINT),
        "selection_split": tags.get(C.TAG_SPLIT),
        "seed": seed,
        "status": info.status,
        "start_time": _ms_to_dt(start),
        "end_time": _ms_to_dt(end),
        "duration_s": (end - start) / 1000.0 if start is not None and end is not None else None,
        "git_commit": tags.get(C.TAG_GIT_COMMIT),
        "config_hash": tags.get(C.TAG_CONFIG_HASH),
        "weakbench_version": tags.get(C.TAG_VERSION),
        "device": tags.get(C.TAG_DEVICE),
        "num_workers": _int_or_none(tags.get(C.TAG_NUM_WORKERS)),
        "error": tags.get(C.TAG_ERROR),
        "params": dict(params),
        "metrics": dict(data.metrics),
        "artifact_uri": info.artifact_uri,
        "model_uri": model_uri,
        "overlay_uris": overlays,
        "ingested_at": now,
    }


def _partition_dir(store_dir: Path, dataset: str | None, method: str | None) -> Path:
    q = lambda s: urllib.parse.quote(s if s else "__none__", safe="")  # noqa: E731
    return store_dir / f"dataset={q(dataset)}" / f"method={q(method)}"


def write_table(table: pa.Table, store_dir: Path) -> list[Path]:
    """Append ``table`` (with :data:`SCHEMA`) to the store: one new file per (dataset, method)
    partition, each written atomically (temporary hidden file, ``fsync``, ``os.replace``).

    Returns the paths written. Does not check for duplicate run ids (see :func:`update_store`).
    """
    if table.num_rows == 0:
        return []
    table = table.cast(SCHEMA)
    store_dir = Path(store_dir)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    keys = pa.Table.from_arrays(
        [table["dataset"].fill_null("__none__"), table["method"].fill_null("__none__")], names=["d", "m"]
    )
    paths = []
    groups = keys.group_by(["d", "m"], use_threads=False).aggregate([]).to_pylist()
    for g in groups:
        mask = pc.and_(pc.equal(keys["d"], g["d"]), pc.equal(keys["m"], g["m"]))
        part = table.filter(mask)
        directory = _partition_dir(store_dir, g["d"], g["m"])
        directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_write(directory / name, fsync=True) as fh:
            pq.write_table(part, fh, compression="zstd")
        paths.append(directory / name)
    fsync_dir(store_dir)
    return paths


def _store_files(store_dir: Path) -> list[str]:
    if not Path(store_dir).is_dir():
        return []
    return sorted(
        str(p) for p in Path(store_dir).rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(store_dir).parts)
    )


def _check_versions(files: Iterable[str]) -> None:
    for f in files:
        meta = pq.read_schema(f).metadata or {}
        version = meta.get(_VERSION_KEY, b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise DataError(
                f"{f}: results schema version {version!r}, this weakbench reads version {SCHEMA_VERSION}; "
                f"fix: delete the store directory and rebuild it from MLflow "
                f"(`weakbench dashboard build --store DIR --tracking-uri URI`)"
            )


def read_store(store_dir: Path, columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
    """Read the whole store (or ``columns`` of the rows matching ``filter``) as one table.

    Args:
        store_dir: the store directory; a missing or empty directory gives an empty table.
        columns: optional subset of :data:`SCHEMA` names (``run_id`` is always read).
        filter: optional ``pyarrow.compute`` expression, e.g. ``pc.field("method") == "cam"``.

    Returns:
        a table with :data:`SCHEMA` (or the requested columns), one row per run id.

    Raises:
        DataError: a file was written with another :data:`SCHEMA_VERSION`.
    """
    files = _store_files(Path(store_dir))
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in dict.fromkeys(["run_id", *columns])])
    if not files:
        return schema.empty_table()
    _check_versions(files)
    dataset = pads.dataset(files, schema=SCHEMA, format="parquet")
    table = dataset.to_table(columns=schema.names, filter=filter)
    return _drop_duplicate_runs(table).replace_schema_metadata(SCHEMA.metadata)


def _drop_duplicate_runs(table: pa.Table) -> pa.Table:
    """Keep one row per run id: the most recently ingested (ties: the later in file order)."""
    ids = table["run_id"]
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    if "ingested_at" in table.column_names:
        when = table["ingested_at"].cast(pa.int64()).fill_null(0)  # rows without a time count as oldest
        keys = pa.table({"t": when, "i": pa.array(np.arange(table.num_rows))})
        order = pc.sort_indices(keys, sort_keys=[("t", "ascending"), ("i", "ascending")])
    else:
        order = pa.array(np.arange(table.num_rows))
    ranked = pa.table({"run_id": ids.take(order), "pos": order})
    last = ranked.group_by("run_id", use_threads=False).aggregate([("pos", "last")])["pos_last"]
    return table.take(np.sort(last.to_numpy()))


def compact_store(store_dir: Path) -> int:
    """Rewrite each (dataset, method) partition as one file; returns the number of files removed.

    The new file is written atomically before the old ones are deleted, so a crash at any point
    loses nothing (at worst duplicates remain, which :func:`read_store` drops).
    """
    store_dir = Path(store_dir)
    removed = 0
    by_dir: dict[Path, list[str]] = {}
    for f in _store_files(store_dir):
        by_dir.setdefault(Path(f).parent, []).append(f)
    for directory, files in by_dir.items():
        if len(files) < 2:
            continue
        _check_versions(files)
        table = _drop_duplicate_runs(pads.dataset(files, schema=SCHEMA, format="parquet").to_table())
        write_table(table, store_dir)
        for f in files:
            os.remove(f)
            removed += 1
    return removed


# ---------------------------------------------------------------------- MLflow → store
def _list_overlays(client: Any, run: Any) -> list[str]:
    """``overlays/*.png`` URIs of ``run``, listed through the artifact repository of the run's
    artifact URI directly (``client.list_artifacts`` would re-read the run from the tracking
    store first: about 15 ms per run on sqlite, most of an update's time)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    base = run.info.artifact_uri.rstrip("/")
    try:
        try:
            items = get_artifact_repository(base).list_artifacts(C.OVERLAY_DIR)
        except Exception:  # noqa: BLE001 - e.g. mlflow-artifacts:/ URIs that need the client's resolution
            items = client.list_artifacts(run.info.run_id, C.OVERLAY_DIR)
    except Exception:  # noqa: BLE001 - an unreachable artifact store must not block the table
        return []
    return sorted(f"{base}/{it.path}" for it in items if not it.is_dir and it.path.lower().endswith(".png"))


def fetch_trial_runs(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                     known: Mapping[str, int | None] | None = None, list_overlays: bool = True,
                     kind: str = C.KIND_TRIAL) -> pa.Table:
    """Read the terminal trial runs of ``experiment`` from MLflow as a results table.

    Args:
        tracking_uri: e.g. ``sqlite:///runs/mlflow.db`` or ``http://host:5000``.
        experiment: MLflow experiment name.
        known: ``{run_id: end_time in epoch ms}`` of the runs already in the store; those whose
            MLflow ``end_time`` is unchanged are skipped.
        list_overlays: list ``overlays/*.png`` artifacts of each new run (one artifact-store
            call per run).
        kind: the runs' ``weakbench.kind`` (``"trial"``; ``"evaluation"`` for ``weakbench evaluate``).

    Raises:
        DataError: the experiment does not exist at ``tracking_uri``.
    """
    from mlflow.entities import ViewType

    from weakbench.platform.tracking import client_for

    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(
            f"{tracking_uri}: no MLflow experiment named {experiment!r}; fix: run a sweep first "
            f"or pass the experiment name that the sweep used"
        )
    known = known or {}
    now = _dt.datetime.now(_dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{C.TAG_KIND}` = '{kind}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=5000, page_token=token,
        )
        for run in page:
            if run.info.status not in TERMINAL_STATUSES:
                continue
            if run.info.run_id in known and known[run.info.run_id] == run.info.end_time:
                continue
            overlays = _list_overlays(client, run) if list_overlays else []
            rows.append(_run_to_row(run, overlays, now))
        token = page.token
        if not token:
            break
    return rows_to_table(rows)


def update_store(tracking_uri: str, store_dir: Path, experiment: str = DEFAULT_EXPERIMENT) -> UpdateReport:
    """Add the terminal trial runs of ``experiment`` that are not in the store yet (and re-read
    those whose ``end_time`` changed since).

    Args:
        tracking_uri: MLflow tracking URI.
        store_dir: the store directory (created if missing).
        experiment: MLflow experiment name (default ``"weakbench"``).

    Returns:
        :class:`UpdateReport` with the number of new runs, the total, and the files written.

    Raises:
        DataError: unknown experiment, or a store file of another schema version.
    """
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    report = _update(tracking_uri, store_dir, experiment, C.KIND_TRIAL)
    _update(tracking_uri, store_dir / EVALUATION_STORE_DIR, experiment, C.KIND_EVALUATION)
    return report


#: the evaluation runs (``weakbench evaluate``) live in a store of their own inside the store,
#: ``<store>/_evaluations/`` (same schema; its per-image copies in its own ``_per_image``), so that
#: nothing that reads trials (selection, cost, counts) ever sees them
EVALUATION_STORE_DIR = "_evaluations"


def _update(tracking_uri: str, store_dir: Path, experiment: str, kind: str) -> UpdateReport:
    existing = read_store(store_dir, columns=["end_time"])
    ends = existing["end_time"].cast(pa.int64()).to_pylist()
    known = dict(zip(existing["run_id"].to_pylist(), ends))
    fetched = fetch_trial_runs(tracking_uri, experiment, known=known, kind=kind, list_overlays=kind == C.KIND_TRIAL)
    for run_id, uri in zip(fetched["run_id"].to_pylist(), fetched["artifact_uri"].to_pylist()):
        copy_per_image(uri, store_dir, run_id)
    paths = write_table(fetched, store_dir)
    n_updated = sum(1 for r in fetched["run_id"].to_pylist() if r in known)
    n_new = fetched.num_rows - n_updated
    return UpdateReport(n_new=n_new, n_total=len(known) + n_new, paths=paths, n_updated=n_updated)


# ---------------------------------------------------------------------- per-image results
#: where the store keeps each run's per-image tables: ``<store>/_per_image/<run id>/<split>.parquet``
#: (a leading ``_`` keeps them out of the run table's files)
PER_IMAGE_STORE_DIR = "_per_image"


def copy_per_image(artifact_uri: str | None, store_dir: Path, run_id: str) -> list[str]:
    """Copy a run's per-image artifacts (``per_image/<split>/<one file>.parquet``,
    :mod:`weakbench.core.metrics.per_image`) into the store, each file written atomically;
    returns the splits copied (none when the run logged none or its artifact store is
    unreachable: the board then says that row has no per-image results)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if not artifact_uri:
        return []
    repo = get_artifact_repository(artifact_uri.rstrip("/"))
    try:
        splits = [it.path.rsplit("/", 1)[-1] for it in repo.list_artifacts(C.PER_IMAGE_DIR) if it.is_dir]
    except Exception:  # noqa: BLE001 - no artifacts, or an unreachable artifact store
        return []
    out_dir = Path(store_dir) / PER_IMAGE_STORE_DIR / run_id
    done = []
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per run would flood the terminal
    try:
        for split in splits:
            if _copy_split(repo, split, out_dir):
                done.append(split)
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    return done


def _copy_split(repo: Any, split: str, out_dir: Path) -> bool:
    """Copy one split's per-image files from an artifact repository (one file as it is; the files
    of several eval stages merged into one table, :func:`~weakbench.core.metrics.per_image.merge_tables`);
    False when it has none."""
    import shutil
    import tempfile

    from weakbench.core.metrics.per_image import merge_tables, write_table as write_per_image

    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = sorted(it.path for it in repo.list_artifacts(f"{C.PER_IMAGE_DIR}/{split}")
                           if not it.is_dir and it.path.endswith(".parquet"))
            if not files:
                return False
            local = [repo.download_artifacts(f, tmp) for f in files]
        except Exception:  # noqa: BLE001 - an unreachable artifact store: the row says it has none
            return False
        out_dir.mkdir(parents=True, exist_ok=True)
        if len(local) == 1:
            with open(local[0], "rb") as src, atomic_write(out_dir / f"{split}.parquet") as dst:
                shutil.copyfileobj(src, dst)
        else:
            write_per_image(merge_tables([pq.read_table(f) for f in local], split), out_dir / f"{split}.parquet", split)
        return True


def read_per_image(store_dir: Path, run_ids: Iterable[str], split: str = "test") -> dict[str, pa.Table]:
    """``{run id: per-image table}`` of the runs among ``run_ids`` whose ``split`` per-image
    results are in the store (Parquet, data only)."""
    base = Path(store_dir) / PER_IMAGE_STORE_DIR
    out = {}
    for rid in run_ids:
        path = base / rid / f"{split}.parquet"
        if path.is_file():
            out[rid] = pq.read_table(path)
    return out


def writable_dir(path: Path) -> bool:
    """Whether files can be created in directory ``path`` (created if missing): False on a
    read-only mount or without permission."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".weakbench-write-check-"):
            return True
    except OSError:
        return False


def current_table(tracking_uri: str | None, store_dir: Path,
                  experiment: str = DEFAULT_EXPERIMENT) -> tuple[pa.Table, UpdateReport | None]:
    """The results table with every terminal trial run of ``experiment``: the store updated from
    MLflow (:func:`update_store`) and read back; where the store cannot be written (a read-only
    mount) the trial runs are read from MLflow into memory and nothing is written (report ``None``;
    the evaluation runs and per-image results are then those already in the store).
    Without ``tracking_uri``: the store as it is (report ``None``).

    Raises:
        DataError: as :func:`update_store` / :func:`read_store`.
    """
    if tracking_uri is None:
        return read_store(store_dir), None
    if writable_dir(store_dir):
        report = update_store(tracking_uri, store_dir, experiment)
        return read_store(store_dir), report
    return fetch_trial_runs(tracking_uri, experiment, known={}), None


# ---------------------------------------------------------------------- column access
def _map_entries(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a map column into (keys, values, row index of each entry) numpy arrays."""
    ks, vs, ps = [], [], []
    row0 = 0
    for chunk in col.chunks:
        off = chunk.offsets.to_numpy()  # absolute offsets into the (unsliced) children
        lo, hi = int(off[0]), int(off[-1])
        ks.append(chunk.keys[lo:hi].to_numpy(zero_copy_only=False))
        vs.append(chunk.items[lo:hi].to_numpy(zero_copy_only=False))
        ps.append(np.repeat(np.arange(row0, row0 + len(chunk)), np.diff(off)))
        row0 += len(chunk)
    if not ks:
        return np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int64)
    return np.concatenate(ks), np.concatenate(vs), np.concatenate(ps)


def metric_columns(table: pa.Table, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Unpack the ``metrics`` map into ``{name: float64 array (num_rows,)}`` (NaN where a run did
    not log the metric). ``names`` restricts the output; default: every metric in the table."""
    n = table.num_rows
    keys, values, parents = _map_entries(table["metrics"])
    values = values.astype(np.float64)
    wanted = set(names) if names is not None else None
    out: dict[str, np.ndarray] = {}
    if len(keys):
        uniq, inverse = np.unique(keys, return_inverse=True)
        for j, name in enumerate(uniq):
            if wanted is not None and name not in wanted:
                continue
            arr = np.full(n, np.nan)
            sel = inverse == j
            arr[parents[sel]] = values[sel]
            out[str(name)] = arr
    for name in wanted or ():
        out.setdefault(name, np.full(n, np.nan))
    return out


def finite_metric_rows(table: pa.Table) -> np.ndarray:
    """bool (num_rows,): True where every metric the run logged is finite (no NaN, no ±inf).

    A run with a non-finite metric diverged; the leaderboard never selects it. ±DBL_MAX counts as
    infinite (MLflow's SQL stores return ±inf as that value)."""
    ok = np.ones(table.num_rows, dtype=bool)
    _, values, parents = _map_entries(table["metrics"])
    if len(values):
        v = values.astype(np.float64)
        bad = ~np.isfinite(v) | (np.abs(v) >= np.finfo(np.float64).max)  # MLflow's SQL stores keep ±inf as ±DBL_MAX
        ok[parents[bad]] = False
    return ok


def param_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Unpack the ``params`` map into ``{name: object array of str or None (num_rows,)}``."""
    n = table.num_rows
    keys, values, parents = _map_entries(table["params"])
    out: dict[str, np.ndarray] = {}
    if len(keys):
        uniq, inverse = np.unique(keys, return_inverse=True)
        for j, name in enumerate(uniq):
            arr = np.full(n, None, dtype=object)
            sel = inverse == j
            arr[parents[sel]] = values[sel]
            out[str(name)] = arr
    return out
