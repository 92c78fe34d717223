"""The Grad-CAM consistency (GC) loss of Pillai & Pirsiavash (AAAI 2021), Eq. 5."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.attr._elementwise_grad_cam import (
    check_layer_in_model,
    elementwise_grad_cam,
    grad_cam,
)
from captum_consistency.composition import (
    _SLOT_TO_CELL,
    NUM_CELLS,
    NUM_DISTRACTORS,
    _check_cells,
    _compose_checked_cells,
    compose_grid,
    random_cells,
)
from captum_consistency.saliency import DEFAULT_EPS, normalize_saliency

__all__ = ["GradCamConsistencyLoss", "ConsistencyLossOutput", "LayerRecorder"]

#: The values of ``GradCamConsistencyLoss(composites=...)``.
COMPOSITE_MODES = ("per-image", "shared")


class LayerRecorder:
    """Context manager that records the output of ``layer`` during forward passes.

    The GC loss needs the layer's activations of the very forward pass that produced the logits
    (a second forward, as a separate attribution call would do, doubles the cost).

    Args:
        layer (torch.nn.Module): the module whose output is recorded; it must return a single
            tensor and run once per forward pass.

    Examples::

        >>> with LayerRecorder(model.layer4) as rec:
        ...     logits = model(x)
        >>> acts = rec.pop()
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self._outputs: List[Tensor] = []
        self._handle = None
        # Set by the GC loss for a shared composite's forward: the output is replaced by one
        # copy per image of the composite (row i of the result is row _replicate[i]).
        self._replicate: Optional[Tensor] = None

    def _hook(self, module: nn.Module, inputs, output) -> Optional[Tensor]:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {type(module).__name__} must return a single tensor, got {type(output).__name__}"
            )
        if self._replicate is not None:
            output = output.index_select(0, self._replicate)
            self._outputs.append(output)
            return output  # a forward hook's return value replaces the layer's output
        self._outputs.append(output)
        return None

    def __enter__(self) -> "LayerRecorder":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> Tensor:
        """Returns the single recorded output and clears the record.

        Returns:
            Tensor: the layer's output, still attached to the autograd graph.

        Raises:
            RuntimeError: the layer ran zero or several times since the last :meth:`pop`.
        """
        outputs, self._outputs = self._outputs, []
        if len(outputs) != 1:
            raise RuntimeError(
                f"expected the layer to run exactly once per forward pass, it ran {len(outputs)} "
                "times (a layer reused inside the model, or nn.DataParallel replicas: use "
                "DistributedDataParallel)"
            )
        return outputs[0]


@dataclass
class ConsistencyLossOutput:
    """What :class:`GradCamConsistencyLoss` returns.

    Attributes:
        loss: ``classification + lam * consistency``, a scalar to call ``backward()`` on.
        classification: the criterion on the single images.
        consistency: mean L1 between the composite's normalised map and the target (Eq. 5).
        logits: ``(N, num_classes)`` logits of the single images (for accuracy).
        cells: ``(N,)`` cell of each image in its composite.
        saliency: ``(N, 1, h, w)`` normalised map of the single images (detached).
        composite_saliency: ``(N, 1, 2h, 2w)`` normalised map of each image's composite for
            the image's class (detached); in shared mode the four images of a composite have
            four maps of the same composite, one per class.
        per_image_consistency: ``(N,)`` each image's L1 term (its mean over the composite
            map's locations; ``consistency`` is their mean), detached.
        groups: ``(G, 4)`` int64 CPU tensor, the shared composites: row ``r`` holds the batch
            positions of the images of composite ``r`` in cell order (column ``k`` is cell
            ``k``). Empty ``(0, 4)`` in per-image mode.
        num_ungrouped: number of images that got a composite of their own with three
            distractors (per-image composites): ``N - 4 G``; ``N`` in per-image mode.

    Examples::

        >>> out = loss_fn(images, labels, distractors)
        >>> out.loss.backward()
        >>> top1 = (out.logits.argmax(1) == labels).float().mean()
        >>> nqh = negative_quadrants_heatmap(out.composite_saliency, out.cells)  # for free
    """

    loss: Tensor
    classification: Tensor
    consistency: Tensor
    logits: Tensor
    cells: Tensor
    saliency: Tensor
    composite_saliency: Tensor
    per_image_consistency: Tensor
    groups: Tensor
    num_ungrouped: int


