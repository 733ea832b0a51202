"""Elman RNN step: the recurrent product and everything pointwise around it, in one launch.

A step of ``h_t = act(x_t W_ih^T + bias + h_{t-1} W_hh^T)`` is a small product (B x H by H x H)
with a pointwise tail; run as cuBLAS plus pointwise kernels it is four launches or more (with
padding rows, the ``where``s too), each waiting on the last. Here one program computes a
``(BLOCK_B, BLOCK_N)`` tile of the product with ``tl.dot`` and finishes it in registers:

* forward (:func:`step_forward`): add the input projection, activate, keep the state of rows
  whose sequence has ended (``lengths``), write the output (zero on padding) and the new state;
* backward (:func:`step_backward`): the carried gradient ``dh_t`` is the next processed step's
  ``d pre W_hh`` (or the carry itself where that step was padding), then
  ``d pre_t = (dh_t + dy_t) act'(y_t)`` from the output alone (``1 - y^2`` for tanh, ``y > 0``
  for relu), zero on padding.

The input projection and the weight gradients are GEMMs over all steps and stay in cuBLAS
(fastseq/ops/rnn.py). Products accumulate in float32; states are stored in the input dtype.
"""

import torch
import triton
import triton.language as tl

from fastseq.kernels.attention import dot, dot_precision
from fastseq.kernels.grid import cdiv, next_power_of_2
from fastseq.kernels.lstm import _tanh
from fastseq.kernels.pointers import tile_ptrs


