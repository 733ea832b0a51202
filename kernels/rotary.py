"""Fused rotary positional embedding: rotates q and k in one launch.

One program owns ``BLOCK_N`` tokens of one batch row and a group of heads drawn from q's heads
followed by k's heads. It loads the cos/sin rows of its tokens once and reuses them for every head
of the group, which keeps the table out of the memory traffic: each element of q and k is read
once and written once. Math is fp32 whatever the storage dtype.

Semantics (shared with the C++/CUDA kernels and ``fastseq.reference.rotary.rotate``): pair ``j``
is columns ``(j, j + R/2)`` (NeoX) or ``(2j, 2j + 1)`` (GPT-J); with angles ``c1, c2, s1, s2`` of
the pair, ``out1 = c1 x1 - s1 x2`` and ``out2 = c2 x2 + s2 x1``; ``CONJUGATE`` applies the
transpose (the backward). Columns past the rotary dim are copied when out-of-place.
"""

import triton
import triton.language as tl

from fastseq.kernels.grid import cdiv, flat_grid, flat_program, next_power_of_2

POS_OFFSET, POS_PER_BATCH, POS_IDS = 0, 1, 2


@triton.jit
def _rotate_head(
    x_ptr, out_ptr,
    # strides
    stride_x_token, stride_x_dim, stride_out_token, stride_out_dim,
    # the block: tokens, pair columns, tail columns, masks and the pairs' angles
    n64, col1, col2, t, mask, t_mask, c1, c2, s1, s2,
    # meta-parameters
    COPY_TAIL: tl.constexpr,
):
    """Rotate one head of a block of tokens: the pointers are at (batch, head) of input and output."""
    x_tok = x_ptr + n64[:, None] * stride_x_token
    o_tok = out_ptr + n64[:, None] * stride_out_token
    x1 = tl.load(x_tok + col1[None, :] * stride_x_dim, mask=mask, other=0.0)
    x2 = tl.load(x_tok + col2[None, :] * stride_x_dim, mask=mask, other=0.0)
    o1 = c1 * x1.to(tl.float32) - s1 * x2.to(tl.float32)
    o2 = c2 * x2.to(tl.float32) + s2 * x1.to(tl.float32)
    tl.store(o_tok + col1[None, :] * stride_out_dim, o1.to(x1.dtype), mask=mask)
    tl.store(o_tok + col2[None, :] * stride_out_dim, o2.to(x1.dtype), mask=mask)
    if COPY_TAIL:
        rest = tl.load(x_tok + t[None, :] * stride_x_dim, mask=t_mask, other=0.0)
        tl.store(o_tok + t[None, :] * stride_out_dim, rest, mask=t_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
    seqlen, heads_q, heads_total, offset,
    # strides: (batch, token, head, dim) of q, k and their outputs
    stride_q_batch, stride_q_token, stride_q_head, stride_q_dim,
    stride_k_batch, stride_k_token, stride_k_head, stride_k_dim,
    stride_qo_batch, stride_qo_token, stride_qo_head, stride_qo_dim,
    stride_ko_batch, stride_ko_token, stride_ko_head, stride_ko_dim,
    # strides: (batch, position, column) of the tables, (batch, token) of the positions
    stride_cos_batch, stride_cos_pos, stride_cos_col,
    stride_sin_batch, stride_sin_pos, stride_sin_col,
    stride_pos_batch, stride_pos_token,
    # meta-parameters
    HALF: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, TAIL: tl.constexpr,
    POS_MODE: tl.constexpr, FULL_TABLE: tl.constexpr, INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    pid_n, b = flat_program(tl.cdiv(seqlen, BLOCK_N))
    b = b.to(tl.int64)
    first_head = tl.program_id(1).to(tl.int64) * HEADS_PER_PROG

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < seqlen
    n64 = n.to(tl.int64)
    if POS_MODE == 0:
        pos = offset + n64
    elif POS_MODE == 1:
        pos = offset + tl.load(pos_ptr + b * stride_pos_batch).to(tl.int64) + n64
    else:
        pos = tl.load(pos_ptr + b * stride_pos_batch + n64 * stride_pos_token, mask=n_mask,
                      other=0).to(tl.int64)

    j = tl.arange(0, BLOCK_R)
    j_mask = j < HALF
    if INTERLEAVED:
        col1 = 2 * j
        col2 = 2 * j + 1
    else:
        col1 = j
        col2 = j + HALF
    mask = n_mask[:, None] & j_mask[None, :]

    # Angles of every (token, pair), loaded once for all heads of this program.
    cos_row = cos_ptr + b * stride_cos_batch + pos[:, None] * stride_cos_pos
    sin_row = sin_ptr + b * stride_sin_batch + pos[:, None] * stride_sin_pos
    if FULL_TABLE:
        c1 = tl.load(cos_row + col1[None, :] * stride_cos_col, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + col2[None, :] * stride_cos_col, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + col1[None, :] * stride_sin_col, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + col2[None, :] * stride_sin_col, mask=mask, other=0.0).to(tl.float32)
    else:
        c1 = tl.load(cos_row + j[None, :] * stride_cos_col, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + j[None, :] * stride_sin_col, mask=mask, other=0.0).to(tl.float32)
        c2 = c1
        s2 = s1
    if CONJUGATE:
        s1, s2 = -s2, -s1

    t = 2 * HALF + tl.arange(0, BLOCK_T)
    t_mask = n_mask[:, None] & (t < 2 * HALF + TAIL)[None, :]

    for i in range(HEADS_PER_PROG):
        h = first_head + i
        if h < heads_q:
            _rotate_head(q_ptr + b * stride_q_batch + h * stride_q_head,
                         q_out_ptr + b * stride_qo_batch + h * stride_qo_head,
                         stride_q_token, stride_q_dim, stride_qo_token, stride_qo_dim,
                         n64, col1, col2, t, mask, t_mask, c1, c2, s1, s2, COPY_TAIL)
        elif h < heads_total:
            kh = h - heads_q
            _rotate_head(k_ptr + b * stride_k_batch + kh * stride_k_head,
                         k_out_ptr + b * stride_ko_batch + kh * stride_ko_head,
                         stride_k_token, stride_k_dim, stride_ko_token, stride_ko_dim,
                         n64, col1, col2, t, mask, t_mask, c1, c2, s1, s2, COPY_TAIL)


def _launch_shape(batch, seqlen, heads_total, half):
    """Tokens per program and heads per program: tiles of ~2k elements, enough programs to fill a GPU."""
    block_r = next_power_of_2(max(half, 1))
    block_n = max(1, min(next_power_of_2(max(seqlen, 1)), 2048 // block_r))
    token_blocks = batch * cdiv(seqlen, block_n)
    heads_per_prog = heads_total
    while heads_per_prog > 1 and token_blocks * cdiv(heads_total, heads_per_prog) < 1024:
        heads_per_prog = cdiv(heads_per_prog, 2)
    return block_n, block_r, heads_per_prog


def _in_place(q_out, k_out, q, k):
    """Whether the outputs are the inputs (asked of whichever operand has elements: an empty
    tensor and its empty_like share the null pointer)."""
    if q.numel():
        return q_out.data_ptr() == q.data_ptr()
    return k_out.data_ptr() == k.data_ptr()


def rotary(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate):
    """Launch the fused rotary kernel; arguments exactly as ``torch.ops.fastseq.rotary_kernel``.

    q/k/q_out/k_out: (B, N, H, D) with any strides (outputs may be the inputs: in place);
    cos/sin: (Bc, S, W) with Bc in {1, B}, W in {R/2, R}; positions: None, (B,) or (B, N).
    """
    batch, seqlen, heads_q, dim = q.shape
    heads_total = heads_q + k.shape[2]
    if batch == 0 or seqlen == 0 or heads_total == 0:
        return
    half = rotary_dim // 2
    tail = dim - rotary_dim
    block_n, block_r, heads_per_prog = _launch_shape(batch, seqlen, heads_total, half)
    if positions is None:
        mode, pos, stride_pos = POS_OFFSET, cos, (0, 0)  # pos_ptr is never read in this mode
    elif positions.dim() == 1:
        mode, pos, stride_pos = POS_PER_BATCH, positions, (positions.stride(0), 0)
    else:
        mode, pos, stride_pos = POS_IDS, positions, positions.stride()
    # A table shared by every batch row is read at row 0.
    stride_cos = (cos.stride(0) if cos.shape[0] > 1 else 0, *cos.stride()[1:])
    stride_sin = (sin.stride(0) if sin.shape[0] > 1 else 0, *sin.stride()[1:])
    grid = flat_grid(cdiv(seqlen, block_n), batch, cdiv(heads_total, heads_per_prog))
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin, pos,
        seqlen, heads_q, heads_total, offset,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *stride_cos, *stride_sin, *stride_pos,
        HALF=half, HEADS_PER_PROG=heads_per_prog,
        BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_T=next_power_of_2(max(tail, 1)), TAIL=tail,
        POS_MODE=mode, FULL_TABLE=cos.shape[2] == rotary_dim, INTERLEAVED=interleaved,
        CONJUGATE=conjugate, COPY_TAIL=tail > 0 and not _in_place(q_out, k_out, q, k),
        num_warps=4,
    )
