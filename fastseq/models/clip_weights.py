"""transformers' ``CLIPModel`` -> :class:`fastseq.models.CLIP`: the config read off the model's, every
option fastseq does not implement refused by name, and the state dict loaded as it is (the two
share their parameter names)."""

from __future__ import annotations

from fastseq.models.checkpoint import load_state, same_place


def _fail(message):
    raise ValueError(f"fastseq CLIP.from_hf: {message}")


def _refuse_unsupported(name, tower):
    from fastseq.models.clip import ACTIVATIONS

    if tower.hidden_act not in ACTIVATIONS:
        _fail(f"{name}_config.hidden_act = {tower.hidden_act!r} is not implemented "
              f"(supported: {sorted(ACTIVATIONS)})")
    if getattr(tower, "attention_dropout", 0.0):
        _fail(f"{name}_config.attention_dropout = {tower.attention_dropout} is not implemented")


def _tower(config):
    from fastseq.models.clip import TowerConfig

    return TowerConfig(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                       config.intermediate_size)


def config_from_hf(hf_config):
    """The :class:`CLIPConfig` of a transformers ``CLIPConfig``."""
    from fastseq.models.clip import CLIPConfig

    text, vision = hf_config.text_config, hf_config.vision_config
    for name, tower in (("text", text), ("vision", vision)):
        _refuse_unsupported(name, tower)
    for field in ("hidden_act", "layer_norm_eps"):
        if getattr(text, field) != getattr(vision, field):
            _fail(f"the towers differ in {field} ({getattr(text, field)!r} and {getattr(vision, field)!r})")
    return CLIPConfig(
        text=_tower(text), vision=_tower(vision), vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings, eos_token_id=text.eos_token_id,
        image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
        projection_dim=hf_config.projection_dim, layer_norm_eps=text.layer_norm_eps,
        hidden_act=text.hidden_act, logit_scale_init_value=hf_config.logit_scale_init_value)


def from_hf(cls, model):
    """A ``cls`` (:class:`CLIP`) with ``model``'s config and weights, in its dtype and device."""
    if type(model).__name__ != "CLIPModel":
        _fail(f"expected a transformers CLIPModel, got {type(model).__name__}")
    ours = cls(config_from_hf(model.config))
    return load_state(same_place(ours, model), model.state_dict(), _fail).train(model.training)


def text_tower_from_hf(cls, model):
    """A ``cls`` (:class:`~fastseq.models.clip.TextTransformer`) with the config and weights of
    transformers' ``CLIPTextModel`` ``model``; the config's vision fields keep their defaults."""
    from fastseq.models.clip import CLIPConfig

    if type(model).__name__ != "CLIPTextModel":
        _fail(f"expected a transformers CLIPTextModel, got {type(model).__name__}")
    text = model.config
    _refuse_unsupported("text", text)
    config = CLIPConfig(text=_tower(text), vocab_size=text.vocab_size,
                        max_position_embeddings=text.max_position_embeddings, eos_token_id=text.eos_token_id,
                        layer_norm_eps=text.layer_norm_eps, hidden_act=text.hidden_act)
    ours = cls(config)
    tower = getattr(model, "text_model", model)  # transformers < 5 wraps the tower in .text_model
    return load_state(same_place(ours, model), tower.state_dict(), _fail).train(model.training)
