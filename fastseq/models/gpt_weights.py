"""transformers checkpoints for :class:`fastseq.models.GPT`: configs, state-dict names, files.

A transformers config dict becomes a :class:`GPTConfig` (features the model does not implement
are refused, never ignored), and a transformers state dict becomes the model's: GPT-2's fused
``c_attn`` (a ``Conv1D``, weights stored input-major) splits into q, k and v projections.
"""

from __future__ import annotations

import json
import pathlib

import torch

from fastseq.models.checkpoint import load_state
from fastseq.models.gpt import GPTConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _fail(message):
    raise ValueError(f"fastseq GPT checkpoint: {message}")


def config_from_hf(hf: dict) -> GPTConfig:
    """A :class:`GPTConfig` from a transformers config dict (``config.to_dict()`` or
    ``config.json``); raises ValueError on options the model does not implement."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_config(hf)
    if kind in LLAMA_LIKE:
        return _llama_config(hf, kind)
    _fail(f"model_type {kind!r} is not supported (gpt2, {', '.join(LLAMA_LIKE)})")


def _gpt2_config(hf):
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            _fail(f"GPT-2 option {key}=True is not supported")
    if not hf.get("scale_attn_weights", True):
        _fail("GPT-2 option scale_attn_weights=False is not supported")
    gelus = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    act = hf.get("activation_function", "gelu_new")
    if act not in gelus:
        _fail(f"GPT-2 activation {act!r} is not supported ({', '.join(gelus)})")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], flavour="gpt2", intermediate_size=hf.get("n_inner"),
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), gelu_approximate=gelus[act])


def _llama_config(hf, kind):
    if hf.get("hidden_act", "silu") != "silu":
        _fail(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        _fail(f"rope_type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type == "dynamic":  # transformers' dynamic NTK grows from max_position_embeddings
        rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    window = None
    if kind == "mistral":
        window = hf.get("sliding_window")
    elif kind == "qwen2" and hf.get("use_sliding_window"):
        _fail("Qwen2 sliding windows (use_sliding_window=True) are not supported")
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
        n_embd=hf["hidden_size"], flavour="llama",
        n_kv_head=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"],
        rope_theta=theta, rope_scaling=rope or None,
        qkv_bias=True if kind == "qwen2" else bias, out_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window)


def state_dict_from_hf(config: GPTConfig, hf_state: dict) -> dict:
    """The :class:`GPT` state dict holding the weights of a transformers state dict."""
    state = {_strip(name): t for name, t in hf_state.items()}
    if config.flavour == "gpt2":
        return _gpt2_state(config, state)
    return _llama_state(config, state)


def _strip(name):
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _take(state, name):
    if name not in state:
        _fail(f"the checkpoint has no {name!r}")
    return state[name]


def _gpt2_state(config, state):
    out = {"wte.weight": _take(state, "wte.weight"), "wpe.weight": _take(state, "wpe.weight"),
           "norm_f.weight": _take(state, "ln_f.weight"), "norm_f.bias": _take(state, "ln_f.bias")}
    width = config.n_embd
    for i in range(config.n_layer):
        src, dst = f"h.{i}.", f"blocks.{i}."
        q, k, v = _take(state, src + "attn.c_attn.weight").t().split(width)
        qb, kb, vb = _take(state, src + "attn.c_attn.bias").split(width)
        out.update({
            dst + "norm1.weight": _take(state, src + "ln_1.weight"),
            dst + "norm1.bias": _take(state, src + "ln_1.bias"),
            dst + "norm2.weight": _take(state, src + "ln_2.weight"),
            dst + "norm2.bias": _take(state, src + "ln_2.bias"),
            dst + "attn.q_proj.weight": q, dst + "attn.k_proj.weight": k,
            dst + "attn.v_proj.weight": v, dst + "attn.q_proj.bias": qb,
            dst + "attn.k_proj.bias": kb, dst + "attn.v_proj.bias": vb,
            dst + "attn.o_proj.weight": _take(state, src + "attn.c_proj.weight").t(),
            dst + "attn.o_proj.bias": _take(state, src + "attn.c_proj.bias"),
            dst + "mlp.up.weight": _take(state, src + "mlp.c_fc.weight").t(),
            dst + "mlp.up.bias": _take(state, src + "mlp.c_fc.bias"),
            dst + "mlp.down.weight": _take(state, src + "mlp.c_proj.weight").t(),
            dst + "mlp.down.bias": _take(state, src + "mlp.c_proj.bias"),
        })
    out["lm_head.weight"] = state.get("lm_head.weight", out["wte.weight"])
    return {name: t.contiguous() for name, t in out.items()}


LLAMA_NAMES = {
    "input_layernorm": "norm1", "post_attention_layernorm": "norm2",
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
}


def _llama_state(config, state):
    out = {"wte.weight": _take(state, "embed_tokens.weight"),
           "norm_f.weight": _take(state, "norm.weight")}
    for name, t in state.items():
        if not name.startswith("layers."):
            continue
        _, index, rest = name.split(".", 2)
        module, _, kind = rest.rpartition(".")
        if module not in LLAMA_NAMES:
            _fail(f"unexpected weight {name!r}")
        out[f"blocks.{index}.{LLAMA_NAMES[module]}.{kind}"] = t
    out["lm_head.weight"] = (out["wte.weight"] if config.tie_word_embeddings
                             else _take(state, "lm_head.weight"))
    return out


def from_hf(cls, hf_model):
    """``cls`` (GPT) with the weights, dtype and device of a transformers model."""
    config = config_from_hf(hf_model.config.to_dict())
    weight = next(hf_model.parameters())
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=weight.device).to(weight.dtype)
    _tie(model)
    state = state_dict_from_hf(config, hf_model.state_dict())
    return load_state(model, state, _fail).train(hf_model.training)


def from_pretrained(cls, path):
    """``cls`` (GPT) from a Hugging Face checkpoint folder: ``config.json`` and
    ``model.safetensors`` (or the shards of ``model.safetensors.index.json``)."""
    from safetensors.torch import load_file

    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        _fail(f"no config.json in {folder}")
    config = config_from_hf(json.loads(config_file.read_text()))
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    state = {}
    for file in files:
        if not file.is_file():
            _fail(f"missing weights file {file}")
        state.update(load_file(file))
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").to(dtype)
    _tie(model)
    return load_state(model, state_dict_from_hf(config, state), _fail).eval()


def _tie(model):
    """Re-tie the output head to the embedding (``to_empty`` gives each its own storage)."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight
