"""The tolerance rule (as in flash-attention's tests).

The truth is the reference computed in float64. A kernel passes when its error against the truth
is at most ``factor`` times the error of the same reference computed in the low precision, plus a
tiny absolute floor.
"""

import torch

FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - truth.double()).abs().max().item()


def assert_within_rule(out, truth, low_precision_ref, name="output", factor=2.0, floor=None):
    """Assert ``out`` is within ``factor`` x the low-precision reference's error of ``truth``,
    plus ``floor`` (by default a tiny absolute one for the dtype)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert out.dtype == low_precision_ref.dtype, f"{name}: dtype {out.dtype} != {low_precision_ref.dtype}"
    err = max_error(out, truth)
    ref_err = max_error(low_precision_ref, truth)
    bound = factor * ref_err + (FLOORS[out.dtype] if floor is None else floor)
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x reference error {ref_err:.3e} + floor"
