"""Rotary embeddings: ``fastseq.apply_rotary`` against plain PyTorch and ``torch.compile``.

Variants of every case, all on the same q and k:

* ``fastseq``: :func:`fastseq.apply_rotary` on its default backend for the device;
* ``reference``: the eager plain-PyTorch reference, :func:`fastseq.reference.rotary.apply_rotary`;
* ``compiled``: ``torch.compile`` of that reference (left out, with the reason, if it cannot run);
* ``copy``: ``Tensor.copy_`` of q and k into preallocated buffers, the same bytes as one forward.

Rotary is memory-bound: one forward reads q and k and writes two tensors of the same size (the
small cos/sin table is ignored), forward+backward moves twice that. Bandwidth is therefore also
reported as a fraction of the copy's.

``cases(device, quick)`` gives the timing cases, ``memory_cases(device)`` a sweep over the sequence
length for ``python -m fastseq profile rotary``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import fastseq
from fastseq.bench import Case
from fastseq.reference import rotary as reference

SUITE = "rotary"

# The README's results table: these cases (CPU and GPU), against every baseline.
HEADLINES = (
    "fwd+bwd fp32 B4 N2048 H16 D128",
    "fwd fp32 B4 N2048 H16/4 D128 R64",
    "fwd bf16 B8 N4096 H32 D128",
    "fwd+bwd bf16 B8 N4096 H32 D128",
    "fwd bf16 B64 N1 H32 D128 decode",
)
FORWARD, FORWARD_BACKWARD, TRAINING_STEP = "fwd", "fwd+bwd", "train step"
MEMORY_SWEEP = "N"  # the parameter memory_cases sweeps: the x axis of the memory plot


@dataclasses.dataclass(frozen=True)
class Shape:
    """q is ``(batch, seqlen, heads_q, head_dim)`` (or ``(B, H, N, D)`` for layout ``bhnd``)."""

    dtype: torch.dtype
    batch: int
    seqlen: int
    heads_q: int
    head_dim: int
    heads_k: int | None = None  # None: as many as q (no GQA)
    rotary_dim: int | None = None  # None: the whole head
    layout: str = "bnhd"
    decode: bool = False  # one token per row at per-batch positions, as with a KV cache

    @property
    def kv_heads(self) -> int:
        return self.heads_k or self.heads_q

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def tensor_shape(self, heads: int) -> tuple[int, ...]:
        if self.layout == "bhnd":
            return (self.batch, heads, self.seqlen, self.head_dim)
        return (self.batch, self.seqlen, heads, self.head_dim)

    def label(self) -> str:
        heads = f"H{self.heads_q}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads_q else "")
        parts = [_DTYPE_NAMES[self.dtype], f"B{self.batch}", f"N{self.seqlen}", heads]
        parts.append(f"D{self.head_dim}")
        if self.rot_dim != self.head_dim:
            parts.append(f"R{self.rot_dim}")
        if self.layout != "bnhd":
            parts.append(self.layout)
        if self.decode:
            parts.append("decode")
        return " ".join(parts)

    def params(self) -> dict:
        return {
            "dtype": _DTYPE_NAMES[self.dtype], "B": self.batch, "N": self.seqlen,
            "Hq": self.heads_q, "Hk": self.kv_heads, "D": self.head_dim, "R": self.rot_dim,
            "layout": self.layout, "positions": "per-batch" if self.decode else "0..N-1",
        }


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Headline shapes. The CPU one is sized for a small machine: a few seconds per variant.
_CPU = Shape(torch.float32, batch=4, seqlen=2048, heads_q=16, head_dim=128)
_CPU_QUICK = Shape(torch.float32, batch=1, seqlen=256, heads_q=4, head_dim=64)
_GPU = Shape(torch.bfloat16, batch=8, seqlen=4096, heads_q=32, head_dim=128)
_GPU_QUICK = Shape(torch.bfloat16, batch=2, seqlen=512, heads_q=8, head_dim=128)
# Sequence lengths of the memory sweep, around the headline shapes.
_CPU_SWEEP = (256, 512, 1024, 2048, 4096)
_GPU_SWEEP = (1024, 2048, 4096, 8192, 16384)


def _case_list(device: torch.device, quick: bool) -> list[tuple[Shape, str]]:
    """(shape, pass) of every timing case on ``device``."""
    if device.type == "cuda":
        s = _GPU_QUICK if quick else _GPU
        return [
            (s, FORWARD),
            (s, FORWARD_BACKWARD),
            (dataclasses.replace(s, dtype=torch.float16), FORWARD),
            (dataclasses.replace(s, dtype=torch.float32), FORWARD),
            (dataclasses.replace(s, heads_k=s.heads_q // 4), FORWARD_BACKWARD),  # GQA
            (dataclasses.replace(s, rotary_dim=s.head_dim // 2), FORWARD),  # partial rotary
            (dataclasses.replace(s, layout="bhnd"), FORWARD),
            (dataclasses.replace(s, batch=8 * s.batch, seqlen=1, decode=True), FORWARD),
        ]
    s = _CPU_QUICK if quick else _CPU
    gqa_partial = dataclasses.replace(s, heads_k=s.heads_q // 4, rotary_dim=s.head_dim // 2)
    return [
        (s, FORWARD),
        (s, FORWARD_BACKWARD),
        (gqa_partial, FORWARD),
        (dataclasses.replace(s, layout="bhnd"), FORWARD),
    ]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Timing cases on ``device``: fastseq vs reference vs compiled reference, and a copy."""
    compiled, why_not = compiled_reference()
    baselines = {"reference": reference.apply_rotary}
    if compiled is not None:
        baselines["compiled"] = compiled
    skipped = {} if compiled is not None else {"compiled": why_not}
    timed = [
        _case(shape, pass_, device, baselines, skipped=skipped, with_copy=True)
        for shape, pass_ in _case_list(device, quick)
    ]
    head = _case_list(device, quick)[0][0]
    return [*timed, _training_step_case(dataclasses.replace(head, layout="bhnd"), device)]


