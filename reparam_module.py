"""A network viewed as a pure function of ONE flat parameter vector.

Trajectory matching unrolls many student SGD steps and back-propagates
through all of them into the synthetic images, so the student's weights must
be ordinary tensors in the autograd graph rather than ``nn.Parameter``s that
get updated in place.  ``ReparamModule`` evaluates the wrapped module with the
weights taken from a flat vector: views of the vector are put in the parameter
slots for the duration of one call, then the parameters are put back.
``torch.func.functional_call`` does the same, but resolves every dotted name on
every call; the slots here are resolved once (about 100 us less per call, which
the unroll pays syn_steps times per iteration, three times in recompute mode).

The flat layout is the concatenation of ``module.parameters()`` (each
reshaped to 1-D) in iteration order -- the same layout MTT uses for its
expert-trajectory buffers.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

# --------------------------------------------------------------------------
# Flat <-> list helpers
# --------------------------------------------------------------------------


def flatten_params(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors (each reshaped to 1-D) into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_params(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``flat`` into views shaped like the tensors in ``like``."""
    numels = [t.numel() for t in like]
    if flat.dim() != 1 or flat.numel() != sum(numels):
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, "
                         f"expected [{sum(numels)}]")
    chunks = torch.split(flat, numels)
    return [c.view(t.shape) for c, t in zip(chunks, like)]


def load_flat_(module: nn.Module, flat: Tensor) -> None:
    """Copy ``flat`` into ``module``'s parameters in place (no autograd)."""
    params = list(module.parameters())
    with torch.no_grad():
        for p, value in zip(params, unflatten_params(flat.detach(), params)):
            p.copy_(value)


# --------------------------------------------------------------------------
# Functional wrapper
# --------------------------------------------------------------------------


class ReparamModule(nn.Module):
    """Evaluate ``module`` with weights read from a flat vector."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        named = list(module.named_parameters())
        self.param_names: list[str] = [n for n, _ in named]
        self.param_shapes: list[torch.Size] = [p.shape for _, p in named]
        self.param_numels: list[int] = [p.numel() for _, p in named]
        self.num_params: int = sum(self.param_numels)
        # (owning submodule, attribute) of each parameter, resolved once
        self._slots = [(module.get_submodule(n.rpartition('.')[0]), n.rpartition('.')[2]) for n in self.param_names]

    def flat_param(self) -> Tensor:
        """Detached copy of the module's current parameters, shape [P]."""
        return flatten_params(p.detach() for p in self.module.parameters()).clone()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` keyed by parameter name (differentiable)."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"flat vector has shape {tuple(flat.shape)}, "
                             f"expected [{self.num_params}]")
        chunks = torch.split(flat, self.param_numels)
        return {name: c.view(shape) for name, c, shape
                in zip(self.param_names, chunks, self.param_shapes)}

    @contextlib.contextmanager
    def _bound(self, flat: Tensor):
        """Parameters of the module replaced by views of ``flat`` inside the block. Buffers (BatchNorm
        running stats) stay the module's own; in train mode BatchNorm updates them, as nn.Module would."""
        views = self.unflatten(flat)
        saved = [m._parameters[attr] for m, attr in self._slots]
        for (m, attr), name in zip(self._slots, self.param_names):
            m._parameters[attr] = views[name]
        try:
            yield
        finally:
            for (m, attr), p in zip(self._slots, saved):
                m._parameters[attr] = p

    def forward(self, x: Tensor, flat_param: Tensor) -> Tensor:
        with self._bound(flat_param):
            return self.module(x)

    def embed(self, x: Tensor, flat_param: Tensor) -> Tensor:
        """Penultimate features of the module under ``flat_param``."""
        with self._bound(flat_param):
            return self.module.embed(x)
