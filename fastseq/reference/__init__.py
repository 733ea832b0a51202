"""Plain-PyTorch references: the correctness oracle for every kernel and the benchmark baseline.

This package depends on torch alone.
"""
