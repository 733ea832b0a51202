"""Loading another library's weights into a fastseq model, checked before anything is copied."""

from __future__ import annotations


def load_state(model, state: dict, fail):
    """Copy ``state`` into ``model`` and return it; ``fail(message)`` (which raises) when a name is
    missing or unexpected, or a shape differs from the one the model's config gives."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        fail(f"the checkpoint does not fit the config: missing {missing[:4]}, unexpected "
             f"{unexpected[:4]}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            fail(f"{name} has shape {tuple(t.shape)}, the config expects {tuple(own[name].shape)}")
    model.load_state_dict(state)
    return model


def same_place(model, reference):
    """``model`` moved to the device and dtype of ``reference``'s parameters."""
    weight = next(reference.parameters())
    return model.to(device=weight.device, dtype=weight.dtype)
