"""Caller's models held still while something else trains against them."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No gradients for the modules' parameters and eval mode (dropout would make a loss depend on more than the
    seed) for the block; the caller's flags and train/eval modes come back exactly as they were."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in {id(m): m for mod in modules for m in mod.modules()}.values()]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in modules:
            m.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.train(training)
