"""U-Net cross-attention: the short-context kernel and the whole transformer block.

Kernel cases: image tokens attending to a text context at the levels of Stable Diffusion 1.5
(4096 / 1024 / 256 tokens, heads of 40 / 80 / 160, 77 context tokens) and SDXL (4096 / 1024
tokens, heads of 64, 77 tokens), against every SDPA backend. Block cases: diffusers'
``Transformer2DModel`` with its default attention processor against the same module with
fastseq's processor installed, and fastseq's own ``SpatialTransformer`` of the same shape.
"""

from __future__ import annotations

import copy

import torch

import fastseq
from fastseq.bench import Case
from fastseq.integrations import diffusers as fastseq_diffusers

SUITE = "cross_attention"

# The README's results table: these cases (CPU and GPU).
HEADLINES = (
    "kernel fwd+bwd sd15-32x32 fp32 B1",
    "block fwd+bwd sd15-16x16 fp32 B1",
    "kernel fwd sd15-64x64 fp16 B2",
    "kernel fwd+bwd sd15-64x64 fp16 B2",
)
HEADLINE_BASELINES = ("sdpa", "diffusers", "sdpa_flash", "sdpa_cudnn")
SOURCES = ("kernels/attention.py", "fastseq/integrations/diffusers.py", "fastseq/nn/spatial_transformer.py")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (label, tokens, channels, heads, head_dim, context_dim)
LEVELS = [
    ("sd15-64x64", 4096, 320, 8, 40, 768),
    ("sd15-32x32", 1024, 640, 8, 80, 768),
    ("sd15-16x16", 256, 1280, 8, 160, 768),
    ("sdxl-64x64", 4096, 640, 10, 64, 2048),
    ("sdxl-32x32", 1024, 1280, 20, 64, 2048),
]
CONTEXT = 77


def _sdpa_variants(q, k, v, device):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    def pinned(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    names = (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
             ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH"))
    return {name: pinned(getattr(SDPBackend, b)) for name, b in names if hasattr(SDPBackend, b)}


def _kernel_case(level, pass_, batch, dtype, device):
    label, tokens, _, heads, head_dim, _ = level
    grad = pass_ == "fwd+bwd"
    q = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(batch, heads, CONTEXT, head_dim, device=device, dtype=dtype,
                        requires_grad=grad) for _ in range(2))
    fns = {"fastseq": lambda: fastseq.cross_attention(q, k, v), **_sdpa_variants(q, k, v, device)}
    if grad:
        g = torch.randn_like(q)
        fns = {name: (lambda f=f: torch.autograd.grad(f(), (q, k, v), g)) for name, f in fns.items()}
    flops = 4 * batch * heads * tokens * CONTEXT * head_dim * (3.5 if grad else 1)
    return Case(suite=SUITE, name=f"kernel {pass_} {label} {_DTYPE_NAMES[dtype]} B{batch}",
                params={"pass": pass_, "level": label, "tokens": tokens, "heads": heads,
                        "head_dim": head_dim, "B": batch}, dtype=dtype, variants=fns,
                flops=int(flops))


def _block_case(level, pass_, batch, dtype, device):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    label, tokens, channels, heads, head_dim, context_dim = level
    side = int(tokens**0.5)
    theirs = Transformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                in_channels=channels, cross_attention_dim=context_dim,
                                norm_num_groups=32).to(device, dtype)
    ours = fastseq_diffusers.install(copy.deepcopy(theirs))
    spatial = fastseq.nn.SpatialTransformer(channels, heads, head_dim, context_dim=context_dim
                                            ).to(device, dtype)
    grad = pass_ == "fwd+bwd"
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=grad)
    context = torch.randn(batch, CONTEXT, context_dim, device=device, dtype=dtype)
    fns = {
        "fastseq": lambda: ours(x, encoder_hidden_states=context).sample,
        "diffusers": lambda: theirs(x, encoder_hidden_states=context).sample,
        "fastseq_spatial": lambda: spatial(x, context),
    }
    if grad:
        g = torch.randn_like(x)
        fns = {name: (lambda f=f: torch.autograd.grad(f(), x, g)) for name, f in fns.items()}
    else:
        fns = {name: (lambda f=f: _no_grad(f)) for name, f in fns.items()}
    return Case(suite=SUITE, name=f"block {pass_} {label} {_DTYPE_NAMES[dtype]} B{batch}",
                params={"pass": pass_, "level": label, "channels": channels, "B": batch},
                dtype=dtype, variants=fns, baselines=("diffusers",))


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Kernel and block cases at SD 1.5 and SDXL shapes (smaller levels on the CPU)."""
    if device.type == "cuda":
        dtype, batch = torch.float16, 2
        levels = LEVELS[:2] if quick else LEVELS
    else:
        dtype, batch = torch.float32, 1
        levels = [LEVELS[2]] if quick else [LEVELS[1], LEVELS[2]]
    out = [_kernel_case(level, p, batch, dtype, device) for level in levels
           for p in ("fwd", "fwd+bwd")]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return out
    block_levels = levels if device.type == "cuda" else levels[-1:]
    out += [_block_case(level, p, batch, dtype, device) for level in block_levels
            for p in ("fwd", "fwd+bwd")]
    return out


MEMORY_SWEEP = "tokens"


def memory_cases(device: torch.device) -> list[Case]:
    """Peak memory of the kernel's fwd+bwd at the SD 1.5 levels (small to large), against SDPA."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return [_kernel_case(level, "fwd+bwd", 2 if device.type == "cuda" else 1, dtype, device)
            for level in reversed(LEVELS[:3])]
