"""fastseq.nn.RotaryEmbedding: tables, scaling formulas (against transformers) and application."""

import math

import pytest
import torch

import fastseq
from fastseq.nn import RopeScaling
from fastseq.reference import rotary as ref

HEAD_DIM, BASE = 64, 500000.0

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
             "beta_fast": 32.0, "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
}
MAX_POSITIONS = 1024


def _transformers_inv_freq(params, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4,
                         max_position_embeddings=MAX_POSITIONS,
                         rope_parameters={"rope_theta": BASE, **params})
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [512, 3000])
def test_scaling_matches_transformers(kind, seq_len):
    params = SCALINGS[kind]
    want_freq, want_scale = _transformers_inv_freq(params, seq_len)
    config = dict(params)
    if kind == "dynamic":
        config["original_max_position_embeddings"] = MAX_POSITIONS  # transformers' max_position_embeddings
    rope = fastseq.nn.RotaryEmbedding(HEAD_DIM, base=BASE, scaling=config)
    got_freq, got_scale = rope.inverse_frequencies(seq_len)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(got_scale, float(want_scale), rel_tol=1e-9)


def test_yarn_scales_the_tables():
    rope = fastseq.nn.RotaryEmbedding(16, scaling=RopeScaling("yarn", factor=4.0,
                                                              original_max_position_embeddings=64))
    cos, sin = rope.cos_sin(10)
    scale = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(cos[0], torch.full((8,), scale))
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, scale**2))


def test_scaling_config_is_validated():
    with pytest.raises(ValueError, match="kind"):
        RopeScaling("ntk")
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling("yarn", factor=2.0)


def test_tables_are_cached_and_grow():
    rope = fastseq.nn.RotaryEmbedding(8)
    cos, _ = rope.cos_sin(5)
    assert cos.dtype == torch.float32 and cos.shape == (8, 4)
    assert rope.cos_sin(7)[0] is cos
    longer, _ = rope.cos_sin(9)
    assert longer.shape == (16, 4)
    torch.testing.assert_close(longer[:8], cos)
    angles = torch.outer(torch.arange(16.0), 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    torch.testing.assert_close(longer, angles.cos())


@pytest.mark.parametrize("interleaved", [False, True])
def test_module_applies_partial_rotary_with_kv_cache_offsets(interleaved):
    rope = fastseq.nn.RotaryEmbedding(16, interleaved=interleaved)
    q, k = torch.randn(3, 4, 6, 24), torch.randn(3, 2, 6, 24)  # (B, H, N, D): layout bhnd
    offsets = torch.tensor([0, 7, 30])
    q_out, k_out = rope(q, k, positions=offsets, layout="bhnd")
    cos, sin = rope.cos_sin(36)
    want_q, want_k = ref.apply_rotary(q, k, cos, sin, positions=offsets, interleaved=interleaved,
                                      layout="bhnd")
    torch.testing.assert_close(q_out, want_q)
    torch.testing.assert_close(k_out, want_k)
    assert torch.equal(q_out[..., 16:], q[..., 16:])


def test_dynamic_tables_follow_transformers_call_by_call():
    """transformers keeps the frequencies of the longest length seen, and goes back to the
    original ones only for a sequence shorter than the original context."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    original, dim = 16, 8
    config = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, max_position_embeddings=original,
                         rope_parameters={"rope_theta": BASE, "rope_type": "dynamic", "factor": 2.0})
    theirs = LlamaRotaryEmbedding(config)
    ours = fastseq.nn.RotaryEmbedding(dim, base=BASE, scaling={"rope_type": "dynamic", "factor": 2.0,
                                                               "max_position_embeddings": original})
    for seq_len in [10, 40, 24, 40, 17, 10, 20, 16, 64]:
        want, _ = theirs(torch.zeros(1, seq_len, dim), torch.arange(seq_len)[None])
        cos_half, _ = ours.cos_sin(seq_len)
        assert cos_half.shape[0] >= seq_len
        got = torch.cat([cos_half[:seq_len]] * 2, dim=-1)
        torch.testing.assert_close(got, want[0], rtol=1e-6, atol=1e-6, msg=f"seq_len {seq_len}")
