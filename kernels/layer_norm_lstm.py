"""Fused LayerNorm-LSTM cell: the step after the recurrent GEMM, and its backward.

The model is fastseq.reference.lstm.layer_norm_lstm_layer: ``pre = x_hat ln_ih + LN(r) ln_hh +
bias`` with ``r = h W_hh^T``, gates i, f, g, o; ``c = f c + i g``; ``h = o tanh(LN(c) ln_c_weight +
ln_c_bias)``. Both normalisations need a whole row, so one program takes one batch row, all of its
columns (the four gate blocks of ``BLOCK`` >= H columns each). The GEMMs stay in cuBLAS; each of
these kernels replaces the dozen or so launches of a step's pointwise and LayerNorm work. Math in
float32; the cell state and the statistics are float32 too.

Rows past their sequence's length (``lengths``) keep their state, output zeros, and in the
backward pass their carries through with zero gradients.
"""

import triton
import triton.language as tl

from fastseq.kernels.grid import next_power_of_2
from fastseq.kernels.lstm import _sigmoid, _tanh


@triton.jit
def _row_active(LENGTHS, b, t, HAS_LENGTHS: tl.constexpr):
    if HAS_LENGTHS:
        active = t < tl.load(LENGTHS + b)
    else:
        active = tl.full([], 1, tl.int1)
    return active


