"""Compile every Triton kernel for real GPU targets, on a machine without a GPU.

The tests run the Triton kernels under the interpreter, which takes code that the compiler
rejects and knows nothing of registers or shared memory. Here each launcher runs on small CPU
tensors while its launches are recorded instead of run; every recorded launch (for an autotuned
kernel: its smallest and its largest surviving config by tile area x stages) is then specialised as
Triton's JIT would and compiled by Triton's own compiler down to a cubin for sm_80 and sm_90, which
needs no driver. Shared memory is checked against the device's limit for plain kernels and for the
smallest config of an autotuned one; a larger config that does not fit is reported as "skip" (the
autotuner skips it on that device).

Run as a script, without TRITON_INTERPRET: ``python tests/triton_compile_check.py [label ...]``
(optional substrings of the case labels). Prints one line per compiled kernel (shared memory, and
registers and stack per thread where Triton's cuobjdump is found) and exits non-zero, naming the
kernels, when any fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

from fastseq.kernels.tuning import config_size

# sm_80 (A100), sm_86 (RTX 30xx, A10; sm_89 has the same limit) and sm_90 (H100): opt-in shared
# memory per block, in bytes.
TARGETS = {80: 166912, 86: 101376, 90: 232448}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@contextlib.contextmanager
def recorded_launches():
    """Inside the block ``kernel[grid](...)`` records ``(kernel, args, kwargs)`` and runs nothing."""
    launches = []
    original = KernelInterface.__getitem__

    def record(self, grid):
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


def _source(fn: JITFunction, args, kwargs):
    """(ASTSource, compile options) of one launch of ``fn``, specialised as the JIT would: an
    integer equal to 1 and None become constants, and pointers and integers divisible by 16 carry
    that hint (which lets the compiler vectorise and pipeline loads, and so sets shared memory)."""
    unknown = set(kwargs) - set(fn.arg_names) - set(_OPTIONS)
    if unknown:
        raise KeyError(f"{fn.__name__}: unknown keyword arguments {sorted(unknown)}")
    named = dict(zip(fn.arg_names, args, strict=False))  # the rest come as keywords
    named.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = named[param.name] if param.name in named else param.default
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, param.is_const,
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = attr
        elif isinstance(attr, str) and attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def _variants(kernel, args, kwargs):
    """(name, JITFunction, kwargs, must_fit) to compile for one recorded launch. Of an autotuned
    kernel only the smallest kept config must fit every target: the autotuner skips a larger one
    that does not fit a device, as long as a smaller one remains (the largest is compiled all the
    same, so that it at least compiles)."""
    if not isinstance(kernel, Autotuner):
        return [(kernel.fn.__name__, kernel, kwargs, True)]
    configs = kernel.configs
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, dict(zip(kernel.arg_names, args, strict=False)), **kwargs)

    smallest, largest = min(configs, key=config_size), max(configs, key=config_size)
    picked = [(smallest, True)] + ([(largest, False)] if largest is not smallest else [])
    return [(f"{kernel.fn.fn.__name__} {c.kwargs} warps={c.num_warps} stages={c.num_stages}",
             kernel.fn, {**kwargs, **c.kwargs, "num_warps": c.num_warps,
                         "num_stages": c.num_stages}, everywhere)
            for c, everywhere in picked]


def _registers(compiled) -> str:
    """", registers R, stack S B" per thread of a compiled kernel, read from its cubin with the
    cuobjdump Triton ships (empty where it is missing): a stack means registers spilled, which the
    interpreter cannot show and which costs on the GPU."""
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True,
                                   text=True, timeout=60).stdout
    except (AttributeError, OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", registers {found[1]}, stack {found[2]} B" if found else ""


def compile_launches(launches, label):
    """Compile each recorded launch for every target; returns the failures' descriptions."""
    failures = []
    for kernel, args, kwargs in launches:
        for name, fn, kw, everywhere in _variants(kernel, args, kwargs):
            for arch, shared_limit in TARGETS.items():
                where = f"{label}: {name} sm_{arch}"
                try:
                    source, options = _source(fn, args, kw)
                    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                              options=options)
                    shared = compiled.metadata.shared
                    if "cubin" not in compiled.asm:
                        raise RuntimeError("no cubin")
                    if shared > shared_limit and everywhere:
                        raise RuntimeError(f"{shared} bytes of shared memory > {shared_limit}")
                    verdict = "ok   " if shared <= shared_limit else "skip "  # autotuner's call
                    print(f"{verdict} {where} (shared {shared} B{_registers(compiled)})",
                          flush=True)
                except Exception:  # noqa: BLE001 - every failure is reported, then the next runs
                    failures.append(where)
                    print(f"FAIL  {where}\n{traceback.format_exc()}", flush=True)
    return failures


