"""Full models built from ``fastseq.nn``, each loading the weights of the library people use."""

from fastseq.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