@triton.jit
def _load4(PTR, H, cols, valid):
    """The four gate blocks of a row (H apart), as float32."""
    a = tl.load(PTR + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(PTR + H + cols, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(PTR + 2 * H + cols, mask=valid, other=0.0).to(tl.float32)
    d = tl.load(PTR + 3 * H + cols, mask=valid, other=0.0).to(tl.float32)
    return a, b, c, d


@triton.jit
def _store4(PTR, H, cols, mask, a, b, c, d):
    ty = PTR.dtype.element_ty
    tl.store(PTR + cols, a.to(ty), mask=mask)
    tl.store(PTR + H + cols, b.to(ty), mask=mask)
    tl.store(PTR + 2 * H + cols, c.to(ty), mask=mask)
    tl.store(PTR + 3 * H + cols, d.to(ty), mask=mask)


@triton.jit
def _sum4(a, b, c, d):
    return tl.sum(a) + tl.sum(b) + tl.sum(c) + tl.sum(d)


# The step index changes every launch: specialising on it (t = 1, multiples of 16) would compile
# the same kernel several times over.
@triton.jit(do_not_specialize=["t"])
def _ln_cell_fwd(R, XHAT, LN_IH, LN_HH, BIAS, LNC_W, LNC_B, H_STATE, C_STATE, Y, GATES, STATS,
                 CELLS, LENGTHS, t, H, eps, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                 BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < H
    active = _row_active(LENGTHS, b, t, HAS_LENGTHS)
    store = valid & active
    row4 = b * 4 * H
    # LN over the row's 4H recurrent features: the mean, then the spread about it.
    r0, r1, r2, r3 = _load4(R + row4, H, cols, valid)
    mean = _sum4(r0, r1, r2, r3) / (4 * H)
    r0 = tl.where(valid, r0 - mean, 0.0)
    r1 = tl.where(valid, r1 - mean, 0.0)
    r2 = tl.where(valid, r2 - mean, 0.0)
    r3 = tl.where(valid, r3 - mean, 0.0)
    rstd = 1.0 / tl.sqrt(_sum4(r0 * r0, r1 * r1, r2 * r2, r3 * r3) / (4 * H) + eps)
    r0, r1, r2, r3 = r0 * rstd, r1 * rstd, r2 * rstd, r3 * rstd
    _store4(R + row4, H, cols, store, r0, r1, r2, r3)
    x0, x1, x2, x3 = _load4(XHAT + row4, H, cols, valid)
    gi0, gi1, gi2, gi3 = _load4(LN_IH, H, cols, valid)
    gh0, gh1, gh2, gh3 = _load4(LN_HH, H, cols, valid)
    p0, p1, p2, p3 = x0 * gi0 + r0 * gh0, x1 * gi1 + r1 * gh1, x2 * gi2 + r2 * gh2, x3 * gi3 + r3 * gh3
    if HAS_BIAS:
        b0, b1, b2, b3 = _load4(BIAS, H, cols, valid)
        p0, p1, p2, p3 = p0 + b0, p1 + b1, p2 + b2, p3 + b3
    i, f, g, o = _sigmoid(p0), _sigmoid(p1), _tanh(p2), _sigmoid(p3)
    c_prev = tl.load(C_STATE + b * H + cols, mask=valid, other=0.0)
    c = tl.where(valid, f * c_prev + i * g, 0.0)
    c_mean = tl.sum(c) / H
    c_dev = tl.where(valid, c - c_mean, 0.0)
    c_rstd = 1.0 / tl.sqrt(tl.sum(c_dev * c_dev) / H + eps)
    cn = (c_dev * c_rstd * tl.load(LNC_W + cols, mask=valid, other=0.0).to(tl.float32)
          + tl.load(LNC_B + cols, mask=valid, other=0.0).to(tl.float32))
    h = o * _tanh(cn)
    # Padding rows get zero gates (never read back; the op's outputs stay a function of its inputs).
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    _store4(GATES + row4, H, cols, valid, tl.where(active, i, zero), tl.where(active, f, zero),
            tl.where(active, g, zero), tl.where(active, o, zero))
    tl.store(STATS + b * 4 + 1, rstd, mask=active)
    tl.store(STATS + b * 4 + 2, c_mean, mask=active)
    tl.store(STATS + b * 4 + 3, c_rstd, mask=active)
    c_kept = tl.where(active, c, c_prev)
    tl.store(C_STATE + b * H + cols, c_kept, mask=valid)
    tl.store(CELLS + b * H + cols, c_kept.to(CELLS.dtype.element_ty), mask=valid)
    tl.store(H_STATE + b * H + cols, h.to(H_STATE.dtype.element_ty), mask=store)
    tl.store(Y + b * H + cols, tl.where(active, h, 0.0).to(Y.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["t"])
def _ln_cell_bwd(GATES, CELLS, C_PREV, RHAT, STATS, LN_HH, LNC_W, LNC_B, GY, DH, DC, DPRE, DR,
                 PART_W, PART_B, LENGTHS, t, H, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < H
    active = _row_active(LENGTHS, b, t, HAS_LENGTHS)
    row4 = b * 4 * H
    i, f, g, o = _load4(GATES + row4, H, cols, valid)
    r_rstd = tl.load(STATS + b * 4 + 1)
    c_mean = tl.load(STATS + b * 4 + 2)
    c_rstd = tl.load(STATS + b * 4 + 3)
    dh = tl.load(DH + b * H + cols, mask=valid, other=0.0).to(tl.float32)
    dh_t = dh + tl.load(GY + b * H + cols, mask=valid, other=0.0).to(tl.float32)
    # Output: h = o tanh(c_hat w + shift), c_hat = (c - mean) rstd.
    c = tl.load(CELLS + b * H + cols, mask=valid, other=0.0).to(tl.float32)
    c_hat = tl.where(valid, (c - c_mean) * c_rstd, 0.0)
    w = tl.load(LNC_W + cols, mask=valid, other=0.0).to(tl.float32)
    tc = _tanh(c_hat * w + tl.load(LNC_B + cols, mask=valid, other=0.0).to(tl.float32))
    d_o = dh_t * tc * o * (1.0 - o)
    dcn = tl.where(valid, dh_t * o * (1.0 - tc * tc), 0.0)
    # The cell's LayerNorm, backward.
    dc_hat = dcn * w
    m0 = tl.sum(dc_hat) / H
    m1 = tl.sum(dc_hat * c_hat) / H
    dc_in = tl.load(DC + b * H + cols, mask=valid, other=0.0)
    dc = dc_in + (dc_hat - m0 - c_hat * m1) * c_rstd
    c_prev = tl.load(C_PREV + b * H + cols, mask=valid, other=0.0).to(tl.float32)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    # The recurrent LayerNorm, backward: d r from d pre through ln_hh.
    gh0, gh1, gh2, gh3 = _load4(LN_HH, H, cols, valid)
    e0, e1, e2, e3 = d_i * gh0, d_f * gh1, d_g * gh2, d_o * gh3
    e0 = tl.where(valid, e0, 0.0)
    e1 = tl.where(valid, e1, 0.0)
    e2 = tl.where(valid, e2, 0.0)
    e3 = tl.where(valid, e3, 0.0)
    h0, h1, h2, h3 = _load4(RHAT + row4, H, cols, valid)
    n0 = _sum4(e0, e1, e2, e3) / (4 * H)
    n1 = _sum4(e0 * h0, e1 * h1, e2 * h2, e3 * h3) / (4 * H)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    _store4(DPRE + row4, H, cols, valid, tl.where(active, d_i, zero), tl.where(active, d_f, zero),
            tl.where(active, d_g, zero), tl.where(active, d_o, zero))
    _store4(DR + row4, H, cols, valid,
            tl.where(active, (e0 - n0 - h0 * n1) * r_rstd, zero),
            tl.where(active, (e1 - n0 - h1 * n1) * r_rstd, zero),
            tl.where(active, (e2 - n0 - h2 * n1) * r_rstd, zero),
            tl.where(active, (e3 - n0 - h3 * n1) * r_rstd, zero))
    tl.store(PART_W + b * H + cols, tl.where(active, dcn * c_hat, zero), mask=valid)
    tl.store(PART_B + b * H + cols, tl.where(active, dcn, zero), mask=valid)
    tl.store(DC + b * H + cols, tl.where(active, dc * f, dc_in), mask=valid)
    # Active rows hand their carry to the GEMM that follows (dh = d r W_hh); padding keeps it.
    tl.store(DH + b * H + cols, tl.where(active, zero, dh).to(DH.dtype.element_ty), mask=valid)


def _block(hidden):
    return next_power_of_2(max(hidden, 16))


def _warps(block):
    return 4 if block <= 256 else 8 if block <= 1024 else 16


def cell_forward(r, x_hat, ln_ih, ln_hh, bias, ln_c_w, ln_c_b, h, c, y, gates, stats, cells,
                 lengths, t, eps):
    """One step after the GEMM, all rows: ``r`` (B, 4H) = h W_hh^T in, r_hat out; ``x_hat``
    (B, 4H); the states ``h`` (B, H) and ``c`` (B, H, float32) updated in place; fills ``y``,
    ``gates`` (B, 4H), ``cells`` (B, H), and ``stats`` (B, 4) columns 1..3 (1/std of r, mean and
    1/std of c). Every (B, ...) tensor is contiguous; ``bias`` and ``lengths`` may be None."""
    batch, hidden = c.shape
    if batch == 0:
        return
    block = _block(hidden)
    _ln_cell_fwd[(batch,)](
        r, x_hat, ln_ih, ln_hh, bias if bias is not None else ln_ih, ln_c_w, ln_c_b, h, c, y, gates,
        stats, cells, lengths if lengths is not None else c, t, hidden, eps,
        HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, BLOCK=block,
        num_warps=_warps(block),
    )


def cell_backward(gates, cells, c_prev, r_hat, stats, ln_hh, ln_c_w, ln_c_b, grad_y, dh, dc, dpre,
                  dr, part_w, part_b, lengths, t):
    """One step of the backward, all rows: fills ``dpre`` and ``dr`` (B, 4H) and the rows'
    shares of ln_c_weight's and ln_c_bias's gradients ``part_w``, ``part_b`` (B, H, float32);
    updates the carries: ``dc`` (B, H, float32) to dc_{t-1}, and ``dh`` (B, H) to zero on active
    rows (the caller adds d r W_hh). Every tensor is contiguous."""
    batch, hidden = dc.shape
    if batch == 0:
        return
    block = _block(hidden)
    _ln_cell_bwd[(batch,)](
        gates, cells, c_prev, r_hat, stats, ln_hh, ln_c_w, ln_c_b, grad_y, dh, dc, dpre, dr, part_w,
        part_b, lengths if lengths is not None else dc, t, hidden,
        HAS_LENGTHS=lengths is not None, BLOCK=block, num_warps=_warps(block),
    )
