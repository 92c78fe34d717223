"""Contrastive Grad-CAM Consistency (CGC): Pillai, Koohpayegani, Ouligian, Fong, Pirsiavash, CVPR 2022."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.losses.functional import cgc_infonce
from captum_consistency.losses.guided import ExplanationLoss, _check_images_targets, _ExplanationOutput

__all__ = ["ContrastiveGradCamLoss", "ContrastiveLossOutput", "random_crop_boxes", "crop_and_flip"]

#: The values of ``ContrastiveGradCamLoss(classes=...)``.
CGC_CLASSES = ("predicted", "label")


def random_crop_boxes(
    n: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Random resized-crop boxes and flips, as fractions of the image, drawn for ``n`` images.

    The draw of :class:`torchvision.transforms.RandomResizedCrop` (area fraction uniform in
    ``scale``, aspect ratio log-uniform in ``ratio``), vectorised: a box that does not fit is
    shrunk to fit (torchvision retries ten times and falls back to a central crop).

    Args:
        n (int): number of images.
        scale (tuple of float): range of the crop's area fraction.
        ratio (tuple of float): range of the crop's width / height.
        flip_p (float): probability of a horizontal flip.
        generator (torch.Generator, optional): CPU generator.

    Returns:
        ``(boxes, flips)``: ``(n, 4)`` float32 ``x1, y1, x2, y2`` in [0, 1] and ``(n,)`` bool.

    Examples::

        >>> boxes, flips = random_crop_boxes(8, generator=torch.Generator().manual_seed(0))
    """
    u = torch.rand(n, 5, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    x1 = (1 - w) * u[:, 2]
    y1 = (1 - h) * u[:, 3]
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    return boxes, u[:, 4] < flip_p


def crop_and_flip(x: Tensor, boxes: Tensor, flips: Tensor, size: Sequence[int]) -> Tensor:
    """Resized crop then horizontal flip of each image or map, differentiably (bilinear).

    ``affine_grid`` + ``grid_sample``: the same sampling for the images and for the Grad-CAM
    maps, linear in ``x``, so gradients (and double backward) pass through it.

    Args:
        x (Tensor): ``(N, C, H, W)`` images or maps.
        boxes (Tensor): ``(N, 4)`` ``x1, y1, x2, y2`` fractions of the width and height.
        flips (Tensor): ``(N,)`` bool, flip after cropping.
        size (sequence of int): ``(h, w)`` of the output.

    Returns:
        Tensor ``(N, C, h, w)``.

    Examples::

        >>> views = crop_and_flip(images, boxes, flips, images.shape[-2:])
    """
    if x.dim() != 4 or boxes.shape != (x.shape[0], 4) or flips.shape != (x.shape[0],):
        raise ValueError(
            f"x must be (N, C, H, W) with boxes (N, 4) and flips (N,), got {tuple(x.shape)}, "
            f"{tuple(boxes.shape)}, {tuple(flips.shape)}"
        )
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    sign = 1 - 2 * flips.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) * sign  # normalised coordinates span 2
    theta[:, 0, 2] = boxes[:, 0] + boxes[:, 2] - 1
    theta[:, 1, 1] = boxes[:, 3] - boxes[:, 1]
    theta[:, 1, 2] = boxes[:, 1] + boxes[:, 3] - 1
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], int(size[0]), int(size[1])], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class ContrastiveLossOutput(_ExplanationOutput):
    """What :class:`ContrastiveGradCamLoss` returns.

    Attributes:
        loss: ``classification + lam * explanation``.
        classification: the criterion on the images.
        explanation: the InfoNCE term (:func:`~captum_consistency.losses.cgc_infonce`).
        logits: ``(N, K)`` logits of the images.
        classes: ``(N,)`` the classes whose Grad-CAM was regularised.
        saliency: ``(N, 1, H, W)`` the originals' normalised maps at image size (detached).
        augmented_saliency: ``(N, 1, H, W)`` the augmented views' maps (detached).
        per_image: ``(N,)`` each image's InfoNCE term (detached).
        boxes: ``(N, 4)`` the crops (fractions), flips: ``(N,)`` the flips.

    Examples::

        >>> out = ContrastiveGradCamLoss(model, model.layer4)(images, labels)
        >>> out.loss.backward()
    """

    classes: Tensor
    saliency: Tensor
    augmented_saliency: Tensor
    per_image: Tensor
    boxes: Tensor
    flips: Tensor


