"""Fused scaled dot-product attention, FlashAttention-2 style: forward, and backward without a
quadratic buffer.

Layout: q ``(B, H, Lq, D)``, k/v ``(B, Hk, Lk, D)`` with ``H % Hk == 0`` (GQA/MQA), any strides.
A program of the forward owns ``BLOCK_M`` query rows of one (batch, head) and streams the keys in
blocks of ``BLOCK_N`` with an online softmax (base-2 exponentials), keeping only a running max,
sum and output tile. It saves the natural-log log-sum-exp per row for the backward.

Masking, all inside the kernel:
* causal, top-left aligned (query ``m`` sees keys ``n <= m``) or bottom-right aligned (``n <= m +
  Lk_b - Lq``, what a KV cache needs); blocks above the diagonal are skipped, not masked;
* per-batch key lengths ``Lk_b``: keys past them are skipped, whole blocks at a time;
* a boolean (True = keep) or additive mask, read through broadcasting strides (stride 0).
Rows that see no key produce zeros and zero gradients (their LSE is ``-inf``).

Dropout uses Philox (``tl.rand``) keyed by ``seed + batch*head`` at offset ``m * Lk + n``: the
backward regenerates exactly the forward's mask. The backward is two kernels, dK/dV (one program
per key block and kv head, summing over the heads of its GQA group) and dQ (one program per query
block): no atomics, so it is deterministic.
"""

import functools

import torch
import triton
import triton.language as tl

from fastseq.kernels.grid import cdiv, flat_grid, flat_program, next_power_of_2
from fastseq.kernels.pointers import tile_ptrs
from fastseq.kernels.tuning import untuned

