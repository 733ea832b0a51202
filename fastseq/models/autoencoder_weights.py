"""diffusers' ``AutoencoderKL`` -> :class:`fastseq.models.AutoencoderKL`: the config read off the model
key by key, every option fastseq does not implement refused by name, and the state dict loaded as it
is (the two share their parameter names)."""

from __future__ import annotations

from fastseq.models.checkpoint import load_state, same_place

# diffusers config keys fastseq's AutoencoderKLConfig takes as they are.
SAME = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
        "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "use_quant_conv",
        "use_post_quant_conv", "mid_block_add_attention", "act_fn")
# Keys that change nothing the model computes: a pipeline's choice of dtype.
IGNORED = ("force_upcast",)


def _fail(message):
    raise ValueError(f"fastseq AutoencoderKL.from_diffusers: {message}")


def _refuse(option, value):
    _fail(f"{option} = {value!r} is not implemented")


def _check_option(key, value, levels):
    """Refuse config entry ``key = value`` unless fastseq computes the same with it."""
    if key in ("down_block_types", "up_block_types"):
        block = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
        if tuple(value) != (block,) * levels:
            _refuse(key, tuple(value))
    elif key == "act_fn":
        if value != "silu":
            _refuse(key, value)
    elif key in ("latents_mean", "latents_std"):
        if value is not None:  # per-channel latent statistics the pipelines apply: not in images_to_latents
            _refuse(key, value)
    elif key not in SAME + IGNORED:
        _refuse(key, value)


def config_from_diffusers(model):
    """The :class:`AutoencoderKLConfig` of diffusers ``AutoencoderKL`` ``model``."""
    from fastseq.models.autoencoder import AutoencoderKLConfig

    if type(model).__name__ != "AutoencoderKL":
        _fail(f"expected a diffusers AutoencoderKL, got {type(model).__name__}")
    config = dict(model.config)
    levels = len(config["block_out_channels"])
    for key, value in config.items():
        if not key.startswith("_"):  # _class_name, _diffusers_version, _name_or_path, ...
            _check_option(key, value, levels)
    if getattr(model, "use_tiling", False):
        _refuse("use_tiling", True)
    for name, module in model.named_modules():
        if getattr(module, "fused_projections", False):
            _refuse(f"{name}.fused_projections (fuse_qkv_projections)", True)
    return AutoencoderKLConfig(**{key: config[key] for key in SAME if key in config})


def from_diffusers(cls, model):
    """A ``cls`` (:class:`AutoencoderKL`) with ``model``'s config and weights, in its dtype and device."""
    ours = cls(config_from_diffusers(model))
    return load_state(same_place(ours, model), model.state_dict(), _fail).train(model.training)