def _gather_with_grad(x: Tensor) -> Tuple[Tensor, int]:
    """All ranks' ``x`` concatenated (gradients flow back to each rank's own rows), and the
    offset of this rank's rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(list(parts), dim=0), dist.get_rank() * x.shape[0]


class ContrastiveGradCamLoss(ExplanationLoss):
    r"""Contrastive Grad-CAM Consistency (CGC): Grad-CAM that follows a crop and flip.

    Pillai, Koohpayegani, Ouligian, Fong, Pirsiavash, "Consistent Explanations by Contrastive
    Learning", CVPR 2022, the follow-up of the GC loss (:class:`~captum_consistency.GradCamConsistencyLoss`):
    where GC asks the map of an image to survive being pasted into a 2x2 composite, CGC asks it
    to follow a random resized crop and flip ``T``, contrastively. With ``g(x)`` the Grad-CAM of
    the regularised class, resized to the image size and normalised to sum one,
    ``q_i = g(T_i x_i)`` and ``k_i = T_i g(x_i)`` (the same crop and flip applied to the map),
    both flattened and L2-normalised,

    .. math::

        \mathcal{L} = \ell(f(x), y) - \frac{\lambda}{N} \sum_i \log
        \frac{e^{q_i \cdot k_i / \tau}}{e^{q_i \cdot k_i / \tau} + \sum_{j \ne i} e^{q_i \cdot q_j / \tau}}

    (:func:`~captum_consistency.losses.cgc_infonce`). The crop is applied to the images and to
    the maps by the same bilinear sampling (:func:`crop_and_flip`), so the map's transform is
    differentiable and exact.

    Facts of the official code (UCDvision/CGC) followed: the map is the element-wise Grad-CAM
    (``relu(sum_k dy/dA_k * A_k)``, its ``compute_gradcam``) at ``layer4``, of the class the
    model *predicts* on the original view, for both views; it is upsampled bilinearly to the
    image size and normalised as ``m / (sum m + 1e-8) + 1e-8``; both maps keep their graph;
    the negatives are the augmented views' maps of the other images of the local batch; the
    crop is torchvision's ``RandomResizedCrop`` draw (scale 0.08-1, ratio 3/4-4/3) and the flip
    has probability 0.5. The README's ImageNet command uses ``lambda = 0.5`` and
    ``tau = 0.5`` (the script's argparse defaults, 1000 and 0.01, differ), the defaults here.
    Differences: the official loader gives each image a third, independently cropped view for
    the cross-entropy and adds the cross-entropy of all three views; here the classification
    term is the criterion on the batch as loaded (the augmented view is built in the loss,
    from it), so the loss adds one forward and one backward of the augmented batch to a plain
    step.

    Args:
        model (torch.nn.Module): the classifier (may be wrapped in ``DistributedDataParallel``).
        layer (torch.nn.Module): the Grad-CAM layer (``model.layer4``).
        lam (float): weight ``lambda`` (0.5).
        temperature (float): ``tau`` (0.5).
        classes (str): ``"predicted"`` (the official code) or ``"label"`` (the training label,
            or ``gradcam_targets``).
        attribution (str): a name of
            :data:`~captum_consistency.attr.DIFFERENTIABLE_ATTRIBUTIONS` at a layer;
            ``"elementwise-gradcam"`` (the official map) by default, ``"gradcam"`` for Grad-CAM
            with averaged gradients. Signed maps are clipped at zero.
        criterion (Callable, optional): classification loss; cross-entropy by default.
        gather_negatives (bool): under ``torch.distributed``, take the negatives from every
            process's batch (``all_gather`` with gradient); every process must then have the
            same batch size. ``False`` (the official code): the local batch only.
        scale (tuple of float): range of the crop's area fraction.
        ratio (tuple of float): range of the crop's aspect ratio.
        flip_p (float): flip probability.
        generator (torch.Generator, optional): CPU generator of the crops.
        eps (float): the normaliser's ``eps`` (1e-8).
        check_graph (bool): check on the first training step that the term's gradient reaches
            the parameters below ``layer``.

    Raises:
        ValueError: (at call) a batch of one image without ``gather_negatives`` under
            several processes: there is no negative.

    Examples::

        >>> loss_fn = ContrastiveGradCamLoss(model, model.layer4)   # lambda 0.5, tau 0.5
        >>> out = loss_fn(images, labels)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        lam: float = 0.5,
        temperature: float = 0.5,
        classes: str = "predicted",
        attribution: str = "elementwise-gradcam",
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        gather_negatives: bool = False,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        generator: Optional[torch.Generator] = None,
        eps: float = 1e-8,
        check_graph: bool = True,
    ) -> None:
        if attribution == "input-x-gradient":
            raise ValueError("CGC regularises a layer's Grad-CAM; choose an attribution at a layer")
        super().__init__(model, layer, lam, attribution, criterion, check_graph)
        if classes not in CGC_CLASSES:
            raise ValueError(f"classes must be one of {CGC_CLASSES}, got {classes!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.temperature = float(temperature)
        self.classes = classes
        self.gather_negatives = gather_negatives
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), float(flip_p)
        self.generator = generator
        self.eps = eps

    def _normalised(self, maps: Tensor, size) -> Tensor:
        maps = F.interpolate(maps.clamp(min=0), size=tuple(size), mode="bilinear", align_corners=False)
        return maps / (maps.flatten(1).sum(1).view(-1, 1, 1, 1) + self.eps) + self.eps

    def forward(
        self,
        images: Tensor,
        targets: Tensor,
        gradcam_targets: Optional[Tensor] = None,
        boxes: Optional[Tensor] = None,
        flips: Optional[Tensor] = None,
    ) -> ContrastiveLossOutput:
        """The CGC loss of a batch.

        Args:
            images (Tensor): ``(N, C, H, W)``, ``N >= 2`` (or ``gather_negatives`` under
                several processes).
            targets (Tensor): what ``criterion`` expects.
            gradcam_targets (Tensor, optional): ``(N,)`` classes for ``classes="label"``;
                default ``targets``.
            boxes (Tensor, optional): ``(N, 4)`` crops as fractions (:func:`random_crop_boxes`);
                drawn when ``None``.
            flips (Tensor, optional): ``(N,)`` bool, given with ``boxes``.

        Returns:
            ContrastiveLossOutput

        Raises:
            ValueError: fewer than two images overall (no negative), bad shapes.
            RuntimeError: on the first training step, the term's graph does not reach the
                parameters below the layer (the message names it).
        """
        labels = _check_images_targets(images, targets, gradcam_targets)
        n, size = images.shape[0], images.shape[-2:]
        gathering = False
        if self.gather_negatives:
            import torch.distributed as dist

            gathering = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if n < 2 and not gathering:
            raise ValueError(
                "CGC needs at least 2 images per batch: the other images' Grad-CAMs are the "
                f"negatives of its contrastive term, got a batch of {n} (raise --batch-size, or "
                "gather the negatives across processes with gather_negatives=True)"
            )
        if boxes is None:
            boxes, flips = random_crop_boxes(n, self.scale, self.ratio, self.flip_p, self.generator)
        elif flips is None:
            raise ValueError("flips (N,) must be given with boxes")
        views = crop_and_flip(images, boxes, flips, size)
        explain = None if self.classes == "predicted" else labels
        with self._below() as below:
            logits, maps, classes = self._attribute(self.model, self.layer, images, explain)
        _, maps_aug, _ = self._attribute(self.model, self.layer, views, classes)
        classification = self.criterion(logits, targets)
        g = self._normalised(maps, size)
        q = self._normalised(maps_aug, size)
        k = crop_and_flip(g, boxes, flips, size)
        negatives, offset = (q, 0)
        if gathering:
            negatives, offset = _gather_with_grad(q)
        per_image = cgc_infonce(
            q, k, self.temperature, negatives=negatives,
            self_index=torch.arange(n, device=q.device) + offset, reduction="none",
        )
        loss, explanation = self._combine(classification, per_image.mean(), below)
        return ContrastiveLossOutput(
            loss=loss,
            classification=classification,
            explanation=explanation,
            logits=logits,
            classes=classes,
            saliency=g.detach(),
            augmented_saliency=q.detach(),
            per_image=per_image.detach(),
            boxes=boxes,
            flips=flips,
        )
