"""LSTM recurrence on the GPU: the persistent kernels' two kinds and their block sizes side by side,
with cuDNN's whole layer for scale. No cases on the CPU.

The recurrence ops (``torch.ops.fastseq.lstm_recurrence_forward`` / ``_backward``) are what the
CUDA backend of ``fastseq.nn.LSTM`` runs between the input projection and the weight gradients,
one launch for the whole sequence; their ``kernel`` and ``units`` arguments force a kind
(``tensor_cores``, ``cuda_cores``) and a number of hidden units per thread block.

- ``fwd``: the input-projection GEMM plus the forward recurrence, the work of a layer's forward
  in training (it keeps the activated gates and cells for a backward); baselines the CUDA-core
  kernels and ``torch.nn.LSTM``'s forward (cuDNN; the module in training mode, so that cuDNN
  keeps what its backward needs too, under ``no_grad`` only to leave autograd out).
- ``bwd``: the backward recurrence alone (d pre and the initial state's gradients; the weight
  gradients are GEMMs after it). cuDNN's backward cannot be timed apart from its forward, so the
  baseline is the CUDA-core kernels.

The tensor-core kernels with the plan's block size are "ours" (the question this suite answers
is whether they should be the default, which the CUDA-core kernels are until then). Variants
named ``tensor_cores_u<U>`` are timed but not compared; a block size that does not fit on the GPU
reports its error instead of a time. No cases where the extension lacks its CUDA kernels.
"""

from __future__ import annotations

import dataclasses

import torch

from fastseq import _extension
from fastseq.bench import Case

SUITE = "lstm_recurrence"

# The README's results table: none yet (no GPU results of this suite).
HEADLINES = ()
SOURCES = ("csrc/cuda/lstm*", "fastseq/ops/lstm.py")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_FORWARD_UNITS = (4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    batch: int
    steps: int
    hidden: int  # the input size too

    def label(self):
        return f"{_DTYPE_NAMES[self.dtype]} B{self.batch} T{self.steps} H{self.hidden}"


def _shapes(quick):
    base = Shape(torch.float16, batch=64, steps=256, hidden=512)
    shapes = [base, dataclasses.replace(base, dtype=torch.bfloat16),
              dataclasses.replace(base, hidden=1024), dataclasses.replace(base, batch=8),
              dataclasses.replace(base, batch=256, hidden=256)]
    return shapes[:1] if quick else shapes


def _layer(shape, device):
    """x, nn.LSTM (holding W_ih, W_hh, biases), the summed bias and a zero initial state."""
    lstm = torch.nn.LSTM(shape.hidden, shape.hidden).to(device, shape.dtype)
    x = torch.randn(shape.steps, shape.batch, shape.hidden, device=device, dtype=shape.dtype)
    zeros = x.new_zeros(shape.batch, shape.hidden)
    return x, lstm, (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach(), zeros


def _forward_case(shape, device):
    x, lstm, bias, zeros = _layer(shape, device)
    w_ih, w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    flat = x.flatten(0, 1)

    def recurrence(kernel, units=0):
        def run():
            pre_x = torch.addmm(bias, flat, w_ih.t()).view(shape.steps, shape.batch, -1)
            return torch.ops.fastseq.lstm_recurrence_forward(pre_x, zeros, zeros, w_hh, None, False,
                                                             kernel, units)
        return run

    def cudnn():
        with torch.no_grad():
            return lstm(x)

    variants = {"tensor_cores": recurrence("tensor_cores"), "cudnn": cudnn,
                "cuda_cores": recurrence("cuda_cores")}
    variants.update({f"tensor_cores_u{u}": recurrence("tensor_cores", u) for u in _FORWARD_UNITS})
    flops = 2 * shape.steps * shape.batch * 2 * shape.hidden * 4 * shape.hidden
    return Case(suite=SUITE, name=f"fwd {shape.label()}", params=_params(shape, "fwd"),
                dtype=shape.dtype, variants=variants, ours="tensor_cores",
                baselines=("cudnn", "cuda_cores"), flops=flops)


def _backward_case(shape, device):
    x, lstm, bias, zeros = _layer(shape, device)
    w_ih, w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    pre_x = torch.addmm(bias, x.flatten(0, 1), w_ih.t()).view(shape.steps, shape.batch, -1)
    y, _, _, gates, cells = torch.ops.fastseq.lstm_recurrence_forward(pre_x, zeros, zeros, w_hh,
                                                                      None, False)
    grad_y = torch.randn_like(y)

    def recurrence(kernel):
        return lambda: torch.ops.fastseq.lstm_recurrence_backward(
            grad_y, zeros, zeros, zeros, w_hh, None, False, gates, cells, kernel, 0)

    variants = {"tensor_cores": recurrence("tensor_cores"), "cuda_cores": recurrence("cuda_cores")}
    flops = 2 * shape.steps * shape.batch * 4 * shape.hidden * shape.hidden
    return Case(suite=SUITE, name=f"bwd {shape.label()}", params=_params(shape, "bwd"),
                dtype=shape.dtype, variants=variants, ours="tensor_cores",
                baselines=("cuda_cores",), flops=flops)


def _params(shape, pass_):
    return {"pass": pass_, **{f.name: str(getattr(shape, f.name))
                              for f in dataclasses.fields(shape)}}


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """fwd and bwd over the shapes; none on the CPU or without the CUDA kernels, where the
    recurrence ops do not exist."""
    # cuda_built() loads the extension, which registers the ops the bwd cases call to build
    # their inputs.
    if device.type != "cuda" or not _extension.cuda_built():
        return []
    return [make(shape, device) for shape in _shapes(quick)
            for make in (_forward_case, _backward_case)]
