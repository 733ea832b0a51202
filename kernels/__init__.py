"""Triton kernels of fastseq (installed as ``fastseq.kernels``).

Pure ``@triton.jit`` code plus thin launchers: no autograd, no dispatch, no input checks. Those
live in ``fastseq.ops``, the only place that launches these kernels.
"""
