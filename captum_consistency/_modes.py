"""The one way the library evaluates a model that a user may hand over in train mode."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts every sub-module of ``model`` in eval mode and restores each one's own mode on
    exit (a model with some sub-modules frozen in eval mode keeps them so), so that a measure
    reads batch-norm statistics and never updates them, and dropout is off. A plain callable
    (a function wrapping a model) is used as it is."""
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
