"""Cross-attention over a short context (at most 256 keys), the U-Net pattern: thousands of image
tokens attend to a few dozen text tokens.

The whole K and V of one (batch, head) fit on chip, so a program loads them once and then sweeps
``ROW_BLOCKS`` query blocks against them with a one-shot softmax (no online rescaling). Queries,
keys, values, the output and an optional residual are read through strides, so a (B, C, H, W)
or channels-last feature map is used in place: no permute, no contiguous copy. The output is
``attention + residual`` when a residual is given.

The backward recomputes each query block's probabilities from the saved log-sum-exp; with every
key of a row in one tile, the softmax correction ``rowsum(P * dP)`` needs no output. A program
writes dQ for its rows and a partial dK/dV summed over its rows only; the partials of the query
chunks are then added up by the caller (no atomics: deterministic).
"""

import torch
import triton
import triton.language as tl

from fastseq.kernels.grid import cdiv, flat_grid, flat_program, next_power_of_2
from fastseq.kernels.pointers import tile_ptrs

MAX_CONTEXT = 256


@triton.jit
def _scores(q, k, ctx_len, offs_n, qk_scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    return tl.where((offs_n < ctx_len)[None, :], s, float("-inf"))


@triton.jit
def _cross_fwd(
    Q, K, V, O, R, LSE, CTX,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rh, stride_rm, stride_rd,
    # sizes and scalars
    H, Lq, Lk, D, qk_scale,
    # meta-parameters
    HAS_CTX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk, bh = flat_program(tl.cdiv(tl.cdiv(Lq, BLOCK_M), ROW_BLOCKS))
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    ctx_len = Lk
    if HAS_CTX:
        ctx_len = tl.minimum(tl.load(CTX + b).to(tl.int32), Lk)
    kv_valid = (offs_n < ctx_len)[:, None] & d_valid[None, :]  # padding is never read
    k = tl.load(tile_ptrs(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, stride_kd),
                mask=kv_valid, other=0.0)
    v = tl.load(tile_ptrs(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_d, stride_vd),
                mask=kv_valid, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    for r in range(ROW_BLOCKS):
        offs_m = (chunk * ROW_BLOCKS + r) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Lq
        io_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(tile_ptrs(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                    mask=io_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        s = _scores(q, k, ctx_len, offs_n, qk_scale, PRECISION)
        row_max = tl.max(s, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        p = tl.math.exp2(s - row_max[:, None])
        total = tl.sum(p, 1)
        seen = total > 0
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / tl.where(seen, total, 1.0)[:, None]
        if HAS_RESIDUAL:
            out += tl.load(tile_ptrs(R + b * stride_rb + h * stride_rh, offs_m, stride_rm, offs_d, stride_rd),
                           mask=io_mask, other=0.0).to(tl.float32)
        tl.store(tile_ptrs(O + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, stride_od),
                 out.to(O.dtype.element_ty), mask=io_mask)
        lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_valid)


@triton.jit
def _cross_bwd(
    Q, K, V, DO, LSE, CTX, DQ, DK_PART, DV_PART,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    # sizes and scalars
    H, Lq, Lk, D, qk_scale, sm_scale,
    # meta-parameters
    HAS_CTX: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk, bh = flat_program(tl.cdiv(tl.cdiv(Lq, BLOCK_M), ROW_BLOCKS))
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    ctx_len = Lk
    if HAS_CTX:
        ctx_len = tl.minimum(tl.load(CTX + b).to(tl.int32), Lk)
    kv_valid = (offs_n < ctx_len)[:, None] & d_valid[None, :]  # padding is never read
    k = tl.load(tile_ptrs(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, stride_kd),
                mask=kv_valid, other=0.0)
    v = tl.load(tile_ptrs(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_d, stride_vd),
                mask=kv_valid, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(ROW_BLOCKS):
        offs_m = (chunk * ROW_BLOCKS + r) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Lq
        io_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(tile_ptrs(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                    mask=io_mask, other=0.0)
        do = tl.load(tile_ptrs(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, stride_dod),
                     mask=io_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        p = tl.math.exp2(_scores(q, k, ctx_len, offs_n, qk_scale, PRECISION) - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        # A row's keys all sit in this tile, so the softmax-backward correction rowsum(dO * O)
        # equals rowsum(P * dP) exactly, without reading O (which may hold a residual).
        delta = tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
        tl.store(tile_ptrs(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqm, offs_d, stride_dqd),
                 dq.to(DQ.dtype.element_ty), mask=io_mask)
    # One partial tile per program: (batch head, chunk) is the flat program id.
    part = tl.program_id(0).to(tl.int64) * BLOCK_N * BLOCK_D
    tile = offs_n[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(DK_PART + part + tile, dk * sm_scale)
    tl.store(DV_PART + part + tile, dv)


def _launch_shape(lq, head_dim, lk, batch_heads, interpreted):
    block_n, block_d = _kv_blocks(head_dim, lk)
    block_m = 16 if interpreted else (64 if block_n * block_d <= 128 * 64 else 32)
    row_blocks_total = cdiv(lq, block_m)
    # enough programs to fill the GPU, each sweeping several query blocks against its K/V
    target = 8 if interpreted else 4 * 132
    chunks = max(1, min(row_blocks_total, cdiv(target, batch_heads)))
    return block_m, block_n, block_d, cdiv(row_blocks_total, chunks)


# A program keeps its whole K and V, and in the backward their gradients, in registers and shared
# memory: past 128 x 256 (context x head dim, rounded up to powers of two) ptxas runs out of
# registers (a float16 head dim of 256 against 256 tokens failed to compile for sm_90).
MAX_TILE = 128 * 256


def _kv_blocks(head_dim, lk):
    """(BLOCK_N, BLOCK_D): the K/V tile of a program, each size rounded up to a power of two."""
    return max(16, next_power_of_2(lk)), max(16, next_power_of_2(head_dim))


def tile_elements(head_dim, lk):
    """Elements of the K (or V) tile a program holds."""
    block_n, block_d = _kv_blocks(head_dim, lk)
    return block_n * block_d


def shared_memory_bytes(lq, head_dim, lk, batch_heads, element_size):
    """A bound on the kernels' shared memory on a GPU: the K and V tiles and the backward's float32
    probabilities, and for float32 (whose products do not run on tensor cores) the query and
    output-gradient tiles too. The dispatcher compares it with the device's limit (a float32 head
    dim of 160 against 77 tokens needs 336 KiB, more than an H100 has); tests/triton_compile_check.py
    checks that it bounds what the compiler allocates for sm_80, sm_86 and sm_90."""
    block_m, block_n, block_d, _ = _launch_shape(lq, head_dim, lk, batch_heads, False)
    rows = 2 * block_n + (2 * block_m if element_size >= 4 else 0)
    return rows * block_d * element_size + block_m * block_n * 4


def _common(q, context_lengths, residual, interpreted):
    upcast = q.dtype == torch.float32 or (interpreted and q.dtype == torch.bfloat16)
    return dict(HAS_CTX=context_lengths is not None, HAS_RESIDUAL=residual is not None,
                PRECISION="ieee" if upcast else "tf32", UPCAST=upcast)


def forward(q, k, v, out, lse, context_lengths, residual, scale, interpreted=False):
    """q/out/residual (B, H, Lq, D) strided views; k/v (B, H, Lk <= 256, D); lse (B, H, Lq) fp32."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_m, block_n, block_d, row_blocks = _launch_shape(Lq, D, Lk, B * H, interpreted)
    grid = flat_grid(cdiv(cdiv(Lq, block_m), row_blocks), B * H)
    r = residual if residual is not None else q
    _cross_fwd[grid](
        q, k, v, out, r, lse, context_lengths if context_lengths is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *r.stride(),
        H, Lq, Lk, D, scale * 1.4426950408889634,
        **_common(q, context_lengths, residual, interpreted), ROW_BLOCKS=row_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )


def backward(do, q, k, v, lse, context_lengths, dq, scale, interpreted=False):
    """Fills dq; returns (dk, dv) float32 (B, H, Lk, D), summed over the query chunks."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_m, block_n, block_d, row_blocks = _launch_shape(Lq, D, Lk, B * H, interpreted)
    chunks = cdiv(cdiv(Lq, block_m), row_blocks)
    dk_part = torch.empty(B, H, chunks, block_n, block_d, device=q.device, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    common = _common(q, context_lengths, None, interpreted)
    common.pop("HAS_RESIDUAL")
    _cross_bwd[flat_grid(chunks, B * H)](
        q, k, v, do, lse, context_lengths if context_lengths is not None else q, dq,
        dk_part, dv_part,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, Lq, Lk, D, scale * 1.4426950408889634, scale, **common, ROW_BLOCKS=row_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    dk = dk_part.sum(2)[:, :, :Lk, :D]
    dv = dv_part.sum(2)[:, :, :Lk, :D]
    return dk, dv
