"""Methods: one module per method, registered by name (``register_method`` / ``build_method``)."""

from weakbench.methods.base import (  # noqa: F401
    Method,
    MethodConfig,
    StageContext,
    StepContext,
    build_method,
    describe_hyperparameters,
    get_method_class,
    list_methods,
    register_method,
    validate_config,
)
