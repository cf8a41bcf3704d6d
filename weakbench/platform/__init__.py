"""Platform: the runtime (engine, products, executors, sweeps), tracking, registry, results tables, CLI.

It sits above :mod:`weakbench.methods` and :mod:`weakbench.core` and reaches method modules only
through the method registry. The subpackage is ``weakbench.platform``; never import it as a
top-level ``platform`` (that would shadow the standard library module).
"""