def _launches_of_every_family():
    """(label, launch function) for each family: the launchers on small CPU tensors, with the
    options that change what is compiled (dtypes, masks, causality, rotary, dropout, lengths)."""
    from fastseq.kernels import (
        attention,
        attention_decode,
        cross_attention,
        layer_norm_lstm,
        lstm,
        rnn,
        rotary,
    )

    def t(*shape, dtype=torch.float16):
        return torch.zeros(*shape, dtype=dtype)

    def attention_case(dtype, causal, mask, lengths, rotary_tables, p_drop, head_dim=64):
        q = t(2, 4, 48, head_dim, dtype=dtype)
        k, v = t(2, 2, 80, head_dim, dtype=dtype), t(2, 2, 80, head_dim, dtype=dtype)
        out, lse = torch.empty_like(q), t(2, 4, 48, dtype=torch.float32)
        cos = sin = t(80, 16, dtype=torch.float32) if rotary_tables else None
        key_lengths = torch.tensor([80, 33]) if lengths else None
        common = dict(mask=mask, key_lengths=key_lengths, cos=cos, sin=sin, interleaved=False,
                      causal=causal, bottom_right=causal, scale=0.125, p_drop=p_drop, seed=1)
        attention.forward(q, k, v, out, lse, **common)
        attention.backward(torch.empty_like(q), q, k, v, out, lse, torch.empty_like(q),
                           torch.empty_like(k), torch.empty_like(v), **common)

    def layer_norm_lstm_case(dtype, lengths):
        batch, hidden = 3, 700
        f32 = torch.float32
        layer_norm_lstm.cell_forward(
            t(batch, 4 * hidden, dtype=dtype), t(batch, 4 * hidden, dtype=dtype),
            t(4 * hidden, dtype=dtype), t(4 * hidden, dtype=dtype), t(4 * hidden, dtype=dtype),
            t(hidden, dtype=dtype), t(hidden, dtype=dtype), t(batch, hidden, dtype=dtype),
            t(batch, hidden, dtype=f32), t(batch, hidden, dtype=dtype),
            t(batch, 4 * hidden, dtype=dtype), t(batch, 4, dtype=f32), t(batch, hidden, dtype=f32),
            lengths, 3, 1e-5)
        layer_norm_lstm.cell_backward(
            t(batch, 4 * hidden, dtype=dtype), t(batch, hidden, dtype=f32),
            t(batch, hidden, dtype=f32), t(batch, 4 * hidden, dtype=dtype), t(batch, 4, dtype=f32),
            t(4 * hidden, dtype=dtype), t(hidden, dtype=dtype), t(hidden, dtype=dtype),
            t(batch, hidden, dtype=dtype), t(batch, hidden, dtype=dtype),
            t(batch, hidden, dtype=f32), t(batch, 4 * hidden, dtype=dtype),
            t(batch, 4 * hidden, dtype=dtype), t(batch, hidden, dtype=f32),
            t(batch, hidden, dtype=f32), lengths, 3)

    def lstm_case(dtype):
        pre, c = t(4, 4 * 300, dtype=dtype), t(4, 300, dtype=torch.float32)
        lstm.cell_forward(pre, c, torch.empty_like(pre), torch.empty_like(c), t(4, 300, dtype=dtype))
        lstm.cell_backward(t(4, 300, dtype=dtype), c, pre, c, c, torch.empty_like(pre),
                           torch.empty_like(c))

    def rnn_case(dtype, nonlinearity, lengths):
        batch, hidden = 40, 300
        h, w = t(batch, hidden, dtype=dtype), t(hidden, hidden, dtype=dtype)
        rnn.step_forward(h, w, h, torch.empty_like(h), torch.empty_like(h), lengths, 3, nonlinearity)
        dh = t(batch, hidden, dtype=torch.float32)
        rnn.step_backward(h, w, dh, h, h, torch.empty_like(h), lengths, 3, 4, nonlinearity)
        rnn.step_backward(h, w, dh, None, None, None, lengths, None, 4, nonlinearity)

    def rotary_case(dtype, positions, interleaved):
        q, k = t(2, 40, 8, 128, dtype=dtype), t(2, 40, 2, 128, dtype=dtype)
        cos = sin = t(1, 64, 32, dtype=torch.float32)
        rotary.rotary(torch.empty_like(q), torch.empty_like(k), q, k, cos, sin,
                      torch.zeros(2, 40, dtype=torch.int64) if positions else None, 0, 64,
                      interleaved, False)

    def decode_case(dtype):
        q = t(2, 8, 1, 128, dtype=dtype)
        cache = t(2, 2, 300, 128, dtype=dtype)
        attention_decode.decode(q, cache, cache, torch.tensor([300, 7]), torch.empty_like(q),
                                t(2, 8, 1, dtype=torch.float32), 0.088)

    def cross_case(dtype, residual, lengths):
        q, kv = t(2, 8, 1024, 40, dtype=dtype), t(2, 8, 77, 40, dtype=dtype)
        ctx = torch.tensor([77, 20]) if lengths else None
        cross_attention.forward(q, kv, kv, torch.empty_like(q), t(2, 8, 1024, dtype=torch.float32),
                                ctx, q if residual else None, 0.158)
        cross_attention.backward(q, q, kv, kv, t(2, 8, 1024, dtype=torch.float32), ctx,
                                 torch.empty_like(q), 0.158)

    bool_mask = torch.zeros(2, 4, 48, 80, dtype=torch.bool)
    add_mask = torch.zeros(2, 4, 48, 80, dtype=torch.float32)
    return [
        ("attention fp16 plain", lambda: attention_case(torch.float16, False, None, False, False, 0.0)),
        ("attention bf16 causal lengths bool-mask dropout",
         lambda: attention_case(torch.bfloat16, True, bool_mask, True, False, 0.1)),
        ("attention fp32 additive-mask rotary",
         lambda: attention_case(torch.float32, False, add_mask, False, True, 0.0)),
        ("attention fp32 head_dim 128 causal",
         lambda: attention_case(torch.float32, True, None, False, False, 0.0, head_dim=128)),
        ("attention fp16 head_dim 128",
         lambda: attention_case(torch.float16, False, None, False, False, 0.0, head_dim=128)),
        ("attention bf16 head_dim 128 causal lengths bool-mask dropout",
         lambda: attention_case(torch.bfloat16, True, bool_mask, True, False, 0.1, head_dim=128)),
        ("attention fp16 head_dim 256",
         lambda: attention_case(torch.float16, False, None, False, False, 0.0, head_dim=256)),
        ("attention fp32 head_dim 256",
         lambda: attention_case(torch.float32, False, None, False, False, 0.0, head_dim=256)),
        ("attention_decode fp16", lambda: decode_case(torch.float16)),
        ("attention_decode fp32", lambda: decode_case(torch.float32)),
        ("cross_attention fp16 residual", lambda: cross_case(torch.float16, True, False)),
        ("cross_attention bf16 context lengths", lambda: cross_case(torch.bfloat16, False, True)),
        ("lstm fp16", lambda: lstm_case(torch.float16)),
        ("lstm fp32", lambda: lstm_case(torch.float32)),
        ("layer_norm_lstm bf16 lengths",
         lambda: layer_norm_lstm_case(torch.bfloat16, torch.tensor([3, 1, 0]))),
        ("layer_norm_lstm fp32", lambda: layer_norm_lstm_case(torch.float32, None)),
        ("rnn fp32 tanh", lambda: rnn_case(torch.float32, "tanh", None)),
        ("rnn bf16 relu lengths", lambda: rnn_case(torch.bfloat16, "relu", torch.tensor([3] * 40))),
        ("rnn fp16 tanh lengths", lambda: rnn_case(torch.float16, "tanh", torch.tensor([3] * 40))),
        ("rotary fp16 positions", lambda: rotary_case(torch.float16, True, False)),
        ("rotary bf16 interleaved", lambda: rotary_case(torch.bfloat16, False, True)),
    ]


