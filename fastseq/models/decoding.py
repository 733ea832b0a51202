"""What the models' generation shares: sampling and beam search."""

from __future__ import annotations

from collections.abc import Callable

import torch


def next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """The next token of each row of ``logits`` ``(B, V)``: the argmax at temperature 0, else a
    sample from the ``top_k`` likeliest tokens / the smallest set reaching ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, indices = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens likelier than it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(1, indices, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


StepFn = Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]
ReorderFn = Callable[[object, torch.Tensor], object]


@torch.no_grad()
def beam_search(step: StepFn, reorder: ReorderFn, state, batch: int, *, beam_size: int, max_len: int,
                bos_id: int, eos_id: int | None, length_penalty: float = 1.0, device=None):
    """Beam search over a step function, for any decoder that carries a state.

    Args:
        step: ``(last_tokens (B*K,), state) -> (log_probs (B*K, V), state)``; rows are
            ``batch * beam_size + beam``.
        reorder: ``(state, index (B*K,)) -> state`` keeping the rows ``index`` picks.
        state: the decoder's state for ``B*K`` rows (each sequence repeated ``beam_size`` times).
        eos_id: the token that ends a hypothesis; None runs every hypothesis for ``max_len`` steps.
        length_penalty: the finished hypotheses are ranked by ``score / length**length_penalty``
            (0: raw log-probability; 1: per token).

    Returns:
        ``(tokens (B, L), scores (B,))``: the best hypothesis of each sequence without BOS, EOS
        included and ``eos_id`` after it; its normalised log-probability. ``beam_size=1`` is
        greedy decoding.
    """
    k = beam_size
    tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every beam starts equal: expand the first one only
    finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, device=device)
    rows = torch.arange(batch, device=device)[:, None] * k
    for _ in range(max_len):
        log_probs, state = step(tokens[:, -1], state)
        log_probs = log_probs.float()
        vocab = log_probs.shape[-1]
        if eos_id is not None:  # a finished hypothesis only extends by EOS, at no cost
            log_probs[finished] = float("-inf")
            log_probs[finished, eos_id] = 0.0
        candidates = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        scores, best = candidates.topk(k, dim=1)
        index = (rows + best // vocab).view(-1)
        token = (best % vocab).view(-1)
        tokens = torch.cat([tokens[index], token[:, None]], 1)
        lengths = lengths[index] + (~finished[index]).float()
        finished = finished[index] | (token == eos_id) if eos_id is not None else finished
        state = reorder(state, index)
        if bool(finished.all()):
            break
    normalised = (scores.view(-1) / lengths.clamp(min=1) ** length_penalty).view(batch, k)
    # A sequence with a finished hypothesis returns one; one without returns its best so far.
    done = finished.view(batch, k)
    normalised = normalised.masked_fill(~done & done.any(1, keepdim=True), float("-inf"))
    chosen = rows[:, 0] + normalised.argmax(1)
    return tokens[chosen, 1:], normalised.view(-1)[chosen]
