"""Labels and regularised classes: their checks, and the choice of the class a sample regularises.

The GC loss explains one class per image, its *regularised class* (``gradcam_targets``): the
label of a single-label image, one class drawn by :func:`sample_present_classes` for a
multi-label one. Every place that receives regularised classes (the distractor functions, the
data-set sampler, the training loop) checks them with :func:`check_gradcam_targets`, and every
place that draws them for multi-hot labels (``--distractors batch`` in the training loop,
``--distractors dataset`` in :class:`~captum_consistency.data.DatasetWithDistractors`, the
evaluation) calls :func:`sample_present_classes`, so that both distractor schemes regularise
the same classes.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["check_gradcam_targets", "sample_present_classes"]


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _as_targets(targets: Any, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor of class ids or multi-hot rows, got {type(targets).__name__}") from e
    if targets.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be (N,) class ids or (N, K) multi-hot, got shape {tuple(targets.shape)}"
        )
    if targets.dim() == 1 and not _is_integer(targets):
        raise TypeError(f"1-D {name} must hold integer class ids, got dtype {targets.dtype}")
    return targets


def check_gradcam_targets(
    gradcam_targets: Any,
    n: Optional[int] = None,
    num_classes: Optional[int] = None,
    where: str = "gradcam_targets",
    values: bool = True,
) -> Tensor:
    """Checks regularised classes: an integer ``(n,)`` tensor of class ids in ``-1..K-1``.

    ``-1`` means "no class": nothing to exclude when drawing distractors.

    Args:
        gradcam_targets (Tensor or sequence of int): the regularised class of each sample.
        n (int, optional): the number of samples; ``None``: any 1-D tensor.
        num_classes (int, optional): ``K``, the upper bound of the class ids.
        where (str): how the messages name the argument.
        values (bool): also check the values (``>= -1``, ``< num_classes``), which reads the
            tensor on the host; ``False``: dtype and shape only (no host-device
            synchronisation).

    Returns:
        Tensor: ``gradcam_targets`` as a tensor (unchanged when it is one).

    Raises:
        TypeError: not integer class ids (a bool mask would read as the classes 0 and 1).
        ValueError: a wrong shape, or a value outside ``-1..num_classes-1``.
    """
    g = gradcam_targets
    if not isinstance(g, Tensor):
        try:
            g = torch.as_tensor(g)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{where} must be an integer tensor of class ids, got {type(g).__name__}") from e
    if not _is_integer(g):
        raise TypeError(
            f"{where} must be an integer tensor (integer class ids; a bool mask would read as "
            f"the classes 0 and 1), got dtype {g.dtype}"
        )
    if g.dim() != 1 or (n is not None and g.shape[0] != n):
        raise ValueError(f"{where} must have shape ({'N' if n is None else n},), got {tuple(g.shape)}")
    if values and g.numel():
        lo, hi = torch.stack([g.min(), g.max()]).tolist()  # one host sync for both checks
        top = "K-1" if num_classes is None else num_classes - 1
        if lo < -1 or (num_classes is not None and hi >= num_classes):
            raise ValueError(
                f"{where} must lie in -1..{top} (class ids, or -1: no class), got values in [{lo}, {hi}]"
            )
    return g


def _as_gradcam_targets(gradcam_targets: Optional[Any], targets: Tensor, num_classes: Optional[int]) -> Tensor:
    """The regularised classes of ``targets``: given (and checked), or the class ids themselves."""
    if gradcam_targets is None:
        if targets.dim() == 2:
            raise ValueError(
                "gradcam_targets is required with multi-hot (N, K) targets: the class regularised "
                "for each sample (e.g. sample_present_classes(targets))"
            )
        return targets
    g = check_gradcam_targets(gradcam_targets, targets.shape[0], num_classes)
    return g.to(targets.device)


def _rand(shape: Tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_present_classes(targets: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The regularised class of each multi-hot row: a present class, drawn uniformly.

    The GC loss explains one class per composite; the authors pick one ground-truth category
    of a multi-label image at random. A row without any class (an image without annotations,
    kept with an all-zero target) draws uniformly among all ``K`` classes: the image is then
    regularised on a class it does not contain, and its distractors exclude that class (the GC
    loss needs a class for every image). Batched: random keys on the eligible entries,
    ``argmax``; the keys are drawn on the generator's device.

    Args:
        targets (Tensor): ``(N, K)`` multi-hot (nonzero = present).
        generator (torch.Generator, optional): source of randomness.

    Returns:
        ``(N,)`` int64 class indices on ``targets.device``.

    Raises:
        ValueError: ``targets`` is not ``(N, K)``.

    Examples::

        >>> targets = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
        >>> c = sample_present_classes(targets)
        >>> c[0].item() in (0, 2), c[1].item(), c[2].item() in (0, 1, 2)
        (True, 1, True)
    """
    targets = torch.as_tensor(targets)
    if targets.dim() != 2:
        raise ValueError(f"targets must be (N, K) multi-hot, got shape {tuple(targets.shape)}")
    present = targets != 0
    eligible = present | ~present.any(dim=1, keepdim=True)  # an empty row: every class
    keys = _rand(tuple(eligible.shape), generator, targets.device).masked_fill_(~eligible, -1.0)
    return keys.argmax(dim=1)