def check_cross_attention_estimate():
    """The cross-attention dispatcher declines a shape whose estimated shared memory
    (``shared_memory_bytes``) exceeds the device's: the estimate must bound what the compiled
    kernels take, for every target, at the head dims and contexts that come near the limits.
    Returns the failures."""
    from fastseq.kernels import cross_attention

    failures = []
    # float32 at large tiles is left out: it is declined everywhere (its bound is over 227 KiB) and
    # one backward there takes ptxas about 90 s; (float32, 64, 32) checks the float32 formula.
    for dtype, head_dim, context in ((torch.float16, 160, 77), (torch.float16, 128, 256),
                                     (torch.bfloat16, 256, 128), (torch.float16, 64, 77),
                                     (torch.float32, 64, 32)):
        q, kv = torch.zeros(2, 8, 1024, head_dim, dtype=dtype), torch.zeros(2, 8, context, head_dim,
                                                                            dtype=dtype)
        lse = torch.zeros(2, 8, 1024)
        estimate = cross_attention.shared_memory_bytes(1024, head_dim, context, 16, q.element_size())
        with recorded_launches() as launches:
            cross_attention.forward(q, kv, kv, torch.empty_like(q), lse, None, None, 0.1)
            cross_attention.backward(q, q, kv, kv, lse, None, torch.empty_like(q), 0.1)
        for (fn, args, kwargs), arch in itertools.product(launches, TARGETS):
            where = (f"cross_attention estimate {dtype} D{head_dim} context {context}: "
                     f"{fn.__name__} sm_{arch}")
            source, options = _source(fn, args, kwargs)
            shared = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                    options=options).metadata.shared
            fits = shared <= estimate
            print(f"{'ok   ' if fits else 'FAIL '} {where} (shared {shared} B, estimate {estimate} B)",
                  flush=True)
            if not fits:
                failures.append(where)
    return failures


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    wanted = sys.argv[1:]  # optional: only the cases whose label contains one of these
    failures = []
    for label, launch in _launches_of_every_family():
        if wanted and not any(w in label for w in wanted):
            continue
        with recorded_launches() as launches:
            launch()
        if not launches:
            failures.append(f"{label}: nothing launched")
        failures += compile_launches(launches, label)
    if not wanted or any("cross_attention" in w for w in wanted):
        failures += check_cross_attention_estimate()
    print(f"{len(failures)} failed" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
