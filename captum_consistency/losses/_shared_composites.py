"""Shared composites of the GC loss: one 2x2 composite serves the four images it holds."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from captum_consistency.composition import (
    NUM_CELLS,
    NUM_DISTRACTORS,
    check_cells,
    compose_shared,
    random_cells,
)

#: What the GC loss accepts as ``distractors``: images, a callable returning them, or nothing.
Distractors = Union[Tensor, Callable[[], Tensor], None]


class _SharedComposites:
    """The shared-composite half of :class:`~captum_consistency.GradCamConsistencyLoss`
    (``composites="shared"``); the loss sets ``generator`` and ``_checked_groups_on_device``."""

    generator: Optional[torch.Generator]
    _checked_groups_on_device: bool

    def _shared_composites(
        self, images: Tensor, targets: Tensor, gradcam_targets: Tensor, distractors: Distractors,
        cells: Optional[Tensor], groups: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The shared composites: ``(composites (G + U, C, 2H, 2W), cells (N,), groups, replicate)``.

        ``replicate`` (N,) is the composite of every image, on the device: the activation copy
        of image ``i`` is row ``replicate[i]`` of the composites' activations.
        """
        from captum_consistency.data.distractors import shared_composite_groups

        n = images.shape[0]
        if groups is None:
            if cells is not None:
                raise ValueError(
                    "with composites='shared' the cells come with the grouping: pass groups and "
                    "cells from captum_consistency.data.shared_composite_groups, or neither"
                )
            groups, cells = shared_composite_groups(targets, gradcam_targets, generator=self.generator)
        else:
            groups, cells = self._checked_groups(groups, cells, targets, gradcam_targets)
        num_groups = groups.shape[0]
        grouped = torch.zeros(n, dtype=torch.bool)
        grouped[groups.flatten()] = True
        ungrouped = (~grouped).nonzero().squeeze(1)
        composite_of = torch.empty(n, dtype=torch.long)
        composite_of[groups.flatten()] = torch.arange(num_groups).repeat_interleave(NUM_CELLS)
        composite_of[ungrouped] = num_groups + torch.arange(ungrouped.numel())
        extra = None
        if ungrouped.numel():
            extra = self._ungrouped_distractors(images, targets, gradcam_targets, distractors, ungrouped)
        num_composites = num_groups + ungrouped.numel()
        composite = compose_shared(images, composite_of, cells, num_composites, extra, ungrouped)
        device = images.device
        return (
            composite,
            cells.to(device, non_blocking=True),
            groups,
            composite_of.to(device, non_blocking=True),
        )

    def _checked_groups(
        self, groups: Tensor, cells: Optional[Tensor], targets: Tensor, gradcam_targets: Tensor
    ) -> Tuple[Tensor, Tensor]:
        n = targets.shape[0]
        if (
            not isinstance(groups, Tensor)
            or groups.dim() != 2
            or groups.shape[1] != NUM_CELLS
            or groups.dtype.is_floating_point
            or groups.dtype.is_complex
            or groups.dtype == torch.bool
        ):
            raise ValueError(
                "groups must be a (G, 4) integer tensor of batch positions (row r: the images of "
                f"composite r in cell order), got {getattr(groups, 'shape', type(groups))} "
                f"{getattr(groups, 'dtype', '')}"
            )
        groups = groups.cpu().long()
        if groups.numel():
            if int(groups.min()) < 0 or int(groups.max()) >= n:
                raise ValueError(
                    f"groups must hold batch positions in 0..{n - 1}, got values in "
                    f"[{int(groups.min())}, {int(groups.max())}]"
                )
            if torch.unique(groups).numel() != groups.numel():
                raise ValueError("groups lists an image more than once: each image belongs to one composite")
        if targets.device.type == "cpu" or not self._checked_groups_on_device:
            _check_groups_exclusive(groups, targets.cpu(), gradcam_targets.cpu())
            self._checked_groups_on_device = True
        position = torch.arange(NUM_CELLS).repeat(groups.shape[0])
        if cells is None:
            cells = random_cells(n, generator=self.generator, device=torch.device("cpu"))
        else:
            check_cells(cells, n)
            cells = cells.cpu().long()
            if not torch.equal(cells[groups.flatten()], position):
                raise ValueError(
                    "cells of the grouped images must be their column in groups (cell k of "
                    "composite r holds groups[r, k])"
                )
            cells = cells.clone()
        cells[groups.flatten()] = position
        return groups, cells

    def _ungrouped_distractors(
        self,
        images: Tensor,
        targets: Tensor,
        gradcam_targets: Tensor,
        distractors: Distractors,
        ungrouped: Tensor,
    ) -> Tensor:
        """``(U, 3, C, H, W)`` distractors of the ungrouped images, on ``images.device``."""
        distractors = _resolve(distractors)
        if distractors is not None:
            _check_distractors(distractors, images)
            return distractors[ungrouped.to(distractors.device)].to(device=images.device, dtype=images.dtype)
        from captum_consistency.data.distractors import in_batch_distractors

        index, valid = in_batch_distractors(targets.cpu(), gradcam_targets.cpu(), generator=self.generator)
        missing = int((~valid[ungrouped]).sum())
        if missing:
            n = images.shape[0]
            raise ValueError(
                f"{missing} of the {ungrouped.numel()} images that could not be grouped into shared "
                f"composites (batch of {n}) have fewer than {NUM_DISTRACTORS} batch mates without "
                "their class; pass distractors (N, 3, C, H, W), e.g. gather_distractors(images, "
                "targets, fallback=DistractorFallback(...)), or use a larger batch"
            )
        return images[index[ungrouped].to(images.device, non_blocking=True)]


def _resolve(distractors: Distractors) -> Optional[Tensor]:
    if distractors is None or isinstance(distractors, Tensor):
        return distractors
    if callable(distractors):
        return distractors()
    raise TypeError(
        "distractors must be a (N, 3, C, H, W) tensor or a callable returning one, got "
        f"{type(distractors).__name__}"
    )


def _check_distractors(distractors: Tensor, images: Tensor) -> None:
    n, c, h, w = images.shape
    expected = (n, NUM_DISTRACTORS, c, h, w)
    if not isinstance(distractors, Tensor) or tuple(distractors.shape) != expected:
        raise ValueError(
            f"distractors must have shape (N, 3, C, H, W) = {expected} to match images, got "
            f"{tuple(getattr(distractors, 'shape', ())) or type(distractors).__name__}"
        )



def _check_groups_exclusive(groups: Tensor, targets: Tensor, gradcam_targets: Tensor) -> None:
    """Raises unless every image's regularised class is absent from its composite mates."""
    if not groups.numel():
        return
    classes = gradcam_targets[groups]  # (G, 4)
    if targets.dim() == 1:
        # [r, a, b]: image b of composite r has the class of image a
        contains = targets[groups].unsqueeze(1) == classes.unsqueeze(2)
    else:
        present = targets != 0
        contains = present[groups.unsqueeze(1), classes.clamp(min=0).unsqueeze(2)] & (classes >= 0).unsqueeze(2)
    contains &= ~torch.eye(NUM_CELLS, dtype=torch.bool)
    if bool(contains.any()):
        r, a, b = (int(v) for v in contains.nonzero()[0])
        raise ValueError(
            f"groups row {r} puts image {int(groups[r, b])} in the composite of image "
            f"{int(groups[r, a])}, but it contains that image's class {int(classes[r, a])}: a "
            "distractor must not contain the class"
        )

