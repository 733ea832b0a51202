"""GPT: ``fastseq.models.GPT`` against the transformers model it was loaded from (sdpa attention).

Both hold the same weights (a randomly initialised Llama-style model: width 256, 4 layers, 8 query
and 4 key/value heads, a 4096-token vocabulary). Cases:

* ``train step``: forward, LM loss, backward and an AdamW step on a batch of token ids;
* ``prefill``: one forward over a prompt, no KV cache (inference);
* ``decode``: ``generate`` of 256 greedy tokens after a 16-token prompt, fastseq's (a static KV
  cache, the decode kernels: on the CPU the few-row linear op and the C++ decode attention)
  against transformers' ``generate(do_sample=False)``; the time per token is the case's time /
  256. The ``compiled`` cases run fastseq's decode step through ``torch.compile`` (inductor,
  ``generate(compile=True)``; the compilation happens in the untimed warm-up call).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import GPT, GPTConfig

SUITE = "gpt"

HEADLINES = ("train step fp32 B4 T128", "prefill fp32 B1 T512", "decode fp32 B1 256 tokens",
             "decode fp32 B1 256 tokens compiled", "decode fp32 B8 256 tokens",
             "decode fp32 B8 256 tokens compiled")
HEADLINE_BASELINES = ("transformers",)
SOURCES = ("benchmarks/training.py", "fastseq/models/gpt*.py", "fastseq/models/decoding.py",
           "fastseq/models/inputs.py", "fastseq/models/checkpoint.py", "fastseq/nn/*.py", "fastseq/ops/*.py",
           "kernels/attention*.py", "kernels/rotary.py", "csrc/cpu/rotary.cpp", "csrc/cpu/attention*",
           "csrc/cpu/linear*")

VOCAB = 4096
NEW_TOKENS = 256
MEMORY_SWEEP = "length"


def _models(device, dtype):
    """(transformers model, fastseq model) with the same weights, in eval mode; (None, fastseq
    model) where transformers is not installed (a GPU machine without network, say)."""
    try:
        import transformers
    except ImportError:
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=8, n_kv_head=4, n_embd=256,
                           flavour="llama", intermediate_size=768, max_position_embeddings=2048)
        return None, GPT(config).to(device, dtype).eval()
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).to(device, dtype).eval()
    return theirs, GPT.from_hf(theirs)


def _case(name, params, dtype, variants):
    """A case; its ``transformers`` variant is reported as skipped when it is None."""
    skipped = {}
    if variants.get("transformers") is None:
        variants.pop("transformers", None)
        skipped["transformers"] = "transformers is not installed"
    return Case(suite=SUITE, name=name, params=params, dtype=dtype, variants=variants,
                skipped=skipped)


def _lm_loss(logits_of, ids):
    """The next-token loss of ``logits_of(model, ids)``, a function of the model."""
    return lambda model: F.cross_entropy(logits_of(model, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _train(device, dtype, batch, length):
    theirs, ours = _models(device, dtype)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    return _case(f"train step fp32 B{batch} T{length}",
                 {"pass": "train", "batch": batch, "length": length}, dtype, {
                     "fastseq": train_step(ours, _lm_loss(lambda m, x: m(x), ids)),
                     "transformers": None if theirs is None else train_step(
                         theirs, _lm_loss(lambda m, x: m(x).logits, ids)),
                 })


def _prefill(device, dtype, batch, length):
    theirs, ours = _models(device, dtype)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    return _case(f"prefill fp32 B{batch} T{length}",
                 {"pass": "prefill", "batch": batch, "length": length}, dtype, {
                     "fastseq": torch.no_grad()(lambda: ours(ids)),
                     "transformers": None if theirs is None else torch.no_grad()(
                         lambda: theirs(ids, use_cache=False).logits),
                 })


def _decode(device, dtype, batch, new_tokens, compiled=False):
    theirs, ours = _models(device, dtype)
    prompt = torch.randint(0, VOCAB, (batch, 16), device=device)

    def transformers_generate():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return theirs.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)

    return _case(f"decode fp32 B{batch} {new_tokens} tokens{' compiled' if compiled else ''}",
                 {"pass": "decode", "batch": batch, "new_tokens": new_tokens, "compiled": compiled},
                 dtype, {
                     "fastseq": lambda: ours.generate(prompt, new_tokens, compile=compiled),
                     "transformers": None if theirs is None else transformers_generate,
                 })


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """A training step, a prefill and greedy decoding at batch 1 and 8, eager and compiled
    (float32)."""
    dtype = torch.float32
    new_tokens = 16 if quick else NEW_TOKENS
    return [_train(device, dtype, 4, 128), _prefill(device, dtype, 1, 512),
            *(_decode(device, dtype, batch, new_tokens, compiled)
              for batch in (1, 8) for compiled in (False, True))]


def memory_cases(device: torch.device) -> list[Case]:
    """A training step at growing sequence lengths: ``python -m fastseq profile gpt``."""
    return [_train(device, torch.float32, 4, length) for length in (64, 128, 256, 512)]
