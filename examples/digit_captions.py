"""Captions of scikit-learn's digits written from their labels ("a photo of the number seven", "a
handwritten 7", ...) and their word-level token ids: the text side of the CLIP and latent-diffusion
examples."""

from __future__ import annotations

import torch

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the number {name}", "a handwritten {digit}", "the digit {name}",
             "an image of a {name}", "{name}, written by hand", "a drawing of the number {digit}")
SPECIALS = ("<pad>", "<bos>", "<unk>", "<eos>")
PAD, BOS, EOS = 0, 1, 3


class Captions:
    """Word-level token ids of the captions: a vocabulary of every template word, BOS and EOS."""

    def __init__(self):
        words = {w for t in TEMPLATES for n, d in zip(NAMES, "0123456789", strict=True)
                 for w in self.caption(t, n, d).split()}
        self.itos = list(SPECIALS) + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.length = 2 + max(len(self.caption(t, n, "0").split()) for t in TEMPLATES for n in NAMES)

    @staticmethod
    def caption(template, name, digit):
        return template.format(name=name, digit=digit).replace(",", " ,")

    def encode(self, labels, templates):
        """``(ids (N, length), mask (N, length))`` for digit ``labels[i]`` in ``templates[i]``."""
        ids = torch.full((len(labels), self.length), PAD)
        for row, (label, template) in enumerate(zip(labels, templates, strict=True)):
            words = self.caption(TEMPLATES[template], NAMES[label], str(label)).split()
            tokens = [BOS, *(self.stoi[w] for w in words), EOS]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids, (ids != PAD).long()

    def empty(self, count: int = 1):
        """``count`` empty captions (BOS, EOS, padding): the unconditional input of guidance."""
        ids = torch.full((count, self.length), PAD)
        ids[:, :2] = torch.tensor([BOS, EOS])
        return ids

    def prompts(self):
        """Every template for every digit: ``(10, templates, length)`` ids and mask."""
        labels = [d for d in range(10) for _ in TEMPLATES]
        ids, mask = self.encode(labels, list(range(len(TEMPLATES))) * 10)
        return ids.view(10, len(TEMPLATES), -1), mask.view(10, len(TEMPLATES), -1)


