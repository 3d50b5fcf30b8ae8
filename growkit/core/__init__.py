"""The core pipeline: trace -> inject -> finalize -> plan replay.

Each module has one job: ``graph`` (fx tracing, growth points), ``ops`` (the op registry),
``candidates`` (inject), ``branch`` and ``finalize`` (grown branches), ``selection`` (where to grow
within a budget), ``cost`` (params, FLOPs, latency, budgets), ``plan`` (the growth plan as data) and
``surgery`` (growable graph modules; applies plans), ``depgraph`` (Torch-Pruning's dependency
graph), ``widen`` and ``deepen`` (width and depth growth; they register their plan replay with
``surgery``, so they are imported here). Nothing here imports the growth, search or lifelong wings.
"""
from . import deepen, widen  # noqa: F401  (registers the replay of their plan records)
