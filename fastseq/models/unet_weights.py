"""diffusers' ``UNet2DConditionModel`` -> :class:`fastseq.models.UNet2DCondition`: the config read
off the model, every option fastseq does not implement refused by name, and the state dict loaded as
it is (the two share their parameter names)."""

from __future__ import annotations

from fastseq.models.checkpoint import load_state, same_place

# The options whose every value but this one changes what the model computes or holds.
_FIXED = {
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


def _fail(message):
    raise ValueError(f"fastseq UNet2DCondition.from_diffusers: {message}")


def _refuse_unsupported(config):
    for option, supported in _FIXED.items():
        if config.get(option, supported) != supported:
            _fail(f"{option} = {config[option]!r} is not implemented (supported: {supported!r})")
    for option in ("only_cross_attention", "mid_block_only_cross_attention"):
        value = config.get(option)
        if value is not None and any(value if isinstance(value, tuple | list) else [value]):
            _fail(f"{option} = {value!r} is not implemented")
    if config["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        _fail(f"mid_block_type = {config['mid_block_type']!r} is not implemented (supported: "
              "'UNetMidBlock2DCrossAttn', None)")
    levels = len(config["block_out_channels"])
    for name in ("transformer_layers_per_block", "cross_attention_dim"):
        value = config[name]
        if isinstance(value, tuple | list) and (len(value) != levels or any(isinstance(v, tuple | list)
                                                                           for v in value)):
            _fail(f"{name} = {value!r} is not implemented (one int, or one per level)")
    dims = config["cross_attention_dim"]
    if isinstance(dims, tuple | list) and len(set(dims)) > 1:
        _fail(f"cross_attention_dim = {dims!r} is not implemented (one width for every level)")
    if config.get("norm_num_groups") is None:
        _fail("norm_num_groups = None is not implemented")


def config_from_diffusers(model):
    """The :class:`UNetConfig` of diffusers ``UNet2DConditionModel`` ``model``."""
    from fastseq.models.unet import DOWN_BLOCKS, UP_BLOCKS, UNetConfig

    if type(model).__name__ != "UNet2DConditionModel":
        _fail(f"expected a diffusers UNet2DConditionModel, got {type(model).__name__}")
    config = dict(model.config)
    _refuse_unsupported(config)
    for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        unknown = [t for t in config[name] if t not in allowed]
        if unknown:
            _fail(f"{name} {unknown} are not implemented (supported: {allowed})")
    dims = config["cross_attention_dim"]
    return UNetConfig(
        in_channels=config["in_channels"], out_channels=config["out_channels"],
        down_block_types=tuple(config["down_block_types"]), up_block_types=tuple(config["up_block_types"]),
        mid_block=config["mid_block_type"] is not None,
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        transformer_layers_per_block=config["transformer_layers_per_block"],
        heads=config["num_attention_heads"] or config["attention_head_dim"],
        cross_attention_dim=dims[0] if isinstance(dims, tuple | list) else dims,
        use_linear_projection=config["use_linear_projection"],
        norm_num_groups=config["norm_num_groups"], norm_eps=config["norm_eps"],
        flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"],
        downsample_padding=config["downsample_padding"], dropout=config["dropout"],
    )


def from_diffusers(cls, model):
    """A ``cls`` (:class:`UNet2DCondition`) with ``model``'s config and weights, in its dtype and
    device and training mode."""
    ours = cls(config_from_diffusers(model))
    return load_state(same_place(ours, model), model.state_dict(), _fail).train(model.training)
