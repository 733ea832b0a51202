"""Helpers for autotuned Triton kernels: the size of a config, and tuning switched off.

``FASTSEQ_AUTOTUNE=smallest`` or ``largest`` makes every autotuned kernel take that one of its
kept configs without tuning: a first call then compiles one kernel instead of dozens (tests,
quick starts). ``smallest`` fits every GPU that the full set fits; ``largest`` may need more
shared memory than a smaller GPU has (the autotuner would have skipped it there).
"""

import math
import os


def config_size(config):
    """(tile area x pipeline stages, warps): what a config's shared memory grows with, to order
    configs from smallest to largest."""
    return math.prod(config.kwargs.values()) * config.num_stages, config.num_warps


def untuned(kept):
    """``kept`` (the configs a pruner keeps), or only the one ``FASTSEQ_AUTOTUNE`` names."""
    choice = os.environ.get("FASTSEQ_AUTOTUNE", "").strip().lower()
    if choice not in ("smallest", "largest"):
        return kept
    pick = min if choice == "smallest" else max
    return [pick(kept, key=config_size)]