@triton.jit
def _product(A, s_a, W, s_wk, s_wn, rows, cols, row_valid, col_valid, H,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sum_k A[rows, k] W[k, cols]`` in float32, W's element (k, n) at ``k s_wk + n s_wn``."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < H
        a = tl.load(tile_ptrs(A, rows, s_a, ks, 1), mask=row_valid[:, None] & k_valid[None, :],
                    other=0.0)
        w = tl.load(tile_ptrs(W, ks, s_wk, cols, s_wn), mask=k_valid[:, None] & col_valid[None, :],
                    other=0.0)
        acc += dot(a, w, PRECISION, UPCAST)
    return acc


@triton.jit
def _active_rows(LENGTHS, rows, row_valid, t, HAS_LENGTHS: tl.constexpr):
    """(BLOCK_B,) whether step t is real (not padding) for each row."""
    if HAS_LENGTHS:
        return row_valid & (t < tl.load(LENGTHS + rows, mask=row_valid, other=0))
    return row_valid


# The step index changes every launch: specialising on it would compile the kernel again for
# t = 1 and for multiples of 16.
@triton.jit(do_not_specialize=["t"])
def _step_fwd(H_PREV, W_HH, PRE_X, Y, H_NEXT, LENGTHS, t, B, H, s_hp, s_pre, s_y, s_hn,
              TANH: tl.constexpr, HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid, col_valid = rows < B, cols < H
    valid = row_valid[:, None] & col_valid[None, :]
    # h W_hh^T: element (k, n) of the right operand is W_hh[n, k].
    pre = _product(H_PREV, s_hp, W_HH, 1, H, rows, cols, row_valid, col_valid, H, PRECISION,
                   UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
    pre += tl.load(tile_ptrs(PRE_X, rows, s_pre, cols, 1), mask=valid, other=0.0).to(tl.float32)
    if TANH:
        h = _tanh(pre)
    else:
        h = tl.where(pre < 0.0, 0.0, pre)  # NaN stays NaN, as torch.relu
    y_ptrs = tile_ptrs(Y, rows, s_y, cols, 1)
    if HAS_LENGTHS:  # padding rows keep their state and output zero
        active = _active_rows(LENGTHS, rows, row_valid, t, HAS_LENGTHS)[:, None]
        h_prev = tl.load(tile_ptrs(H_PREV, rows, s_hp, cols, 1), mask=valid, other=0.0)
        h = tl.where(active, h, h_prev.to(tl.float32))
        tl.store(y_ptrs, tl.where(active, h, 0.0).to(Y.dtype.element_ty), mask=valid)
        tl.store(tile_ptrs(H_NEXT, rows, s_hn, cols, 1), h.to(H_NEXT.dtype.element_ty), mask=valid)
    else:  # the state is the output
        tl.store(y_ptrs, h.to(Y.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["t", "t_next"])
def _step_bwd(DPRE_NEXT, W_HH, DH, GRAD_Y, Y, DPRE, LENGTHS, t, t_next, B, H, s_dpn, s_dh, s_gy,
              s_y, s_dp, TANH: tl.constexpr, HAS_NEXT: tl.constexpr, GRAD_PRE: tl.constexpr,
              HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid, col_valid = rows < B, cols < H
    valid = row_valid[:, None] & col_valid[None, :]
    # The carry is read and written at the same elements by the same program: in place is safe.
    dh = tl.load(tile_ptrs(DH, rows, s_dh, cols, 1), mask=valid, other=0.0).to(tl.float32)
    if HAS_NEXT:
        # d pre W_hh: element (k, n) of the right operand is W_hh[k, n].
        through = _product(DPRE_NEXT, s_dpn, W_HH, H, 1, rows, cols, row_valid, col_valid, H,
                           PRECISION, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
        next_active = _active_rows(LENGTHS, rows, row_valid, t_next, HAS_LENGTHS)[:, None]
        dh = tl.where(next_active, through, dh)
        tl.store(tile_ptrs(DH, rows, s_dh, cols, 1), dh.to(DH.dtype.element_ty), mask=valid)
    if GRAD_PRE:
        g = dh + tl.load(tile_ptrs(GRAD_Y, rows, s_gy, cols, 1), mask=valid, other=0.0).to(tl.float32)
        y = tl.load(tile_ptrs(Y, rows, s_y, cols, 1), mask=valid, other=0.0).to(tl.float32)
        if TANH:
            dpre = g * (1.0 - y * y)
        else:
            dpre = tl.where(y > 0.0, g, 0.0)
        active = _active_rows(LENGTHS, rows, row_valid, t, HAS_LENGTHS)[:, None]
        tl.store(tile_ptrs(DPRE, rows, s_dp, cols, 1),
                 tl.where(active, dpre, 0.0).to(DPRE.dtype.element_ty), mask=valid)


def _blocks(batch, hidden, interpreted):
    """Tiles: every dimension at least 16 (tl.dot's minimum); few rows per program, as a batch
    is small and more programs keep more SMs busy."""
    if interpreted:
        return dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, num_warps=1)
    block_b = min(64, max(16, next_power_of_2(batch)))
    return dict(BLOCK_B=block_b, BLOCK_N=32 if hidden > 256 else 16, BLOCK_K=64, num_warps=4)


def _constants(dtype, nonlinearity, lengths, interpreted):
    return dict(TANH=nonlinearity == "tanh", HAS_LENGTHS=lengths is not None,
                PRECISION=dot_precision(dtype), UPCAST=interpreted and dtype == torch.bfloat16)


def step_forward(h_prev, w_hh, pre_x, y, h_next, lengths, t, nonlinearity, interpreted=False):
    """Forward step t: from ``h_prev`` (B, H), ``w_hh`` (H, H) and ``pre_x`` = x_t W_ih^T + bias
    (B, H), writes ``y`` (B, H) (zero where ``t >= lengths``) and, with ``lengths`` (B,) int64,
    the new state ``h_next`` (B, H) (``h_prev`` on padding rows; must not be ``h_prev``). Without
    ``lengths`` the state is ``y``, and ``h_next`` is ignored. Rows may be strided, columns dense.
    """
    batch, hidden = h_prev.shape
    options = _blocks(batch, hidden, interpreted)
    grid = (cdiv(batch, options["BLOCK_B"]), cdiv(hidden, options["BLOCK_N"]))
    h_next = y if h_next is None else h_next
    _step_fwd[grid](h_prev, w_hh, pre_x, y, h_next, lengths, t, batch, hidden,
                    h_prev.stride(0), pre_x.stride(0), y.stride(0), h_next.stride(0),
                    **_constants(h_prev.dtype, nonlinearity, lengths, interpreted), **options)


def step_backward(dpre_next, w_hh, dh, grad_y, y, dpre, lengths, t, t_next, nonlinearity,
                  interpreted=False):
    """Backward step t (processed after step ``t_next`` in the forward; None for the last).

    ``dh`` (B, H), float32, holds the gradient carried into step ``t_next`` on entry and the one
    into step t on return: ``dpre_next W_hh`` where ``t_next`` is real, unchanged where it is
    padding (nothing to do when ``t_next`` is None). Then, unless ``grad_y`` is None, writes
    ``dpre`` (B, H) = (dh + grad_y) act'(y) (zero where ``t >= lengths``). With ``grad_y`` None
    and ``t`` None it computes only the carry: the gradient of h0.
    """
    batch, hidden = dh.shape
    if batch == 0:
        return
    options = _blocks(batch, hidden, interpreted)
    grid = (cdiv(batch, options["BLOCK_B"]), cdiv(hidden, options["BLOCK_N"]))
    has_next, grad_pre = t_next is not None, grad_y is not None
    dpre_next = dpre_next if has_next else dh
    grad_y, y, dpre = (grad_y, y, dpre) if grad_pre else (dh, dh, dh)
    _step_bwd[grid](dpre_next, w_hh, dh, grad_y, y, dpre, lengths, t if t is not None else 0,
                    t_next if has_next else 0, batch, hidden, dpre_next.stride(0), dh.stride(0),
                    grad_y.stride(0), y.stride(0), dpre.stride(0), HAS_NEXT=has_next,
                    GRAD_PRE=grad_pre, **_constants(w_hh.dtype, nonlinearity, lengths, interpreted),
                    **options)
