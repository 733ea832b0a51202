"""Attention: ``fastseq.attention`` against every SDPA backend and the eager reference.

Passes: ``fwd``, ``bwd`` (the backward alone, on a retained graph) and ``fwd+bwd``. FLOPs are
``4 B H Lq Lk D`` for the forward (halved when causal), 2.5x that for the backward. Masked cases
give SDPA the same boolean mask. Decode cases are memory-bound: their bandwidth counts the K/V
cache read once, against a copy of the cache in the same run. A ``matmul`` case records the
device's measured matmul peak for the roofline.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import fastseq
from fastseq.bench import Case
from fastseq.reference import attention as reference

SUITE = "attention"

# The README's results table: these cases (CPU and GPU), against SDPA's backends.
HEADLINES = (
    "fwd+bwd fp32 B2 H4 N512 D64",
    "fwd+bwd fp32 B2 H4 N512 D64 causal",
    "fwd+bwd fp32 B2 H8 N1024 D8",
    "decode fp32 B2 H8/2 S2048 D64",
    "fwd+bwd bf16 B8 H32 N2048 D64",
    "fwd+bwd bf16 B8 H16 N2048 D128 causal",
    "fwd+bwd bf16 B16 H16 N1024 D128 mask=padding",
    "decode bf16 B8 H32/8 S4096 D128",
)
HEADLINE_BASELINES = ("sdpa", "sdpa_flash", "sdpa_cudnn")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool = False
    mask: str | None = None  # "padding": a boolean key-padding mask shared by both sides

    def label(self):
        parts = [_DTYPE_NAMES[self.dtype], f"B{self.batch}", f"H{self.heads}", f"N{self.seqlen}",
                 f"D{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.mask:
            parts.append(f"mask={self.mask}")
        return " ".join(parts)

    def flops(self, pass_):
        forward = 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim
        forward //= 2 if self.causal else 1
        return {"fwd": forward, "bwd": int(2.5 * forward), "fwd+bwd": int(3.5 * forward)}[pass_]


def _sdpa_backends(device):
    """name -> SDPBackend of every SDPA implementation to try on ``device``."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa": None}
    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
             "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _inputs(shape, device, requires_grad):
    def one():
        x = torch.randn(shape.batch, shape.heads, shape.seqlen, shape.head_dim, device=device,
                        dtype=shape.dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = one(), one(), one()
    mask = None
    if shape.mask == "padding":
        lengths = torch.linspace(shape.seqlen // 2, shape.seqlen, shape.batch, device=device).long()
        mask = (torch.arange(shape.seqlen, device=device) < lengths[:, None])[:, None, None, :]
    return q, k, v, mask


def _callables(shape, device):
    """name -> (q, k, v, mask) -> output, for fastseq, each SDPA backend and the reference."""
    from torch.nn.attention import sdpa_kernel

    def ours(q, k, v, mask):
        return fastseq.attention(q, k, v, causal=shape.causal, attn_mask=mask)

    def eager(q, k, v, mask):
        return reference.attention(q, k, v, causal=shape.causal, attn_mask=mask,
                                   compute_dtype=q.dtype)[0]

    def sdpa(backend):
        def run(q, k, v, mask):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=shape.causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=shape.causal)
        return run

    fns = {"fastseq": ours}
    fns.update({name: sdpa(b) for name, b in _sdpa_backends(device).items()})
    if shape.seqlen <= 4096:  # the eager reference materialises B*H*N*N scores
        fns["reference"] = eager
    return fns


def _variant(fn, pass_, q, k, v, mask):
    if pass_ == "fwd":
        return lambda: fn(q, k, v, mask)
    grad = torch.randn_like(q)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v, mask), (q, k, v), grad)
    state = {}

    def backward_only():
        if "out" not in state:  # built on first call (the harness's warm-up), reused after
            state["out"] = fn(q, k, v, mask)
        return torch.autograd.grad(state["out"], (q, k, v), grad, retain_graph=True)

    return backward_only


def _case(shape, pass_, device):
    q, k, v, mask = _inputs(shape, device, requires_grad=pass_ != "fwd")
    variants = {name: _variant(fn, pass_, q, k, v, mask)
                for name, fn in _callables(shape, device).items()}
    return Case(suite=SUITE, name=f"{pass_} {shape.label()}",
                params={"pass": pass_, **{f.name: str(getattr(shape, f.name))
                                          for f in dataclasses.fields(shape)}},
                dtype=shape.dtype, variants=variants, flops=shape.flops(pass_))


