"""Checks of a sweep's options that run before anything starts (no folder, no Ray, no MLflow run).

Each refusal is a :class:`~weakbench.core.errors.ConfigError` with one line naming the value,
the flag and the fix (the CLI prints it and exits 2):

* :func:`options_error`: a value a :class:`~weakbench.platform.run_spec.SweepOptions` field refuses
  (``--trials 0``, ``--trials -5``, ``--max-failures -1``, ``--trials`` above :data:`~weakbench.platform.run_spec.MAX_TRIALS`);
* :func:`check_sweep_name`: ``--name`` must be one folder name, so the sweep stays under
  ``<output-dir>/sweeps`` (no ``/``, ``..`` or absolute path);
* :func:`check_text_path`: a path that is not valid UTF-8 (MLflow and JSON store paths as text);
* :func:`check_output_dir`: ``--output-dir`` is a file, or cannot be created or written (a
  read-only mount);
* :func:`check_tracking_uri`: an HTTP tracking server that does not answer within
  :data:`PROBE_TIMEOUT_S` seconds (MLflow itself would retry for minutes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from weakbench.core.errors import ConfigError
from weakbench.platform.run_spec import MAX_TRIALS, cli_of
#: seconds an HTTP tracking server gets to answer the start-up probe (no retries)
PROBE_TIMEOUT_S = 5


def _flag(field: str) -> str:
    try:
        cli = cli_of(field)
    except KeyError:
        return field
    return cli["names"][0] if cli and cli.get("kind") != "argument" else field.upper()


def options_error(err: Any) -> ConfigError:
    """One line for the first error of a ``pydantic.ValidationError`` of ``SweepOptions``:
    ``--trials 0: input should be greater than or equal to 1; fix: ...``."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else "?"
    flag = _flag(field)
    value = first.get("input")
    msg = str(first.get("msg", "invalid value"))
    msg = msg[:1].lower() + msg[1:]
    ctx = first.get("ctx") or {}
    if field == "trials":
        fix = f"give --trials between 1 and {MAX_TRIALS} (split a larger search into several sweeps)"
    elif "ge" in ctx or "gt" in ctx:
        fix = f"give {flag} a value {'≥' if 'ge' in ctx else '>'} {ctx.get('ge', ctx.get('gt'))}"
    elif "le" in ctx:
        fix = f"give {flag} a value ≤ {ctx['le']}"
    else:
        fix = f"see weakbench sweep --help for {flag}"
    return ConfigError(f"{flag} {value!r}: {msg}; fix: {fix}")


def check_sweep_name(name: str | None) -> None:
    """``--name`` is one folder name under ``<output-dir>/sweeps``.

    Raises:
        ConfigError: empty, ``.``/``..``, a ``/`` or NUL inside, or an absolute path.
    """
    if name is None:
        return
    if (not name.strip() or name in (".", "..") or "/" in name or os.sep in name or "\0" in name
            or Path(name).is_absolute()):
        raise ConfigError(f"--name {name!r}: a sweep name is one folder name under <output-dir>/sweeps (no '/', '..' "
                          f"or absolute path); fix: give a plain name, e.g. --name cam-lr-search")


def check_text_path(path: str | None, flag: str) -> None:
    """Raise ConfigError when ``path`` is not valid UTF-8 (a directory name with undecodable bytes)."""
    if path is None:
        return
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ConfigError(f"{flag} {shown}: the path is not valid UTF-8 (MLflow and the sweep's files store paths as "
                          f"text); fix: rename it with a UTF-8 name, or give a link to it that has one") from None


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """``path`` resolved, created if missing, and writable (a file is written and removed).

    Raises:
        ConfigError: it is a file, cannot be created, or cannot be written (read-only mount,
            no permission, disk full).
    """
    check_text_path(str(path), flag)
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a directory; fix: give a directory (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".weakbench-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__}); fix: give a "
                          f"writable directory, e.g. {flag} ~/weakbench_runs") from None
    return p.resolve()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking_uri(uri: str | None, flag: str = "--tracking-uri") -> None:
    """An ``http(s)://`` tracking server answers one request within :data:`PROBE_TIMEOUT_S` s
    (MLflow's ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` for the
    probe only; MLflow's defaults, 7 retries with backoff, would take minutes). Other URIs pass.

    Raises:
        ConfigError: the server does not answer (refused, unreachable, timed out, an error status).
    """
    if not uri or not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S)):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - requests, urllib3 and MLflow raise several types
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ConfigError(f"{flag} {uri}: the MLflow tracking server does not answer ({why}); fix: start it or "
                              f"give the right address (or omit {flag} for the local store)") from None


def check_sweep_options(opts: Any) -> None:
    """Every check above on a :class:`~weakbench.platform.run_spec.SweepOptions`, in the order a
    user reads the flags: ``--name``, ``--data``, ``--output-dir``, ``--tracking-uri``.

    Raises:
        ConfigError: the first refused value (nothing created but ``--output-dir`` itself).
    """
    check_sweep_name(opts.name)
    check_text_path(opts.data, "--data")
    check_text_path(opts.space, "SPACE")
    check_output_dir(opts.output_dir)
    check_tracking_uri(opts.tracking_uri)
