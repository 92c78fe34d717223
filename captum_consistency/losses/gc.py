"""The Grad-CAM consistency (GC) loss of Pillai & Pirsiavash (AAAI 2021), Eq. 5."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.attr._elementwise_grad_cam import elementwise_grad_cam, grad_cam
from captum_consistency.attr._layers import check_layer_in_model
from captum_consistency.attr._recording import LayerRecorder, score_gradients
from captum_consistency.composition import NUM_CELLS, compose_grid
from captum_consistency.losses._shared_composites import Distractors, _resolve, _SharedComposites
from captum_consistency.losses.functional import gc_consistency
from captum_consistency.saliency import DEFAULT_EPS

__all__ = ["GradCamConsistencyLoss", "ConsistencyLossOutput"]

#: The values of ``GradCamConsistencyLoss(composites=...)``.
COMPOSITE_MODES = ("per-image", "shared")


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


class GradCamConsistencyLoss(_SharedComposites, nn.Module):
    r"""Cross-entropy plus Grad-CAM consistency between an image and its 2x2 composite.

    From Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021.
    Each image ``x`` of class ``y`` is placed in a random cell ``k`` of a 2x2 grid with three
    distractors whose labels exclude ``y``, giving the composite ``c``. With ``g^y`` the
    element-wise Grad-CAM (Eq. 3) of class ``y`` at ``layer``, normalised to sum 1,

    .. math::

        \mathcal{L} = \ell(f(x), y) + \lambda\,
        \big\| g^y_c - \mathrm{comp}(k, g^y_x, 0, 0, 0) \big\|_1

    (Eqs. 4-5), the L1 term being the mean over the composite map's locations, as the authors
    compute it: :func:`~captum_consistency.gc_consistency` of the two maps. The map is at feature resolution: for ResNets the composite's map is exactly
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
        output_transform (Callable, optional): picks the ``(N, num_classes)`` logits from what
            the model returns, for a model whose forward returns a tuple or a dict (e.g.
            ``lambda out: out["logits"]``), as pytorch-grad-cam's targets do.

    **Inputs the loss refuses** (each with an error that names the problem): images that are
    not floating point (``uint8`` images: convert and normalise them first); on the CPU, images
    or distractors holding NaN or infinity (on an accelerator this check would cost a
    host-device synchronisation per step, so there the non-finite value propagates to
    ``loss`` and :func:`~captum_consistency.engine.train_one_epoch` stops with a
    ``FloatingPointError`` naming the first non-finite step); a call under ``torch.no_grad()``
    or ``torch.inference_mode()`` (Grad-CAM is a gradient); a model whose every parameter is
    frozen; a ``layer`` whose output is not a spatial ``(N, C, H, W)`` map (the final
    ``Linear``, the pooling, the whole model); a model compiled as a whole with
    ``torch.compile`` (compile the modules before ``layer`` instead, see below); ``lam``
    beyond float32's range. A frozen backbone with a trainable head works: the layer's
    activations are made to require grad, so the head's gradients (classification and
    consistency) are those of a model whose backbone is a constant.

    **torch.compile.** The loss records ``layer``'s output with a forward hook, which a model
    compiled as a whole does not run as a separate module, so such a model is refused.
    Compile the parts before the layer in place instead, e.g. for a ResNet
    ``for name in ("conv1", "bn1", "layer1", "layer2", "layer3"): getattr(model, name).compile()``;
    the layer and the head (through which the loss backpropagates twice) stay eager.

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
        output_transform: Optional[Callable[[object], Tensor]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _refuse_compiled(model)
        check_layer_in_model(model, layer)
        if output_transform is not None and not callable(output_transform):
            raise TypeError(f"output_transform must be callable, got {type(output_transform).__name__}")
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
        self.output_transform = output_transform
        self._checked_on_device = False
        self._checked_groups_on_device = False

    def _check_inputs(self, images: Tensor, targets: Tensor, gradcam_targets: Optional[Tensor]):
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "GradCamConsistencyLoss needs gradients (Grad-CAM is the gradient of a class score) "
                "but gradient recording is off: it was called under torch.no_grad() or "
                "torch.inference_mode(); call it with gradients enabled (torch.enable_grad())"
            )
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "every parameter of the model is frozen (requires_grad=False): the GC loss would "
                "train nothing; unfreeze at least the head (model.fc.requires_grad_(True))"
            )
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a floating-point tensor, got {images.dtype}: convert and normalise "
                "them as the model expects (e.g. images.float() / 255, then the mean and std)"
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

    def forward(
        self,
        images: Tensor,
        targets: Tensor,
        distractors: Distractors = None,
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
        composite, cells, groups, replicate = self._compose(
            images, targets, gradcam_targets, distractors, cells, groups
        )
        # Every image is in a composite: checking these checks the images and the distractors.
        # Free on the CPU; on an accelerator it would be a host-device sync per step, so there a
        # non-finite pixel propagates to the loss (train_one_epoch stops on it).
        if composite.device.type == "cpu" and not bool(torch.isfinite(composite).all()):
            raise ValueError(
                "the images or their distractors hold non-finite values (NaN or infinity): the "
                "loss and every gradient would be NaN; check the data and its normalisation"
            )
        logits, acts_x, logits_c, acts_c = self._record(images, composite, replicate)
        self._check_classes(gradcam_targets, logits.shape[1])
        classification = self.criterion(logits, targets)
        map_x, map_c = self._maps(
            (logits, logits_c), gradcam_targets, (acts_x, acts_c), images.shape[-2:], composite.shape[-2:]
        )
        # The maps come out of the ReLU of Eq. 3 and the cells were checked when composing:
        # check=False keeps the step free of host-device synchronisations.
        terms = gc_consistency(
            map_x, map_c, cells, self.eps, self.detach_target, reduction="none", return_maps=True, check=False
        )
        consistency = terms.loss.mean()
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
            saliency=terms.saliency,
            composite_saliency=terms.composite_saliency,
            per_image_consistency=terms.loss.detach(),
            groups=groups,
            num_ungrouped=images.shape[0] - NUM_CELLS * groups.shape[0],
        )

    def _compose(
        self,
        images: Tensor,
        targets: Tensor,
        gradcam_targets: Tensor,
        distractors: Distractors,
        cells: Optional[Tensor],
        groups: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Eq. 4 on the images: ``(composites, cells (N,), groups (G, 4), replicate)``."""
        if self.composites == "shared":
            return self._shared_composites(images, targets, gradcam_targets, distractors, cells, groups)
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
        return composite, cells, torch.zeros(0, NUM_CELLS, dtype=torch.long), None

    def _record(
        self, images: Tensor, composite: Tensor, replicate: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Logits and the layer's activations of the images and of the composites: ``(logits,
        acts_x, logits_c, acts_c)``, one row of ``logits_c`` per image."""
        # require_grad: with a frozen backbone the layer's output does not require grad; made a
        # leaf that does, the head's Grad-CAM (a function of the head's weights) stays
        # differentiable and the head trains on both terms.
        with LayerRecorder(self.layer, require_grad=True) as recorder:
            logits = self._logits(self.model(images))
            acts_x = recorder.pop()
            recorder.replicate = replicate
            logits_c = self._logits(self.model(composite))
            acts_c = recorder.pop()
        if acts_x.dim() != 4:
            raise ValueError(
                f"the Grad-CAM layer {type(self.layer).__name__} must output a spatial (N, C, H, W) "
                f"map, got shape {tuple(acts_x.shape)}: pass a convolutional block (a ResNet's "
                "layer4), not the final Linear, a pooling or the whole model"
            )
        if logits.dim() != 2:
            raise ValueError(f"the model must return (N, num_classes) logits, got {tuple(logits.shape)}")
        n = images.shape[0]
        if logits_c.shape[0] != n:
            raise RuntimeError(
                f"the model returned {logits_c.shape[0]} rows for the shared composites instead of "
                f"one per image ({n}): the part after the Grad-CAM layer must keep the batch size of "
                "the layer's output (not the input's)"
            )
        return logits, acts_x, logits_c, acts_c

    def _logits(self, output: object) -> Tensor:
        if self.output_transform is not None:
            output = self.output_transform(output)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the model returned a {type(output).__name__}, not a (N, num_classes) logits tensor: "
                "pass output_transform= to pick the logits (e.g. lambda out: out[0] or "
                "lambda out: out['logits'])"
            )
        return output

    def _check_classes(self, gradcam_targets: Tensor, num_classes: int) -> None:
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

    def _maps(
        self,
        logits: Tuple[Tensor, Tensor],
        gradcam_targets: Tensor,
        activations: Tuple[Tensor, Tensor],
        size: Tuple[int, int],
        composite_size: Tuple[int, int],
    ) -> Tuple[Tensor, Tensor]:
        """Grad-CAM maps (Eq. 3, or Eqs. 1-2) of the images and of the composites.

        One backward for both: in shared mode row ``i`` of the composites' logits comes from
        image ``i``'s own copy of its composite's activations, so its gradient lands on that
        copy only.
        """
        create_graph = self.lam > 0 and torch.is_grad_enabled()
        grads = score_gradients(
            logits, activations, gradcam_targets, create_graph=create_graph, retain_graph=True
        )
        cam = elementwise_grad_cam if self.elementwise else grad_cam
        # float32 maps even under bf16 autocast (the normalised maps are small numbers); the
        # channel sum accumulates in float32, so the full-size tensors are not cast first.
        map_x, map_c = (cam(a, g, relu=True) for a, g in zip(activations, grads))
        (h, w), (hc, wc) = map_x.shape[-2:], map_c.shape[-2:]
        if (hc, wc) != (2 * h, 2 * w):
            # Maps that do not tile exactly (AlexNet's pooled features): compare at pixel size.
            map_x = F.interpolate(map_x, size=size, mode="bilinear", align_corners=False)
            map_c = F.interpolate(map_c, size=composite_size, mode="bilinear", align_corners=False)
        return map_x, map_c


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
    if lam > _FLOAT32_MAX:
        raise ValueError(
            f"lam must be at most float32's largest value {_FLOAT32_MAX:.4g} (the loss is float32: "
            f"lam * consistency would be infinite and the gradients NaN), got {lam!r}"
        )
    return lam


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _refuse_compiled(model: nn.Module) -> None:
    """A model compiled as a whole runs its layers inside one graph, where the loss's forward
    hook on ``layer`` does not see the activations that produced the logits."""
    for m in (model, getattr(model, "module", None)):  # DistributedDataParallel wraps it
        if m is None:
            continue
        if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None:
            raise TypeError(
                "GradCamConsistencyLoss cannot hook the Grad-CAM layer of a model compiled as a "
                "whole with torch.compile: pass the uncompiled model and compile the modules "
                "before the layer in place instead, e.g. for a ResNet "
                "`for name in ('conv1', 'bn1', 'layer1', 'layer2', 'layer3'): "
                "getattr(model, name).compile()`"
            )