class GradCamConsistencyLoss(nn.Module):
    r"""Cross-entropy plus Grad-CAM consistency between an image and its 2x2 composite.

    From Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021.
    Each image ``x`` of class ``y`` is placed in a random cell ``k`` of a 2x2 grid with three
    distractors whose labels exclude ``y``, giving the composite ``c``. With ``g^y`` the
    element-wise Grad-CAM (Eq. 3) of class ``y`` at ``layer``, normalised to sum 1,

    .. math::

        \mathcal{L} = \ell(f(x), y) + \lambda\,
        \big\| g^y_c - \mathrm{comp}(k, g^y_x, 0, 0, 0) \big\|_1

    (Eqs. 4-5), the L1 term being the mean over the composite map's locations, as the authors
    compute it. The map is at feature resolution: for ResNets the composite's map is exactly
    twice the single one (``14x14`` vs ``7x7`` at ``layer4``). Where it is not (AlexNet's
    pooled features: 6 vs 13), both maps are first resized bilinearly to pixel resolution and
    then normalised. The target ``g^y_x`` is not detached by default, as in the authors' code.

    The loss reuses the forward pass that produces the logits: the layer's activations are
    recorded with a hook and the map's gradient is taken with ``create_graph=True`` (double
    backpropagation), so one training step costs one forward/backward on ``x`` and one on ``c``
    plus a backward through the head only (at ``layer4``).

    **Composites.** ``composites="per-image"`` (the default, the paper's scheme) builds one
    composite per image from the ``distractors`` given: ``N`` composites of ``2S x 2S``, four
    times the batch's pixels, so a step costs about five plain steps.
    ``composites="shared"`` lets one composite serve the four images it holds: four images
    whose regularised classes are mutually exclusive (each one's class absent from the other
    three's labels) are each other's distractors, so each gets its term of Eq. 5 from the same
    composite, with its own cell and class. The batch is grouped by
    :func:`~captum_consistency.data.shared_composite_groups` (seeded by ``generator``; each
    image in exactly one composite, in a random cell), and needs about ``N / 4`` composites,
    the batch's own pixel count: a step costs about two plain steps. Images that cannot be
    grouped (a batch size that is not a multiple of 4, a class with more than ``N / 4`` images,
    multi-label conflicts) get a composite of their own as in per-image mode; their number is
    ``num_ungrouped`` in the output. In eval mode each image's term, and the gradients, are
    those of per-image mode given the same composites (in training mode batch-norm statistics
    come from the ``N / 4`` composites).

    How the four gradients are taken: the composite runs through the model once up to
    ``layer``; a forward hook then hands each of its images its own copy of the composite's
    activations, so the rest of the network runs once per image and one ordinary backward
    gives each image the gradient of its own class score with respect to its own copy. This is
    preferred to ``torch.autograd.grad(..., is_grads_batched=True)`` (one backward vmapped over
    the four classes) because the copies are plain autograd: double backpropagation, bf16
    autocast, ``DistributedDataParallel`` and any head behave exactly as in per-image mode,
    without relying on vmap batching rules (and their double backward) for every operation of
    a user's head; each image's logits and map are computed as in per-image mode (dropout in
    the head draws one mask per image, as there), and an ungrouped composite costs one row,
    not four. The price is the part after ``layer`` run ``N`` times instead of ``N / 4``:
    nothing at ``layer4`` (a pooling and a linear layer), but at an inner layer the rest of the
    backbone runs once per image.

    Args:
        model (torch.nn.Module): the classifier (may be wrapped in ``DistributedDataParallel``).
        layer (torch.nn.Module): the Grad-CAM layer inside ``model`` (``layer4`` for ResNets).
        lam (float or Tensor): weight ``lambda`` of the consistency term (25 for ImageNet, 1
            for COCO); a 0-d tensor is read once, as a float.
        criterion (Callable, optional): classification loss ``criterion(logits, targets)``;
            cross-entropy by default. Multi-label users pass e.g. a scaled BCE-with-logits and
            ``gradcam_targets``.
        elementwise (bool): element-wise Grad-CAM (Eq. 3); ``False`` uses standard Grad-CAM
            (spatially averaged gradients, the same map as Captum's ``LayerGradCam``).
        detach_target (bool): stop the gradient through the single image's map.
        eps (float): normaliser ``m / (m.sum() + eps)``.
        generator (torch.Generator, optional): source of the random cells, and in shared mode
            of the grouping and of the ungrouped images' in-batch distractors.
        composites (str): ``"per-image"`` (one composite per image, the paper's scheme) or
            ``"shared"`` (one composite for four images, see above).

    Examples::

        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
        >>> out = loss_fn(images, labels, distractors)   # distractors: (N, 3, C, H, W)
        >>> out.loss.backward()
        >>> out.classification.item(), out.consistency.item()
        >>> shared = GradCamConsistencyLoss(model, model.layer4, lam=25.0, composites="shared")
        >>> out = shared(images, labels)                 # no distractors needed
        >>> out.groups.shape, out.num_ungrouped          # (N // 4, 4) and 0 for distinct labels
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        lam: Union[float, Tensor] = 25.0,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        elementwise: bool = True,
        detach_target: bool = False,
        eps: float = DEFAULT_EPS,
        generator: Optional[torch.Generator] = None,
        composites: str = "per-image",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_layer_in_model(model, layer)
        if composites not in COMPOSITE_MODES:
            raise ValueError(f"composites must be one of {COMPOSITE_MODES}, got {composites!r}")
        # Plain attributes, not submodules: the loss must not re-register the model's parameters.
        self.__dict__["model"] = model
        self.__dict__["layer"] = layer
        self.lam = _as_lambda(lam)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.elementwise = elementwise
        self.detach_target = detach_target
        self.eps = eps
        self.generator = generator
        self.composites = composites
        self._checked_on_device = False
        self._checked_groups_on_device = False

    def _check_inputs(self, images: Tensor, targets: Tensor, gradcam_targets: Optional[Tensor]):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
            )
        n = images.shape[0]
        if n == 0:
            raise ValueError(
                "images is an empty batch (0 images): the GC loss needs at least one image; skip "
                "empty batches (e.g. batches whose images were all undecodable)"
            )
        if not isinstance(targets, Tensor) or targets.dim() not in (1, 2) or targets.shape[0] != n:
            raise ValueError(
                f"targets must be ({n},) class indices or ({n}, num_classes) multi-hot, "
                f"got {getattr(targets, 'shape', type(targets))}"
            )
        if gradcam_targets is None:
            if targets.dim() != 1:
                raise ValueError(
                    "gradcam_targets (N,) is required when targets are multi-hot (N, num_classes): "
                    "it names the class whose map is regularised"
                )
            gradcam_targets = targets
        if (
            not isinstance(gradcam_targets, Tensor)
            or gradcam_targets.shape != (n,)
            or gradcam_targets.dtype.is_floating_point
            or gradcam_targets.dtype.is_complex
            or gradcam_targets.dtype == torch.bool
        ):
            raise ValueError(
                f"gradcam_targets must be an integer tensor of shape ({n},) holding class indices, "
                f"got {getattr(gradcam_targets, 'shape', type(gradcam_targets))} "
                f"{getattr(gradcam_targets, 'dtype', '')}"
            )
        return gradcam_targets.long()

    def _maps(self, activations: Tensor, gradients: Tensor) -> Tensor:
        cam = elementwise_grad_cam if self.elementwise else grad_cam
        # float32 maps even under bf16 autocast (the normalised maps are small numbers); the
        # channel sum accumulates in float32, so the full-size tensors are not cast first.
        return cam(activations, gradients, relu=True)

    def forward(
        self,
        images: Tensor,
        targets: Tensor,
        distractors: Union[Tensor, Callable[[], Tensor], None] = None,
        cells: Optional[Tensor] = None,
        gradcam_targets: Optional[Tensor] = None,
        groups: Optional[Tensor] = None,
    ) -> ConsistencyLossOutput:
        """Computes the GC loss of a batch.

        Args:
            images (Tensor): ``(N, C, H, W)`` training images (``N >= 1``).
            targets (Tensor): ``(N,)`` class indices, or what ``criterion`` expects (multi-hot
                ``(N, K)`` for multi-label data; in shared mode a class counts as present
                where the entry is nonzero).
            distractors (Tensor or Callable, optional): ``(N, 3, C, H, W)`` images whose
                labels exclude the regularised class, or a callable without arguments that
                returns them (called only when they are needed). Per-image mode: required.
                Shared mode: not needed; when given, only the rows of the ungrouped images
                are used (their composites are then exactly per-image mode's), and when
                ``None`` those images draw three distractors from the batch
                (:func:`~captum_consistency.data.in_batch_distractors`; a clear error if an
                ungrouped image has fewer than three batch mates without its class).
            cells (Tensor, optional): ``(N,)`` cells in {0, 1, 2, 3}; random when ``None``.
                In shared mode the cells come with the grouping: pass them only with
                ``groups`` (those of grouped images must be their column in ``groups``).
            gradcam_targets (Tensor, optional): ``(N,)`` class whose map is regularised;
                defaults to ``targets`` when it is 1-D. Its range is checked at every call on
                the CPU, and at the first call only on an accelerator (a check there is a
                host-device synchronisation).
            groups (Tensor, optional): shared mode only: ``(G, 4)`` batch positions, row ``r``
                the images of composite ``r`` in cell order, as
                :func:`~captum_consistency.data.shared_composite_groups` returns them (images
                not listed are ungrouped). Drawn with ``generator`` when ``None``; the draw
                reads the labels on the CPU, so for a batch on an accelerator pass
                ``groups, cells = shared_composite_groups(cpu_labels, ...)`` to keep the step
                free of host-device synchronisations (:func:`~captum_consistency.engine.train_one_epoch`
                does). A given grouping is checked against the labels (every call on the CPU,
                first call only on an accelerator).

        Returns:
            ConsistencyLossOutput: ``.loss``, ``.classification``, ``.consistency``,
            ``.logits``, ``.cells``, the normalised maps, ``.per_image_consistency``,
            ``.groups`` and ``.num_ungrouped``.

        Raises:
            ValueError: an empty batch; per-image mode without ``distractors``; in shared
                mode, an ungrouped image without distractors, or a ``groups`` that puts an
                image with a composite mate's class in it.
        """
        gradcam_targets = self._check_inputs(images, targets, gradcam_targets)
        n = images.shape[0]
        replicate = None
        if self.composites == "per-image":
            if groups is not None:
                raise ValueError("groups is for composites='shared'; this loss builds per-image composites")
            distractors = _resolve(distractors)
            if distractors is None:
                raise ValueError(
                    "distractors (N, 3, C, H, W) are required with per-image composites: take them "
                    "from the batch with captum_consistency.data.gather_distractors(images, targets), "
                    "or build the loss with composites='shared', which needs none"
                )
            composite, cells = compose_grid(
                images, distractors, cells=cells, generator=self.generator, return_cells=True
            )
            groups = torch.zeros(0, NUM_CELLS, dtype=torch.long)
        else:
            composite, cells, groups, replicate = self._shared_composites(
                images, targets, gradcam_targets, distractors, cells, groups
            )
        with LayerRecorder(self.layer) as recorder:
            logits = self.model(images)
            acts_x = recorder.pop()
            recorder._replicate = replicate
            logits_c = self.model(composite)
            acts_c = recorder.pop()
        if logits.dim() != 2:
            raise ValueError(f"the model must return (N, num_classes) logits, got {tuple(logits.shape)}")
        if logits_c.shape[0] != n:
            raise RuntimeError(
                f"the model returned {logits_c.shape[0]} rows for the shared composites instead of "
                f"one per image ({n}): the part after the Grad-CAM layer must keep the batch size of "
                "the layer's output (not the input's)"
            )
        num_classes = logits.shape[1]
        # A value check reads the tensor on the host. On CPU that is free; on an accelerator it
        # stalls the launch queue every step, so there it runs on the first call only.
        if (gradcam_targets.device.type == "cpu" or not self._checked_on_device) and (
            int(gradcam_targets.min()) < 0 or int(gradcam_targets.max()) >= num_classes
        ):
            raise ValueError(
                f"gradcam_targets must lie in 0..{num_classes - 1}, got values in "
                f"[{int(gradcam_targets.min())}, {int(gradcam_targets.max())}]"
            )
        self._checked_on_device = True
        classification = self.criterion(logits, targets)

        index = gradcam_targets.view(-1, 1)
        # Shared mode: row i of logits_c comes from image i's own copy of its composite's
        # activations, so its gradient lands on that copy only.
        score = logits.gather(1, index).sum() + logits_c.gather(1, index).sum()
        create_graph = self.lam > 0 and torch.is_grad_enabled()
        grads_x, grads_c = torch.autograd.grad(
            score, (acts_x, acts_c), create_graph=create_graph, retain_graph=True
        )
        map_x = self._maps(acts_x, grads_x)
        map_c = self._maps(acts_c, grads_c)
        if self.detach_target:
            map_x = map_x.detach()

        (h, w), (hc, wc) = map_x.shape[-2:], map_c.shape[-2:]
        if (hc, wc) != (2 * h, 2 * w):
            # Maps that do not tile exactly (AlexNet's pooled features): compare at pixel size.
            map_x = F.interpolate(map_x, size=images.shape[-2:], mode="bilinear", align_corners=False)
            map_c = F.interpolate(map_c, size=composite.shape[-2:], mode="bilinear", align_corners=False)
        # The maps come out of the ReLU of Eq. 3: the sign check (a host-device sync on a GPU)
        # is skipped.
        g_x = normalize_saliency(map_x, self.eps, check=False)
        g_c = normalize_saliency(map_c, self.eps, check=False)
        target = _compose_checked_cells(g_x, None, cells)  # Eq. 4: zero-padded into cell k
        per_image = (g_c - target).abs().flatten(1).mean(dim=1)
        consistency = per_image.mean()
        if self.lam > 0:
            loss = classification + self.lam * consistency
        else:
            consistency = consistency.detach()
            loss = classification
        return ConsistencyLossOutput(
            loss=loss,
            classification=classification,
            consistency=consistency,
            logits=logits,
            cells=cells,
            saliency=g_x.detach(),
            composite_saliency=g_c.detach(),
            per_image_consistency=per_image.detach(),
            groups=groups,
            num_ungrouped=n - NUM_CELLS * groups.shape[0],
        )

    def _shared_composites(
        self,
        images: Tensor,
        targets: Tensor,
        gradcam_targets: Tensor,
        distractors: Union[Tensor, Callable[[], Tensor], None],
        cells: Optional[Tensor],
        groups: Optional[Tensor],
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
        composite = _compose_shared(images, composite_of, cells, num_groups + ungrouped.numel(), ungrouped, extra)
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
            _check_cells(cells, n)
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
        distractors: Union[Tensor, Callable[[], Tensor], None],
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


def _as_lambda(lam: Union[float, Tensor]) -> float:
    if isinstance(lam, Tensor):
        if lam.dim() != 0 or lam.dtype.is_complex or lam.dtype == torch.bool:
            raise TypeError(
                f"lam must be a number or a 0-d real tensor, got a tensor of shape {tuple(lam.shape)} "
                f"and dtype {lam.dtype}"
            )
        lam = lam.item()
    elif isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a real number (a float) or a 0-d tensor, got {type(lam).__name__}")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return lam


def _resolve(distractors: Union[Tensor, Callable[[], Tensor], None]) -> Optional[Tensor]:
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


def _compose_shared(
    images: Tensor,
    composite_of: Tensor,
    cells: Tensor,
    num_composites: int,
    ungrouped: Tensor,
    extra: Optional[Tensor],
) -> Tensor:
    """Writes every image once into its cell of its composite, and the ungrouped ones' distractors.

    ``composite_of``, ``cells`` and ``ungrouped`` are CPU tensors; every cell of every composite
    is written exactly once (a shared composite by its four images, an ungrouped image's by the
    image and its three distractors), so the grid starts uninitialised. Channels-last images
    give channels-last composites, as in :func:`~captum_consistency.compose_grid`.
    """
    n, c, h, w = images.shape
    device = images.device
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grid = torch.empty((num_composites, c, 2 * h, 2 * w), dtype=images.dtype, device=device, memory_format=fmt)
    by_cell = grid.view(num_composites, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5)  # [:, row, col]
    where = torch.stack([composite_of, cells // 2, cells % 2]).to(device, non_blocking=True)
    by_cell[where[0], where[1], where[2]] = images
    if extra is not None:
        # The other three cells of an ungrouped image's composite, in increasing order.
        other = _SLOT_TO_CELL[cells[ungrouped]][:, 1:].flatten()
        owner = composite_of[ungrouped].repeat_interleave(NUM_DISTRACTORS)
        where = torch.stack([owner, other // 2, other % 2]).to(device, non_blocking=True)
        by_cell[where[0], where[1], where[2]] = extra.flatten(0, 1).to(images.dtype)
    return grid
