"""Fused LSTM cell: gate activations, cell update and output in one pass, and its backward.

The recurrent GEMM stays in cuBLAS; these kernels replace the half-dozen pointwise launches around
it. Forward reads the pre-activations ``(B, 4H)`` (input and recurrent projections plus bias,
gate order i, f, g, o) and ``c_prev``, and writes the activated gates (kept for the backward), ``c``
and ``m = o * tanh(c)``. Backward turns ``dm`` and ``dc`` into ``d pre`` and ``dc_prev``. One
program covers ``BLOCK`` hidden units of one batch row; math in fp32.
"""

import triton
import triton.language as tl

from fastseq.kernels.grid import cdiv, next_power_of_2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh via exp of a non-positive argument: no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _cell_fwd(PRE, C_PREV, GATES, C, M, H, s_pre, s_cp, s_g, s_c, s_m, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < H
    pre = PRE + b * s_pre + cols
    i = _sigmoid(tl.load(pre, mask=valid, other=0.0).to(tl.float32))
    f = _sigmoid(tl.load(pre + H, mask=valid, other=0.0).to(tl.float32))
    g = _tanh(tl.load(pre + 2 * H, mask=valid, other=0.0).to(tl.float32))
    o = _sigmoid(tl.load(pre + 3 * H, mask=valid, other=0.0).to(tl.float32))
    c_prev = tl.load(C_PREV + b * s_cp + cols, mask=valid, other=0.0).to(tl.float32)
    c = f * c_prev + i * g
    m = o * _tanh(c)
    gates = GATES + b * s_g + cols
    tl.store(gates, i.to(GATES.dtype.element_ty), mask=valid)
    tl.store(gates + H, f.to(GATES.dtype.element_ty), mask=valid)
    tl.store(gates + 2 * H, g.to(GATES.dtype.element_ty), mask=valid)
    tl.store(gates + 3 * H, o.to(GATES.dtype.element_ty), mask=valid)
    tl.store(C + b * s_c + cols, c.to(C.dtype.element_ty), mask=valid)
    tl.store(M + b * s_m + cols, m.to(M.dtype.element_ty), mask=valid)


@triton.jit
def _cell_bwd(DM, DC, GATES, C_PREV, C, DPRE, DC_PREV, H, s_dm, s_dc, s_g, s_cp, s_c, s_dp, s_dcp,
              BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < H
    gates = GATES + b * s_g + cols
    i = tl.load(gates, mask=valid, other=0.0).to(tl.float32)
    f = tl.load(gates + H, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(gates + 2 * H, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(gates + 3 * H, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(C + b * s_c + cols, mask=valid, other=0.0).to(tl.float32)
    c_prev = tl.load(C_PREV + b * s_cp + cols, mask=valid, other=0.0).to(tl.float32)
    dm = tl.load(DM + b * s_dm + cols, mask=valid, other=0.0).to(tl.float32)
    dc = tl.load(DC + b * s_dc + cols, mask=valid, other=0.0).to(tl.float32)
    tanh_c = _tanh(c)
    dc = dc + dm * o * (1.0 - tanh_c * tanh_c)
    dpre = DPRE + b * s_dp + cols
    ty = DPRE.dtype.element_ty
    tl.store(dpre, (dc * g * i * (1.0 - i)).to(ty), mask=valid)
    tl.store(dpre + H, (dc * c_prev * f * (1.0 - f)).to(ty), mask=valid)
    tl.store(dpre + 2 * H, (dc * i * (1.0 - g * g)).to(ty), mask=valid)
    tl.store(dpre + 3 * H, (dm * tanh_c * o * (1.0 - o)).to(ty), mask=valid)
    tl.store(DC_PREV + b * s_dcp + cols, (dc * f).to(DC_PREV.dtype.element_ty), mask=valid)


def _grid(batch, hidden, block):
    return (batch, cdiv(hidden, block))


def cell_forward(pre, c_prev, gates, c, m):
    """pre (B, 4H), c_prev (B, H) -> fills gates (B, 4H), c and m (B, H). Rows may be strided.

    c_prev and c may be float32 while the rest is lower precision (a float32 cell state).
    """
    batch, hidden = c_prev.shape
    block = min(1024, next_power_of_2(max(hidden, 16)))
    _cell_fwd[_grid(batch, hidden, block)](
        pre, c_prev, gates, c, m, hidden,
        pre.stride(0), c_prev.stride(0), gates.stride(0), c.stride(0), m.stride(0), BLOCK=block,
    )


def cell_backward(dm, dc, gates, c_prev, c, dpre, dc_prev):
    """Fills dpre (B, 4H) and dc_prev (B, H) from dm, dc (B, H) and the forward's gates, c_prev, c."""
    batch, hidden = c.shape
    block = min(1024, next_power_of_2(max(hidden, 16)))
    _cell_bwd[_grid(batch, hidden, block)](
        dm, dc, gates, c_prev, c, dpre, dc_prev, hidden,
        dm.stride(0), dc.stride(0), gates.stride(0), c_prev.stride(0), c.stride(0), dpre.stride(0),
        dc_prev.stride(0), BLOCK=block,
    )
