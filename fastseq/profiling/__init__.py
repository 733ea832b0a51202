"""Memory profiling: :func:`peak_memory` of one call, and sweeps over a suite's memory cases.

``python -m fastseq profile [suite ...]`` runs the sweeps (see :mod:`fastseq.profiling.sweep`).
"""

from fastseq.profiling.memory import peak_memory

__all__ = ["peak_memory"]
