"""Dense weight gradients of VQ layers during training (`vqdm distill --weight-grad dense`, PV-tuning).

Each VQ layer's weight is decoded once per optimizer step into a dense fp32 leaf that its forward
uses (the modules' `weight_cache` hook); micro-batches accumulate dL/dŴ there, and one backward
through the decode per step carries it to codebooks and scales. PV-tuning reads dL/dŴ from the
leaves before that (`grads`). Works on any module tree holding VQ modules, not only U-Nets.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from vqdm.kernels import dequantize
from vqdm.kernels.decoded import conv_weight_view
from vqdm.models import VQConv2d, vq_modules


class DecodedWeights:
    """A `weight_cache` for VQ modules during training: the decoded weight as a dense fp32 leaf.

    Micro-batches accumulate dL/dW in the leaves; `push_gradients` carries them through one decode
    per layer to codebooks and scales, and `refresh` re-decodes after the optimizer step (and after
    codes change).
    """

    def __init__(self, model: nn.Module) -> None:
        self.named = dict(vq_modules(model))
        self.layers = list(self.named.values())
        self.weights: dict[int, torch.Tensor] = {}
        for m in self.layers:
            self.weights[id(m)] = dequantize(m.codes, m.codebooks.detach(), m.scales.detach()).float().requires_grad_()

    @contextlib.contextmanager
    def installed(self):
        saved = [m.weight_cache for m in self.layers]
        for m in self.layers:
            m.weight_cache = self
        try:
            yield self
        finally:
            for m, cache in zip(self.layers, saved):
                m.weight_cache = cache

    def lookup(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[id(module)]  # [n, d]
        return conv_weight_view(w, module.in_channels, module.kernel_size) if isinstance(module, VQConv2d) else w

    def grads(self) -> dict[str, torch.Tensor]:
        """dL/dŴ [n, d] of every layer that got one since the last `push_gradients`, by layer name."""
        return {n: self.weights[id(m)].grad for n, m in self.named.items() if self.weights[id(m)].grad is not None}

    def push_gradients(self) -> None:
        """dL/dW of every layer -> codebooks.grad, scales.grad (one layer's decode graph at a time)."""
        for m in self.layers:
            w = self.weights[id(m)]
            if w.grad is not None:
                torch.autograd.backward(dequantize(m.codes, m.codebooks, m.scales), w.grad)
                w.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        for m in self.layers:
            self.weights[id(m)].copy_(dequantize(m.codes, m.codebooks, m.scales))