def memory_cases(device: torch.device) -> list[Case]:
    """Peak-memory sweep over the sequence length, forward and forward+backward."""
    base, lengths = (_GPU, _GPU_SWEEP) if device.type == "cuda" else (_CPU, _CPU_SWEEP)
    baselines = {"reference": reference.apply_rotary}
    return [
        _case(dataclasses.replace(base, seqlen=n), pass_, device, baselines)
        for pass_ in (FORWARD, FORWARD_BACKWARD)
        for n in lengths
    ]


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _case(shape, pass_, device, baselines, skipped=None, with_copy=False) -> Case:
    """Case running ``fastseq.apply_rotary`` and each of ``baselines`` (name -> function with
    the same signature) on one set of inputs; ``with_copy`` adds the copy of q and k."""
    backward = pass_ == FORWARD_BACKWARD
    q, k = (_random(shape, heads, device, backward) for heads in (shape.heads_q, shape.kv_heads))
    cos, sin, positions = _angles(shape, device)
    options = {"positions": positions, "layout": shape.layout}
    make = _forward_backward if backward else _forward
    variants = {
        name: make(op, q, k, cos, sin, options)
        for name, op in {"fastseq": fastseq.apply_rotary, **baselines}.items()
    }
    if with_copy:
        variants["copy"] = _copy(q, k)
    copy_bytes = 2 * (q.nbytes + k.nbytes)  # read q and k, write the same amount
    return Case(
        suite=SUITE,
        name=f"{pass_} {shape.label()}",
        params={"pass": pass_, **shape.params()},
        dtype=shape.dtype,
        variants=variants,
        ours="fastseq",
        baselines=tuple(baselines),
        copy="copy" if with_copy else None,
        bytes_moved=copy_bytes * (2 if backward else 1),
        copy_bytes=copy_bytes,
        skipped=dict(skipped or {}),
    )


def _training_step_case(shape: Shape, device) -> Case:
    """The rotary of a transformers model's training step, as a user's loop runs it: the drop-in
    ``apply_rotary_pos_emb`` on ``(B, H, N, D)`` q and k with the ``(1, N, D)`` tables a
    transformers rotary module returns, ``(q_out.sum() + k_out.sum()).backward()`` (an expanded,
    stride-0 upstream gradient), gradients accumulating into ``.grad``."""
    q, k = (_random(shape, heads, device, True) for heads in (shape.heads_q, shape.kv_heads))
    cos_half, sin_half, _ = _angles(shape, device)
    cos, sin = (torch.cat([t[: shape.seqlen]] * 2, dim=-1)[None] for t in (cos_half, sin_half))

    def step(op):
        def run():
            q_out, k_out = op(q, k, cos, sin)
            (q_out.sum() + k_out.sum()).backward()

        return run

    variants = {"fastseq": fastseq.apply_rotary_pos_emb, "transformers": reference.apply_rotary_pos_emb}
    return Case(
        suite=SUITE,
        name=f"{TRAINING_STEP} {shape.label()}",
        params={"pass": TRAINING_STEP, **shape.params()},
        dtype=shape.dtype,
        variants={name: step(op) for name, op in variants.items()},
        ours="fastseq",
        baselines=("transformers",),
    )


def _random(shape: Shape, heads: int, device, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(shape.tensor_shape(heads), device=device, dtype=shape.dtype)
    return x.requires_grad_(requires_grad)


def _angles(shape: Shape, device):
    """cos/sin tables and positions: tokens at 0..N-1, or (decode) each row at its own offset."""
    context = 4096 if shape.decode else shape.seqlen
    cos, sin = fastseq.nn.RotaryEmbedding(shape.rot_dim).cos_sin(context, device)
    if not shape.decode:
        return cos, sin, None
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, context - shape.seqlen, (shape.batch,), generator=generator)
    return cos, sin, offsets.to(device)


def _forward(op, q, k, cos, sin, options):
    return lambda: op(q, k, cos, sin, **options)


def _forward_backward(op, q, k, cos, sin, options):
    # A fixed upstream gradient; autograd.grad returns fresh gradients instead of accumulating
    # into q.grad, so every call does the same work.
    grads = (torch.randn_like(q), torch.randn_like(k))

    def step():
        q_out, k_out = op(q, k, cos, sin, **options)
        return torch.autograd.grad((q_out, k_out), (q, k), grads)

    return step


def _copy(q, k):
    q_buffer, k_buffer = torch.empty_like(q), torch.empty_like(k)
    q, k = q.detach(), k.detach()  # copying must not record an autograd graph
    return lambda: (q_buffer.copy_(q), k_buffer.copy_(k))


@functools.cache
def compiled_reference():
    """``(torch.compile(reference.apply_rotary), None)``, or ``(None, reason)`` if unavailable.

    Compilation itself happens at the first call; if it fails there, the runner reports the
    variant with the error.
    """
    try:
        compiled = torch.compile(reference.apply_rotary, dynamic=False)
    except Exception as error:  # e.g. a Python version dynamo does not support yet
        return None, f"torch.compile unavailable: {type(error).__name__}: {error}"
    # Every case recompiles the one reference function for its own shapes; past the default limit
    # (8 per function) dynamo would silently run the rest eagerly, a wrong "compiled" baseline.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return compiled, None
