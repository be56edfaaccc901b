"""Executors: where and how the jobs of a sweep run (``kdbench.executors`` plugins).

An executor only executes jobs; the driver owns the run directory (the lock, the store,
``grid.yaml``). Workers, wherever they run, only write their own ``cells/<id>/`` directory and
the shared teacher cache (under its lock); the driver imports their ``result.json`` files.

Built in: ``local`` (inline or N local worker processes), ``submitit`` (Slurm job arrays, or
submitit's local cluster), ``ray`` (Ray tasks on a local or remote cluster). A third party adds
one with a class exposing :class:`kdbench.executors.base.Executor`'s interface and an entry point.
"""

from kdbench.executors.base import Events, Executor, RetryPolicy

__all__ = ["Events", "Executor", "RetryPolicy"]