LOG2E = 1.4426950408889634
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The Triton interpreter multiplies bfloat16 tiles wrongly (triton 3.8): upcast there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_tile(base, rows, row_stride, offs_d, d_stride, row_valid, D, COS, SIN, pos, stride_rotary,
               HALF: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load a (rows, D) tile of q or k; with ROTARY, rotate it at positions ``pos`` on the way in.

    Column d's partner is d +- R/2 (NeoX) or d ^ 1 (GPT-J): out_d = x_d cos - x_partner sin for
    the first of a pair and x_d cos + x_partner sin for the second; columns past R pass through.
    The rotated tile is rounded to the input dtype, as a separate rotary pass would store it.
    """
    valid = row_valid[:, None] & (offs_d < D)[None, :]
    x = tl.load(base + rows[:, None] * row_stride + offs_d[None, :] * d_stride, mask=valid,
                other=0.0)
    if ROTARY:
        if INTERLEAVED:
            first = offs_d % 2 == 0
            partner = tl.where(first, offs_d + 1, offs_d - 1)
            j = offs_d // 2
        else:
            first = offs_d < HALF
            partner = tl.where(first, offs_d + HALF, offs_d - HALF)
            j = tl.where(first, offs_d, offs_d - HALF)
        rotated = row_valid[:, None] & (offs_d < 2 * HALF)[None, :]
        xp = tl.load(base + rows[:, None] * row_stride + partner[None, :] * d_stride, mask=rotated,
                     other=0.0)
        c = tl.load(tile_ptrs(COS, pos, stride_rotary, j, 1), mask=rotated, other=1.0)
        sn = tl.load(tile_ptrs(SIN, pos, stride_rotary, j, 1), mask=rotated, other=0.0)
        sign = tl.where(first, -1.0, 1.0)
        x = (x.to(tl.float32) * c + sign[None, :] * xp.to(tl.float32) * sn).to(x.dtype)
    return x


@triton.jit
def _visible_keys(b, m_start, Lq, Lk, KLEN, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                  HAS_KLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """(key length of batch b, end of the keys any row of this query block may see, diagonal shift)."""
    klen = Lk
    if HAS_KLEN:
        klen = tl.minimum(tl.load(KLEN + b).to(tl.int32), Lk)
    shift = 0
    if BOTTOM_RIGHT:
        shift = klen - Lq
    end = klen
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(m_start + BLOCK_M + shift, 0))
    return klen, end, shift


@triton.jit
def _masked_scores(s, offs_m, offs_n, klen, shift, mask_ptrs, CAUSAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, mask_valid):
    """Scores (already in log2 units) with every masked position set to -inf."""
    keep = offs_n[None, :] < klen
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=mask_valid, other=0) != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=mask_valid, other=0.0).to(tl.float32)
        # In log2 units a bias below about -2.4e38 (finfo(float32).min, as Hugging Face masks
        # hold) would overflow to -inf and mask the key out; it stays a finite, very negative bias.
        bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2.0e38))
        s = s + bias * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, Lk, p_drop):
    offsets = offs_m[:, None] * Lk + offs_n[None, :]
    return tl.rand(seed + bh, offsets) >= p_drop


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, KLEN, COS, SIN,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_rotary,
    # sizes and scalars
    H, GROUP, Lq, Lk, D, qk_scale, p_drop, seed,
    # meta-parameters
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_KLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh = flat_program(tl.cdiv(Lq, BLOCK_M))
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    d_valid = offs_d < D

    klen, end, shift = _visible_keys(b, pid_m * BLOCK_M, Lq, Lk, KLEN, CAUSAL, BOTTOM_RIGHT,
                                     HAS_KLEN, BLOCK_M)
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d,
                   stride_qd, m_valid, D, COS, SIN, tl.maximum(offs_m + shift, 0), stride_rotary,
                   # sizes and scalars
                   HALF, ROTARY, INTERLEAVED)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    mask_base = MASK + b.to(tl.int64) * stride_maskb + h * stride_maskh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < klen  # padding is never read: it may hold anything, NaN included
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, stride_kd, n_valid, D, COS, SIN, offs_n,
                       stride_rotary, HALF, ROTARY, INTERLEAVED)
                       # sizes and scalars
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        mask_ptrs = tile_ptrs(mask_base, offs_m, stride_maskm, offs_n, stride_maskn)
        s = _masked_scores(s, offs_m, offs_n, klen, shift, mask_ptrs, CAUSAL, MASK_KIND,
                           m_valid[:, None] & n_valid[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, p_drop)
            p = tl.where(keep, p / (1.0 - p_drop), 0.0)
        v = tl.load(tile_ptrs(v_base, offs_n, stride_vn, offs_d, stride_vd),
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = tile_ptrs(O + b.to(tl.int64) * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    # strides, in elements
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    # sizes and scalars
    H, Lq, D,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax-backward correction of each query row."""
    pid_m, bh = flat_program(tl.cdiv(Lq, BLOCK_M))
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    b64 = b.to(tl.int64)
    o = tl.load(tile_ptrs(O + b64 * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, stride_od),
                mask=valid, other=0.0).to(tl.float32)
    do = tl.load(tile_ptrs(DO + b64 * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d,
                           stride_dod), mask=valid, other=0.0).to(tl.float32)
                           # sizes and scalars
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _probabilities(q, k, offs_m, offs_n, lse, klen, shift, mask_ptrs, mask_valid, qk_scale,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """Recompute the softmax tile P (BLOCK_M, BLOCK_N) from q, k^T and the saved LSE."""
    s = dot(q, k, PRECISION, UPCAST) * qk_scale
    s = _masked_scores(s, offs_m, offs_n, klen, shift, mask_ptrs, CAUSAL, MASK_KIND, mask_valid)
    # Rows that saw no key have LSE = -inf: treat it as +inf so that P = 0 there.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return tl.math.exp2(s - lse2[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK, KLEN, COS, SIN,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_rotary,
    # sizes and scalars
    H, HK, GROUP, Lq, Lk, D, qk_scale, sm_scale, p_drop, seed,
    # meta-parameters
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_KLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, bhk = flat_program(tl.cdiv(Lk, BLOCK_N))
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Lk
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    b64 = b.to(tl.int64)
    klen, _, shift = _visible_keys(b, 0, Lq, Lk, KLEN, False, BOTTOM_RIGHT, HAS_KLEN, BLOCK_M)
    # Padded keys and values are read as zeros (whatever they hold) and get zero gradients.
    n_read = offs_n < klen
    k = _load_tile(K + b64 * stride_kb + hk * stride_kh, offs_n, stride_kn, offs_d, stride_kd, n_read,
                   D, COS, SIN, offs_n, stride_rotary, HALF, ROTARY, INTERLEAVED)
    v = tl.load(tile_ptrs(V + b64 * stride_vb + hk * stride_vh, offs_n, stride_vn, offs_d, stride_vd),
                mask=n_read[:, None] & d_valid[None, :], other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Under a causal mask, query rows above this key block's diagonal see none of its keys.
    m_lo = pid_n * BLOCK_N
    if CAUSAL:
        m_lo = (tl.maximum(m_lo - shift, 0) // BLOCK_M) * BLOCK_M
    else:
        m_lo = m_lo * 0
    # A key block made only of padding gets zero gradients: skip every query row.
    m_lo = tl.where(pid_n * BLOCK_N >= klen, Lq, m_lo)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        for start_m in range(m_lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < Lq
            q = _load_tile(Q + b64 * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd,
                           m_valid, D, COS, SIN, tl.maximum(offs_m + shift, 0), stride_rotary, HALF,
                           ROTARY, INTERLEAVED)
            do = tl.load(tile_ptrs(DO + b64 * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d,
                                   stride_dod), mask=m_valid[:, None] & d_valid[None, :], other=0.0)
                                   # sizes and scalars
            lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=float("-inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=0.0)
            mask_ptrs = tile_ptrs(MASK + b64 * stride_maskb + h * stride_maskh, offs_m, stride_maskm,
                                  offs_n, stride_maskn)
            p = _probabilities(q, kt, offs_m, offs_n, lse, klen, shift, mask_ptrs,
                               m_valid[:, None] & n_valid[None, :], qk_scale, CAUSAL, MASK_KIND,
                               PRECISION, UPCAST)
            dp = dot(do, vt, PRECISION, UPCAST)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, p_drop)
                p_kept = tl.where(keep, p / (1.0 - p_drop), 0.0)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            else:
                p_kept = p
            dv += dot(tl.trans(p_kept.to(do.dtype)), do, PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    dk = dk * sm_scale
    tl.store(tile_ptrs(DK + b64 * stride_dkb + hk * stride_dkh, offs_n, stride_dkn, offs_d, stride_dkd),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(tile_ptrs(DV + b64 * stride_dvb + hk * stride_dvh, offs_n, stride_dvn, offs_d, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, MASK, KLEN, COS, SIN,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_rotary,
    # sizes and scalars
    H, GROUP, Lq, Lk, D, qk_scale, sm_scale, p_drop, seed,
    # meta-parameters
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_KLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh = flat_program(tl.cdiv(Lq, BLOCK_M))
    b = bh // H
    h = bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    d_valid = offs_d < D
    qm = m_valid[:, None] & d_valid[None, :]
    klen, end, shift = _visible_keys(b, pid_m * BLOCK_M, Lq, Lk, KLEN, CAUSAL, BOTTOM_RIGHT,
                                     HAS_KLEN, BLOCK_M)
    q = _load_tile(Q + b64 * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd, m_valid,
                   D, COS, SIN, tl.maximum(offs_m + shift, 0), stride_rotary, HALF, ROTARY,
                   INTERLEAVED)
    do = tl.load(tile_ptrs(DO + b64 * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, stride_dod),
                 mask=qm, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=float("-inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < klen
        kvm = n_valid[:, None] & d_valid[None, :]
        k = _load_tile(K + b64 * stride_kb + hk * stride_kh, offs_n, stride_kn, offs_d, stride_kd,
                       n_valid, D, COS, SIN, offs_n, stride_rotary, HALF, ROTARY, INTERLEAVED)
        v = tl.load(tile_ptrs(V + b64 * stride_vb + hk * stride_vh, offs_n, stride_vn, offs_d, stride_vd),
                    mask=kvm, other=0.0)
        mask_ptrs = tile_ptrs(MASK + b64 * stride_maskb + h * stride_maskh, offs_m, stride_maskm,
                              offs_n, stride_maskn)
        p = _probabilities(q, tl.trans(k), offs_m, offs_n, lse, klen, shift, mask_ptrs,
                           m_valid[:, None] & n_valid[None, :], qk_scale, CAUSAL, MASK_KIND,
                           PRECISION, UPCAST)
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, p_drop)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    tl.store(tile_ptrs(DQ + b64 * stride_dqb + h * stride_dqh, offs_m, stride_dqm, offs_d, stride_dqd),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qm)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _mask_args(mask):
    """(pointer, kind, 4 strides) of an optional mask already expanded to (B, H, Lq, Lk)."""
    if mask is None:
        return None, MASK_NONE, (0, 0, 0, 0)
    if mask.dtype.is_floating_point:
        return mask, MASK_ADD, mask.stride()
    return mask.view(torch.uint8), MASK_BOOL, mask.stride()


def _interpreter_blocks(head_dim):
    # Small tiles so that tests on tiny shapes still cross several blocks.
    return dict(BLOCK_M=16, BLOCK_N=16), max(16, next_power_of_2(head_dim))


def _gpu_configs(block_ms, block_ns, warps, stages):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_ms for n in block_ns for w in warps for s in stages
    ]


def _fits(configs, named_args, big_head_tile=64 * 64, fallback=None, **kwargs):
    """Drop tiles too large for the head dim (register pressure, shared memory).

    The smallest config kept fits the shared memory of an A100, an H100 and a 99 KiB sm_86/89
    part; a larger one that does not fit a device is skipped there by the autotuner, which scores
    it as out of resources (so more than one must be kept whenever one may not fit).
    tests/triton_compile_check.py compiles the smallest and the largest kept (by tile area x
    stages) for sm_80, sm_86 and sm_90. Per pipeline stage, float32 operands take twice the shared
    memory of 16-bit ones and head dims above 64 more than that: float32 keeps a quarter of the
    tile area and two stages, head dim 128 three stages, above 128 two stages and
    ``big_head_tile``. float32 and head dims above 128 also keep ``fallback`` (for float32 above
    head dim 128 it is all that is left).
    """
    block_d = kwargs["BLOCK_D"]
    limit = 128 * 128 if block_d <= 64 else (128 * 64 if block_d <= 128 else big_head_tile)
    wide = named_args["Q"].element_size() == 4
    if wide:
        limit //= 4
    max_stages = 2 if wide or block_d > 128 else (3 if block_d > 64 else 4)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit
            and c.num_stages <= max_stages]
    if (wide or block_d > 128) and fallback is not None:
        kept.append(fallback)  # the smallest tiles above still exceed a 99 KiB part (sm_86/89)
    return untuned(kept or [fallback or configs[0]])


def _tuned(kernel, block_ms, block_ns, stages, fallback, big_head_tile=64 * 64):
    """``kernel`` autotuned over the tiles and pipeline depths given (warps 4 or 8), pruned by
    :func:`_fits`; key: the sizes that change the best tile."""
    return triton.autotune(
        configs=_gpu_configs(block_ms, block_ns, (4, 8), stages),
        key=["Lq", "Lk", "D"],
        prune_configs_by={"early_config_prune": functools.partial(
            _fits, big_head_tile=big_head_tile,
            fallback=triton.Config(fallback, num_warps=4, num_stages=1))},
    )(kernel)


# Autotuned on GPUs; fixed tiles under the interpreter.
_attn_fwd_tuned = _tuned(_attn_fwd, (64, 128), (32, 64, 128), (2, 3, 4),
                         dict(BLOCK_M=32, BLOCK_N=32))
# dK and dV stay on chip: at head dim 256 a 32 x 128 tile needs 172 KiB, past an A100's 163,
# so above head dim 128 only the unpipelined fallback is left. Pipelined over 32 query rows
# (32 x 64 tiles, 2 stages), dK came out wrong on an H200 with Triton 3.6 at head dims 128 and
# 160 (max error 0.23 against 0.004 for the fp16 reference) while the same tiles unpipelined, and
# 64-row tiles pipelined, were right: the tuned tiles take 64 query rows.
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, (64,), (64, 128), (2, 3),
                              dict(BLOCK_M=16, BLOCK_N=32), big_head_tile=32 * 64)
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, (64, 128), (32, 64), (2, 3), dict(BLOCK_M=32, BLOCK_N=16))


def _pick(kernel, tuned, head_dim, interpreted):
    """(kernel, launch options): the autotuned kernel on GPUs, fixed small tiles when interpreted."""
    if interpreted:
        blocks, block_d = _interpreter_blocks(head_dim)
        return kernel, dict(blocks, BLOCK_D=block_d)
    return tuned, dict(BLOCK_D=max(16, next_power_of_2(head_dim)))


def dot_precision(dtype):
    """tl.dot's input precision for `dtype`: "ieee" for float32 unless torch allows TF32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _rotary_args(cos, sin):
    """(cos, sin, their row stride, half) of optional (S, R/2) rotary tables, made contiguous (they
    are small) so that the kernels take one stride for both."""
    if cos is None:
        return None, None, (0,), 0
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (cos.stride(0),), cos.shape[1]


def _constants(q, mask_kind, key_lengths, causal, bottom_right, p_drop, half, interleaved,
               interpreted):
    return dict(
        CAUSAL=causal, BOTTOM_RIGHT=bottom_right, HAS_KLEN=key_lengths is not None,
        MASK_KIND=mask_kind, DROPOUT=p_drop > 0, PRECISION=dot_precision(q.dtype),
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        HALF=half, ROTARY=half > 0, INTERLEAVED=interleaved,
    )


def forward(q, k, v, out, lse, mask, key_lengths, cos, sin, interleaved, causal, bottom_right,
            scale, p_drop, seed, interpreted=False):
    """Launch the forward. q/out: (B, H, Lq, D); k/v: (B, Hk, Lk, D); lse: (B, H, Lq) fp32.

    ``cos``/``sin``: optional (S, R/2) tables rotating q and k as they are loaded (key ``n`` at
    position ``n``, query ``m`` at ``m`` or, bottom-right aligned, ``m + Lk_b - Lq``).
    """
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    kernel, blocks = _pick(_attn_fwd, _attn_fwd_tuned, D, interpreted)
    mask_t, mask_kind, mstrides = _mask_args(mask)
    cos, sin, rstrides, half = _rotary_args(cos, sin)
    kernel[lambda meta: flat_grid(cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse, q if mask_t is None else mask_t,
        q if key_lengths is None else key_lengths, q if cos is None else cos,
        q if sin is None else sin,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstrides, *rstrides,
        H, H // Hk, Lq, Lk, D, scale * LOG2E, p_drop, seed,
        **_constants(q, mask_kind, key_lengths, causal, bottom_right, p_drop, half, interleaved,
                     interpreted),
        **blocks,
    )


def backward(do, q, k, v, out, lse, dq, dk, dv, mask, key_lengths, cos, sin, interleaved, causal,
             bottom_right, scale, p_drop, seed, interpreted=False):
    """Launch the backward: fills dq (B, H, Lq, D), dk and dv (B, Hk, Lk, D).

    With rotary tables, dq and dk are gradients with respect to the *rotated* q and k; the caller
    rotates them back.
    """
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    block_d = max(16, next_power_of_2(D))
    delta = torch.empty_like(lse)
    _attn_bwd_delta[flat_grid(cdiv(Lq, 16), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, Lq, D, BLOCK_M=16, BLOCK_D=block_d,
    )
    mask_t, mask_kind, mstrides = _mask_args(mask)
    cos, sin, rstrides, half = _rotary_args(cos, sin)
    common = _constants(q, mask_kind, key_lengths, causal, bottom_right, p_drop, half, interleaved,
                        interpreted)
    dkdv, dkdv_blocks = _pick(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, D, interpreted)
    dq_kernel, dq_blocks = _pick(_attn_bwd_dq, _attn_bwd_dq_tuned, D, interpreted)
    extra = (q if mask_t is None else mask_t, q if key_lengths is None else key_lengths,
             q if cos is None else cos, q if sin is None else sin)
    dkdv[lambda meta: flat_grid(cdiv(Lk, meta["BLOCK_N"]), B * Hk)](
        q, k, v, do, dk, dv, lse, delta, *extra,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *mstrides,
        *rstrides, H, Hk, H // Hk, Lq, Lk, D, scale * LOG2E, scale, p_drop, seed,
        **common, **dkdv_blocks,
    )
    dq_kernel[lambda meta: flat_grid(cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *extra,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *mstrides, *rstrides,
        H, H // Hk, Lq, Lk, D, scale * LOG2E, scale, p_drop, seed, **common, **dq_blocks,
    )