def _decode_case(device, batch, heads, kv_heads, cache_len, head_dim, dtype):
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    lengths = torch.full((batch,), cache_len, device=device, dtype=torch.int64)
    k_rep = k_cache.repeat_interleave(heads // kv_heads, 1)
    v_rep = v_cache.repeat_interleave(heads // kv_heads, 1)
    buffer = torch.empty_like(k_cache)
    return Case(
        suite=SUITE,
        name=f"decode {_DTYPE_NAMES[dtype]} B{batch} H{heads}/{kv_heads} S{cache_len} D{head_dim}",
        params={"pass": "decode", "B": batch, "H": heads, "Hk": kv_heads, "S": cache_len,
                "D": head_dim},
        dtype=dtype,
        variants={
            "fastseq": lambda: fastseq.attention_decode(q, k_cache, v_cache, lengths),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep),
            "copy": lambda: (buffer.copy_(k_cache), buffer.copy_(v_cache)),
        },
        copy="copy",
        bytes_moved=2 * k_cache.nbytes,
        copy_bytes=4 * k_cache.nbytes,
    )


def _matmul_case(device, n, dtype):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return Case(suite=SUITE, name=f"matmul peak {_DTYPE_NAMES[dtype]} {n}^3",
                params={"pass": "matmul", "N": n}, dtype=dtype,
                variants={"torch.matmul": lambda: a @ b}, ours="torch.matmul", baselines=(),
                flops=2 * n**3)


def _shapes(device, quick):
    if device.type != "cuda":
        n = 128 if quick else 512
        base = Shape(torch.float32, batch=2, heads=4, seqlen=n, head_dim=64)
        # A U-Net's first level at a fifth of Stable Diffusion's width: 64 channels, 8 heads of 8
        # (fastseq's small-head CPU kernel).
        narrow = Shape(torch.float32, batch=2, heads=8, seqlen=2 * n, head_dim=8)
        return [base, dataclasses.replace(base, causal=True),
                dataclasses.replace(base, mask="padding"), narrow]
    lengths = (512, 2048) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    heads_for = {64: 32, 128: 16}
    shapes = [Shape(torch.bfloat16, 16384 // n, heads_for[d], n, d, causal)
              for d in (64, 128) for causal in (False, True) for n in lengths]
    shapes += [Shape(torch.bfloat16, 16384 // n, 16, n, 128, mask="padding")
               for n in ((1024,) if quick else (1024, 4096))]
    return shapes


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Timing cases: fwd / bwd / fwd+bwd over sequence lengths, masks, decode, matmul peak."""
    out = []
    for shape in _shapes(device, quick):
        passes = ("fwd", "fwd+bwd") if device.type != "cuda" else ("fwd", "bwd", "fwd+bwd")
        out += [_case(shape, p, device) for p in passes]
    if device.type == "cuda":
        for cache_len in ((4096,) if quick else (4096, 16384, 65536)):
            out.append(_decode_case(device, 8, 32, 8, cache_len, 128, torch.bfloat16))
        out.append(_matmul_case(device, 4096 if quick else 8192, torch.bfloat16))
    else:
        out.append(_decode_case(device, 2, 8, 2, 256 if quick else 2048, 64, torch.float32))
        out.append(_matmul_case(device, 256 if quick else 1024, torch.float32))
    return out


def memory_cases(device: torch.device) -> list[Case]:
    """Peak memory of fwd+bwd vs sequence length: linear for fastseq, quadratic for the reference."""
    lengths = (1024, 2048, 4096, 8192, 16384) if device.type == "cuda" else (128, 256, 512, 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for n in lengths:
        shape = Shape(dtype, 1, 8, n, 64, causal=True)
        q, k, v, mask = _inputs(shape, device, requires_grad=True)
        fns = _callables(shape, device)
        keep = {"fastseq": fns["fastseq"], "reference": fns.get("reference")}
        variants = {name: _variant(fn, "fwd+bwd", q, k, v, mask)
                    for name, fn in keep.items() if fn is not None}
        out.append(Case(suite=SUITE, name=f"fwd+bwd {shape.label()}",
                        params={"pass": "fwd+bwd", "N": n}, dtype=dtype, variants=variants))
    return out
