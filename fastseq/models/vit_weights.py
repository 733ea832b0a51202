"""timm's ``VisionTransformer`` -> :class:`fastseq.models.ViT`: the config read off the model, every
option fastseq does not implement refused by name, and the state dict loaded as it is (the two
share their parameter names)."""

from __future__ import annotations

from torch import nn

from fastseq.models.checkpoint import load_state, same_place


def _fail(message):
    raise ValueError(f"fastseq ViT.from_timm: {message}")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _square(value, name) -> int:
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if pair[0] != pair[1]:
        _fail(f"only square {name}s are supported, got {pair}")
    return int(pair[0])


def _refuse_unsupported(model):
    """Every timm option that would make the model compute something fastseq's ViT does not."""
    block = model.blocks[0]
    mlp_norm = "" if _is_identity(block.mlp.norm) else " with a norm"
    checks = {
        "global_pool": (model.global_pool in ("token", "avg"), f"{model.global_pool!r} (supported: "
                                                                "'token', 'avg')"),
        "dynamic_img_size": (not getattr(model, "dynamic_img_size", False), "True"),
        "pos_embed": (model.pos_embed is not None, "None (no position embedding)"),
        "attn_pool": (getattr(model, "attn_pool", None) is None, "an attention-pooling head"),
        "pool_include_prefix": (not getattr(model, "pool_include_prefix", False), "True"),
        "embed_norm_layer": (_is_identity(getattr(model.patch_embed, "norm", None)), "a norm after the "
                                                                                     "patch embedding"),
        "block_fn": (type(block).__name__ == "Block", type(block).__name__),
        "attn_layer": (type(block.attn).__name__ == "Attention", type(block.attn).__name__),
        "mlp_layer": (type(block.mlp).__name__ == "Mlp" and not mlp_norm,
                      type(block.mlp).__name__ + mlp_norm),
        "act_layer": (isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none",
                      repr(block.mlp.act)),
        "norm_layer": (isinstance(block.norm1, nn.LayerNorm), type(block.norm1).__name__),
        "scale_attn_norm": (_is_identity(getattr(block.attn, "norm", None)), "True"),
        "gated attention": (getattr(block.attn, "gate", None) is None, "a sigmoid gate"),
        "attn_head_dim": (block.attn.head_dim * block.attn.num_heads == model.embed_dim,
                          f"{block.attn.head_dim} x {block.attn.num_heads} heads != {model.embed_dim}"),
    }
    for option, (supported, got) in checks.items():
        if not supported:
            _fail(f"{option} = {got} is not implemented")


def config_from_timm(model):
    """The :class:`ViTConfig` of timm ``VisionTransformer`` ``model``."""
    from fastseq.models.vit import ViTConfig

    if type(model).__name__ != "VisionTransformer":
        _fail(f"expected a timm VisionTransformer, got {type(model).__name__}")
    _refuse_unsupported(model)
    block = model.blocks[0]
    return ViTConfig(
        img_size=_square(model.patch_embed.img_size, "image"),
        patch_size=_square(model.patch_embed.patch_size, "patch"),
        in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, proj_bias=block.attn.proj.bias is not None,
        qk_norm=not _is_identity(block.attn.q_norm),
        init_values=None if _is_identity(block.ls1) else 1.0,
        class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class, pre_norm=not _is_identity(model.norm_pre),
        final_norm=not _is_identity(model.norm) or not _is_identity(model.fc_norm),
        global_pool=model.global_pool, fc_norm=not _is_identity(model.fc_norm),
        norm_eps=block.norm1.eps, dropout=block.attn.attn_drop.p,
    )


def from_timm(cls, model):
    """A ``cls`` (:class:`ViT`) with ``model``'s config and weights, in its dtype and device."""
    ours = cls(config_from_timm(model))
    return load_state(same_place(ours, model), model.state_dict(), _fail).train(model.training)
