"""Core: the pure layer under the methods and the runtime.

Data sources (``data``), metrics (``metrics``), errors, naming conventions, overlays, input
loading and device helpers. Nothing here imports the methods, the platform (runtime), Ray, MLflow
or Optuna (``lint-imports``, contracts in ``pyproject.toml``).
"""
