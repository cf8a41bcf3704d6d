"""Platform: data, metrics, training engine, sweeps, tracking, registry, results tables, CLI.

The subpackage is ``weakbench.platform``; never import it as a top-level ``platform``
(that would shadow the standard library module).
"""
