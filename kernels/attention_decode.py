"""Attention decoding against a long KV cache: split-KV ("flash-decoding") with a reduction.

A decode step has 1..16 query rows per sequence but a cache of thousands of keys, so the work is
spread over the keys instead: program ``(split, batch * kv_head)`` streams one chunk of the cache
and handles, at once, every query row of every query head that shares the kv head (GQA packing),
so each cached key and value is read from memory exactly once. Each program writes a partial
output normalised by its own softmax sum, plus that sum's log-sum-exp; a second kernel merges the
splits. Causality is bottom-right aligned to each sequence's cache length: query ``i`` of ``Lq``
sees keys ``n <= len_b - Lq + i``.
"""

import torch
import triton
import triton.language as tl

from fastseq.kernels.grid import cdiv, flat_grid, flat_program, next_power_of_2
from fastseq.kernels.pointers import tile_ptrs


@triton.jit
def _decode_split(
    Q, K, V, LENS, PART_O, PART_LSE,
    # strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    # sizes and scalars
    HK, GROUP, Lq, D, chunk, n_splits, qk_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split, bhk = flat_program(n_splits)
    b = bhk // HK
    hk = bhk % HK
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)  # row r is query (head hk * GROUP + r // Lq, position r % Lq)
    row_valid = rows < GROUP * Lq
    h = hk * GROUP + rows // Lq
    i = rows % Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q = tl.load(tile_ptrs(Q + b64 * stride_qb, h * stride_qh + i * stride_qm, 1, offs_d, stride_qd),
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    length = tl.load(LENS + b).to(tl.int32)
    last_visible = length - Lq + i  # per row
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(tile_ptrs(K + b64 * stride_kb + hk * stride_kh, offs_n, stride_kn, offs_d, stride_kd),
                    mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V + b64 * stride_vb + hk * stride_vh, offs_n, stride_vn, offs_d, stride_vd),
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = n_valid[None, :] & (offs_n[None, :] <= last_visible[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (bhk.to(tl.int64) * n_splits + split) * BLOCK_M
    tl.store(PART_O + (part + rows[:, None]) * BLOCK_D + offs_d[None, :], out)
    tl.store(PART_LSE + part + rows, lse2)


@triton.jit
def _decode_merge(
    PART_O, PART_LSE, O, LSE, stride_ob, stride_oh, stride_om, stride_od,
    HK, GROUP, Lq, D, n_splits,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bhk = tl.program_id(0)
    b = bhk // HK
    hk = bhk % HK
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Lq
    offs_d = tl.arange(0, BLOCK_D)
    base = bhk.to(tl.int64) * n_splits * BLOCK_M
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(PART_LSE + base + s * BLOCK_M + rows))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_splits):
        w = tl.math.exp2(tl.load(PART_LSE + base + s * BLOCK_M + rows) - m_safe)
        o = tl.load(PART_O + (base + s * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :])
        acc += w[:, None] * o
        total += w
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    h = hk * GROUP + rows // Lq
    i = rows % Lq
    b64 = b.to(tl.int64)
    tl.store(tile_ptrs(O + b64 * stride_ob, h * stride_oh + i * stride_om, 1, offs_d, stride_od),
             out.to(O.dtype.element_ty), mask=row_valid[:, None] & (offs_d < D)[None, :])
    lse = tl.where(total > 0, (m_safe + tl.math.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + (b64 * HK * GROUP + h) * Lq + i, lse, mask=row_valid)


def _splits(batch_kv_heads, cache_len, block_n, interpreted):
    """Enough programs to cover the GPU a few times over, never less than one key block each."""
    target = 4 if interpreted else 528  # 4 x 132 SMs on an H100
    by_occupancy = cdiv(target, max(batch_kv_heads, 1))
    return max(1, min(by_occupancy, cdiv(cache_len, block_n)))


def decode(q, k_cache, v_cache, lengths, out, lse, scale, interpreted=False):
    """Launch decoding. q/out (B, H, Lq, D); caches (B, Hk, S, D); lengths (B,); lse (B, H, Lq)."""
    B, H, Lq, D = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    group = H // Hk
    block_m = max(16, next_power_of_2(group * Lq))
    block_d = max(16, next_power_of_2(D))
    # Key blocks of 64 at 16 bits; float32 (twice the bytes) and head dims above 128 take 32, which
    # keeps the kernel within the 99 KiB of shared memory of sm_86/sm_89 parts.
    wide = q.element_size() == 4 or block_d > 128
    block_n = 16 if interpreted else (32 if wide else 64)
    n_splits = _splits(B * Hk, S, block_n, interpreted)
    chunk = cdiv(cdiv(S, n_splits), block_n) * block_n
    part_o = torch.empty(B * Hk * n_splits * block_m * block_d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(B * Hk * n_splits * block_m, device=q.device, dtype=torch.float32)
    # fp32 runs exact fp32 dots; the interpreter cannot multiply bfloat16 tiles (triton 3.8).
    upcast = q.dtype == torch.float32 or (interpreted and q.dtype == torch.bfloat16)
    _decode_split[flat_grid(n_splits, B * Hk)](
        q, k_cache, v_cache, lengths, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        Hk, group, Lq, D, chunk, n_splits, scale * 1.4426950408889634,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32", num_warps=4,
    )
    _decode_merge[(B * Hk,)](
        part_o, part_lse, out, lse, *out.stride(), Hk, group, Lq, D, n_splits,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
