"""The command-line options several ``weakbench`` commands share, each declared once (issue #17).

``weakbench sweep``'s flags are the fields of :class:`~weakbench.platform.run_spec.SweepOptions`
(:func:`typer_parameter` builds each one's typer form from its declaration); the options other
commands share with it (``--output-dir``, ``--tracking-uri``, ``--experiment``, ``--classes``) are
built from the same declarations here, and the options the read-side commands share with each
other (``--format``, ``--report-split``, ``--baseline``) are declared here too. ``weakbench.cli``
and the dashboard sub-app (``weakbench.dashboards.cli``) import them; no command declares its own.

The tracking URI, for every command, is the first of:

1. ``--tracking-uri URI``;
2. the environment variable ``WEAKBENCH_TRACKING_URI``;
3. ``MLFLOW_TRACKING_URI`` (MLflow's own, kept as an alias:
   :data:`weakbench.core.conventions.TRACKING_URI_ENVVARS`);
4. the default store beside the runs: ``sqlite:///<output-dir>/mlflow.db``
   (:func:`weakbench.platform.tracking.default_tracking_uri`; ``dashboard build``, which has no
   ``--output-dir``, reads ``<store>/../mlflow.db`` when it exists, the same file in the default layout).

The Ray cluster of a sweep is ``--address``, else ``RAY_ADDRESS``, else a private local instance
(:func:`weakbench.platform.sweep_plan.ray_address`).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer

from weakbench.platform import output, run_spec


def cli_type(annotation: Any) -> Any:
    """The type typer parses a flag as, from a field's annotation: ``X | None`` → ``Optional[X]``,
    a ``Literal`` → the type of its values (the field checks the value)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if typing.get_origin(base) is Literal:
        base = type(typing.get_args(base)[0])
    return Optional[base] if optional else base


def typer_parameter(name: str) -> tuple[Any, Any]:
    """``(annotation, typer.Option or typer.Argument)`` of the command-line form of field ``name``
    of :class:`~weakbench.platform.run_spec.SweepOptions` (:func:`run_spec.flag` / :func:`run_spec.argument`).

    Raises:
        ValueError: the field has no command-line form.
    """
    field = run_spec.SweepOptions.model_fields[name]
    cli = run_spec.cli_of(name)
    if cli is None:
        raise ValueError(f"SweepOptions.{name} has no command-line form")
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    if cli["kind"] == "argument":
        return (Path if cli["path"] else cli_type(field.annotation)), typer.Argument(default, help=cli["help"])
    if cli["key_value"]:  # repeatable KEY=VALUE items → the field's dict (_options_from_cli)
        annotation, default = List[str], []
    elif cli["negate"]:  # --no-model: True on the command line is False in the field
        annotation, default = bool, not default
    else:
        annotation = cli_type(field.annotation)
    extra = {k: (list(cli[k]) if isinstance(cli[k], tuple) else cli[k]) for k in ("envvar", "min") if cli[k] is not None}
    return annotation, typer.Option(default, *cli["names"], help=cli["help"] or None, **extra)


def format_option(help: str = output.FORMAT_HELP) -> Any:
    """The ``--format/-f`` option of the commands that print a table (``help`` says what each
    format holds for that command)."""
    return typer.Option(output.OutputFormat.table, "--format", "-f", help=help, case_sensitive=False)


# the options other commands share with `weakbench sweep`, from the same declarations
OUTPUT_DIR = typer_parameter("output_dir")[1]
TRACKING_URI = typer_parameter("tracking_uri")[1]
EXPERIMENT = typer_parameter("experiment")[1]
CLASSES = typer_parameter("classes")[1]
#: ``weakbench status``'s ``--experiment``: the same flag, defaulting to the sweep's own experiment
SWEEP_EXPERIMENT = typer.Option(None, *run_spec.cli_of("experiment")["names"],
                                help="MLflow experiment name (default: the sweep's, or weakbench).")
FORMAT = format_option()
REPORT_SPLIT = typer.Option("test", "--report-split", help="Split whose metrics are reported.")
BASELINE = typer.Option("cam", "--baseline", help="Method the others are compared with (paired over seeds).")
