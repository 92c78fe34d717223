"""The Grad-CAM consistency (GC) loss of Pillai & Pirsiavash (AAAI 2021), Eq. 5."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.attr._elementwise_grad_cam import (
    check_layer_in_model,
    elementwise_grad_cam,
    grad_cam,
)
from captum_consistency.composition import _compose_checked_cells, compose_grid
from captum_consistency.saliency import DEFAULT_EPS, normalize_saliency

__all__ = ["GradCamConsistencyLoss", "ConsistencyLossOutput", "LayerRecorder"]


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

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {type(module).__name__} must return a single tensor, got {type(output).__name__}"
            )
        self._outputs.append(output)

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
        composite_saliency: ``(N, 1, 2h, 2w)`` normalised map of the composites (detached).

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

    Args:
        model (torch.nn.Module): the classifier (may be wrapped in ``DistributedDataParallel``).
        layer (torch.nn.Module): the Grad-CAM layer inside ``model`` (``layer4`` for ResNets).
        lam (float): weight ``lambda`` of the consistency term (25 for ImageNet, 1 for COCO).
        criterion (Callable, optional): classification loss ``criterion(logits, targets)``;
            cross-entropy by default. Multi-label users pass e.g. a scaled BCE-with-logits and
            ``gradcam_targets``.
        elementwise (bool): element-wise Grad-CAM (Eq. 3); ``False`` uses standard Grad-CAM
            (spatially averaged gradients, the same map as Captum's ``LayerGradCam``).
        detach_target (bool): stop the gradient through the single image's map.
        eps (float): normaliser ``m / (m.sum() + eps)``.
        generator (torch.Generator, optional): source of the random cells.

    Examples::

        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
        >>> out = loss_fn(images, labels, distractors)   # distractors: (N, 3, C, H, W)
        >>> out.loss.backward()
        >>> out.classification.item(), out.consistency.item()
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        lam: float = 25.0,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        elementwise: bool = True,
        detach_target: bool = False,
        eps: float = DEFAULT_EPS,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_layer_in_model(model, layer)
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        # Plain attributes, not submodules: the loss must not re-register the model's parameters.
        self.__dict__["model"] = model
        self.__dict__["layer"] = layer
        self.lam = float(lam)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.elementwise = elementwise
        self.detach_target = detach_target
        self.eps = eps
        self.generator = generator
        self._checked_on_device = False

    def _check_inputs(self, images: Tensor, targets: Tensor, gradcam_targets: Optional[Tensor]):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
            )
        n = images.shape[0]
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
        ):
            raise ValueError(
                f"gradcam_targets must be an integer tensor of shape ({n},), got "
                f"{getattr(gradcam_targets, 'shape', type(gradcam_targets))} "
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
        distractors: Tensor,
        cells: Optional[Tensor] = None,
        gradcam_targets: Optional[Tensor] = None,
    ) -> ConsistencyLossOutput:
        """Computes the GC loss of a batch.

        Args:
            images (Tensor): ``(N, C, H, W)`` training images.
            targets (Tensor): ``(N,)`` class indices, or what ``criterion`` expects.
            distractors (Tensor): ``(N, 3, C, H, W)`` images whose labels exclude the class.
            cells (Tensor, optional): ``(N,)`` cells in {0, 1, 2, 3}; random when ``None``.
            gradcam_targets (Tensor, optional): ``(N,)`` class whose map is regularised;
                defaults to ``targets`` when it is 1-D. Its range is checked at every call on
                the CPU, and at the first call only on an accelerator (a check there is a
                host-device synchronisation).

        Returns:
            ConsistencyLossOutput: ``.loss``, ``.classification``, ``.consistency``,
            ``.logits``, ``.cells`` and the normalised maps.
        """
        gradcam_targets = self._check_inputs(images, targets, gradcam_targets)
        composite, cells = compose_grid(
            images, distractors, cells=cells, generator=self.generator, return_cells=True
        )
        with LayerRecorder(self.layer) as recorder:
            logits = self.model(images)
            acts_x = recorder.pop()
            logits_c = self.model(composite)
            acts_c = recorder.pop()
        if logits.dim() != 2:
            raise ValueError(f"the model must return (N, num_classes) logits, got {tuple(logits.shape)}")
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
        g_x = normalize_saliency(map_x, self.eps)
        g_c = normalize_saliency(map_c, self.eps)
        target = _compose_checked_cells(g_x, None, cells)  # Eq. 4: zero-padded into cell k
        consistency = (g_c - target).abs().mean()
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
        )
