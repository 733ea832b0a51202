"""U-Net cross-attention: the short-context kernel, the SpatialTransformer block, diffusers."""

import warnings

import pytest
import torch
from tolerance import FLOORS, max_error

import fastseq
from fastseq import _backend
from fastseq.integrations import diffusers as fastseq_diffusers
from fastseq.ops import cross_attention as cross_attention_ops
from fastseq.reference import attention as ref

# triton: the short-context kernel (interpreted here); cpu: the general path through torch's CPU
# flash kernel.
BACKENDS = [b for b in ("triton", "cpu") if b in fastseq.available_backends("cpu")] or ["reference"]


def _check(name, got, truth, low, factor=2.0):
    err, ref_err = max_error(got, truth), max_error(low, truth)
    bound = factor * ref_err + FLOORS[low.dtype] * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x reference error {ref_err:.3e}"


def _feature_map_kernel_matches_reference(backend, dtype, head_dim, layout, with_residual,
                                          device="cpu", size=(2, 5, 7, 13)):
    heads, (batch, height, width, context) = 2, size
    x = torch.randn(batch, heads * head_dim, height, width, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    k64 = torch.randn(batch, heads, context, head_dim, dtype=torch.float64)
    v64 = torch.randn(batch, heads, context, head_dim, dtype=torch.float64)
    lengths = torch.tensor([context, 4] + [context] * (batch - 2))
    xs, k, v = (t.to(device, dtype).requires_grad_() for t in (x, k64, v64))
    q = fastseq.feature_map_heads(xs, heads)
    residual = q if with_residual else None  # the feature map itself, as in a residual block
    # On a GPU with too little shared memory for this shape the kernel declines before launching.
    falls_back = "shared memory" in cross_attention_ops._unsupported(q, k).get(backend, "")
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore" if falls_back else "error", UserWarning)
        out = fastseq.cross_attention(q, k, v, context_lengths=lengths.to(device), residual=residual)
        grad = torch.randn(out.shape, dtype=dtype).to(out.device)
        got = [g.cpu() for g in torch.autograd.grad(out, (xs, k, v), grad)]
    assert out.stride() == q.stride(), "the output keeps the feature map's layout"
    out, grad = out.cpu(), grad.cpu()

    leaves64 = [t.detach().requires_grad_() for t in (x, k64, v64)]
    q64 = fastseq.feature_map_heads(leaves64[0], heads)
    truth = ref.attention(q64, leaves64[1], leaves64[2], key_lengths=lengths)[0]
    truth = truth + q64 if with_residual else truth
    want = torch.autograd.grad(truth, leaves64, grad.double())
    low_leaves = [t.detach().cpu().requires_grad_() for t in (xs, k, v)]
    q_low = fastseq.feature_map_heads(low_leaves[0], heads)
    low = ref.attention(q_low, low_leaves[1], low_leaves[2], key_lengths=lengths,
                        compute_dtype=dtype)[0]
    low = low + q_low if with_residual else low
    low_grads = torch.autograd.grad(low, low_leaves, grad)
    _check("out", out, truth, low)
    for name, g, w, lo in zip(("dx", "dk", "dv"), got, want, low_grads, strict=True):
        _check(name, g, w, lo, factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_kernel_on_feature_maps_matches_reference(backend, dtype, head_dim, layout, with_residual):
    _feature_map_kernel_matches_reference(backend, dtype, head_dim, layout, with_residual)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_kernel_on_the_gpu(dtype, head_dim, layout):
    """A 32x33 feature map (1056 query tokens, many blocks) against a 77-token context. float32
    at head dim 160 needs more shared memory than any GPU has: it takes the general path."""
    _feature_map_kernel_matches_reference("triton", dtype, head_dim, layout, True, device="cuda",
                                          size=(3, 32, 33, 77))


@pytest.mark.skipif(not _backend.triton_importable(), reason="the limit is the Triton kernel's")
def test_tiles_too_large_for_the_kernel_take_the_general_path():
    """head dim 160 against 200 tokens: a 256 x 256 K tile, more than a program can hold."""
    q, k, v = torch.randn(1, 2, 30, 160), torch.randn(1, 2, 200, 160), torch.randn(1, 2, 200, 160)
    assert "context tokens" in cross_attention_ops._unsupported(q, k).get("triton", "")
    assert cross_attention_ops._unsupported(q, k[:, :, :77]) == {}
    want = ref.attention(q.double(), k.double(), v.double())[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = fastseq.cross_attention(q, k, v)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context", [1, 77, 256])
def test_context_lengths_from_one_to_256(context):
    q = torch.randn(1, 2, 33, 64)
    k, v = torch.randn(1, 2, context, 64), torch.randn(1, 2, context, 64)
    out = fastseq.cross_attention(q, k, v)
    torch.testing.assert_close(out, ref.attention(q, k, v)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_long_context_falls_back_to_the_attention_kernel(backend):
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (9, 300, 300))
    residual = torch.randn_like(q)
    with fastseq.use_backend(backend):
        out = fastseq.cross_attention(q, k, v, residual=residual)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = ref.attention(q, k, v)[0] + residual
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="Lk = 0"):
        fastseq.cross_attention(q, q[:, :, :0], q[:, :, :0])
    with pytest.raises(ValueError, match="context has 1"):
        fastseq.cross_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        fastseq.cross_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="residual must match"):
        fastseq.cross_attention(q, q, q, residual=q[:, :1])
    with pytest.raises(ValueError, match="divisible by heads"):
        fastseq.feature_map_heads(torch.randn(1, 10, 2, 2), 3)


class _PlainBlock(torch.nn.Module):
    """The same SpatialTransformer computed with torch ops only (attention by softmax)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    @staticmethod
    def _attend(module, x, context):
        def heads(t):
            return t.unflatten(-1, (module.heads, module.head_dim)).transpose(1, 2)
        source = x if context is None else context
        q, k, v = heads(module.to_q(x)), heads(module.to_k(source)), heads(module.to_v(source))
        probs = torch.softmax(q @ k.transpose(-1, -2) / module.head_dim**0.5, dim=-1)
        return module.to_out((probs @ v).transpose(1, 2).flatten(2))

    def forward(self, x, context):
        st = self.block
        batch, _, height, width = x.shape
        h = st.proj_in(st.norm(x)).flatten(2).transpose(1, 2)
        for blk in st.transformer_blocks:
            h = self._attend(blk.attn1, blk.norm1(h), None) + h
            h = self._attend(blk.attn2, blk.norm2(h), context) + h
            h = blk.ff(blk.norm3(h)) + h
        return st.proj_out(h.transpose(1, 2).unflatten(2, (height, width))) + x


def test_spatial_transformer_matches_plain_block():
    block = fastseq.nn.SpatialTransformer(64, heads=2, head_dim=40, depth=2, context_dim=48,
                                          num_groups=8).double()
    x = torch.randn(2, 64, 6, 5, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 11, 48, dtype=torch.float64)
    out = block(x, context)
    want = _PlainBlock(block)(x, context)
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(out.sum(), x)
    (w,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g, w)


def test_diffusers_unet_with_fastseq_processor_matches_default():
    diffusers = pytest.importorskip("diffusers")  # a test extra; see pyproject.toml
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = unet(sample, 10, encoder_hidden_states=text).sample
        fastseq_diffusers.install(unet)
        got = unet(sample, 10, encoder_hidden_states=text).sample
    assert all(type(p).__module__.startswith("fastseq") for p in unet.attn_processors.values())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_diffusers_install_leaves_processors_that_do_more_in_place():
    """Attention with added key/value projections (DeepFloyd IF, UnCLIP) has its own processor,
    which fastseq's does not reproduce: install() keeps it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24,
        attention_head_dim=8, norm_num_groups=8).eval()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    with torch.no_grad():
        want = unet(sample, 10, encoder_hidden_states=text).sample
        before = {name: type(p) for name, p in unet.attn_processors.items()}
        fastseq_diffusers.install(unet)
        got = unet(sample, 10, encoder_hidden_states=text).sample
    after = {name: type(p) for name, p in unet.attn_processors.items()}
    assert after == before, "no default processor here: nothing to replace"
    torch.testing.assert_close(got, want)


def test_diffusers_install_on_a_transformer_block_and_on_a_model_without_attention():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                               norm_num_groups=8, cross_attention_dim=12).eval()
    x, text = torch.randn(2, 16, 5, 3), torch.randn(2, 7, 12)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=text).sample
        got = fastseq_diffusers.install(block)(x, encoder_hidden_states=text).sample
    assert all(type(m.processor).__module__.startswith("fastseq") for m in block.modules()
               if isinstance(m, diffusers.models.attention_processor.Attention))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no diffusers Attention module inside Linear"):
        fastseq_diffusers.install(torch.nn.Linear(2, 2))
