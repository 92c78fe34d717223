"""pytorch-grad-cam's CAMs as saliency maps, and its ``reshape_transform`` for ViTs.

pytorch-grad-cam's CAMs are NumPy arrays ``(N, H, W)`` in ``[0, 1]``;
:class:`PytorchGradCamAttribution` calls the library unchanged and returns them as
``(N, 1, H, W)`` tensors, the input of :mod:`captum_consistency.metrics`, restoring what the
library changes on the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from captum.attr._utils.attribution import Attribution
from torch import Tensor, nn

__all__ = ["PytorchGradCamAttribution", "vit_reshape_transform"]



def vit_reshape_transform(tensor: Tensor, height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
    r"""ViT tokens ``(N, 1 + h w, C)`` -> feature map ``(N, C, h, w)``, the class token dropped.

    pytorch-grad-cam's ``reshape_transform`` convention for vision transformers (its
    ``vit_reshape_transform``): the patch tokens, in raster order, are the map. ``height`` and
    ``width`` default to the square grid of the token count (torchvision's
    ``VisionTransformer`` takes square images only).

    Args:
        tensor (Tensor): ``(N, 1 + h * w, C)`` tokens, the class token first.
        height (int, optional): rows of the patch grid.
        width (int, optional): columns of the patch grid.

    Returns:
        Tensor ``(N, C, h, w)``.

    Raises:
        ValueError: a tensor that is not ``(N, T, C)`` or whose ``T - 1`` patch tokens do not
            form the grid.

    Examples::

        >>> vit_reshape_transform(torch.zeros(2, 1 + 14 * 14, 768)).shape
        torch.Size([2, 768, 14, 14])
    """
    if not isinstance(tensor, Tensor) or tensor.dim() != 3:
        raise ValueError(f"ViT tokens must be (N, 1 + h*w, C), got {getattr(tensor, 'shape', tensor)}")
    patches = tensor.shape[1] - 1
    if height is None or width is None:
        side = math.isqrt(max(patches, 0))
        height, width = height or side, width or side
    if height * width != patches:
        raise ValueError(
            f"{patches} patch tokens (one class token dropped) do not form a {height}x{width} grid"
        )
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform as _library

    return _library(tensor, height=height, width=width)


class PytorchGradCamAttribution(Attribution):
    r"""A pytorch-grad-cam CAM as a saliency map ``(N, 1, H, W)`` at input resolution.

    Calls ``cam_class(model, [layer], reshape_transform=...)`` and then the CAM object on the
    inputs with ``ClassifierOutputTarget(t)`` per sample, exactly as pytorch-grad-cam's README
    does, and returns its array as a tensor with a channel dimension. The values are
    pytorch-grad-cam's own post-processing (``BaseCAM.compute_cam_per_layer`` and
    ``scale_cam_image``): the CAM at the layer's resolution, ReLU'd, min-max scaled per image to
    ``[0, 1]`` and resized to the input with OpenCV's bilinear ``cv2.resize``. The adapter adds
    no computation of its own; it only

    * builds a new CAM object per call and releases its hooks afterwards (pytorch-grad-cam
      keeps forward hooks on the layer for the object's lifetime otherwise);
    * restores what the library changes on the model: the training flags (``BaseCAM`` calls
      ``model.eval()``), the parameters' ``.grad`` (it calls ``model.zero_grad()`` and
      ``backward()``), and, for AblationCAM, the layer it swaps for its ablation layer;
    * runs ``images_per_call`` images per CAM call: ScoreCAM builds all ``K`` masked copies of
      every image of the call at once (``N * K * C * H * W`` floats: about 5 GB for 16 images
      at 224 px with ResNet-18's 512 channels), so it runs one image per call by default. Each
      image's map depends on that image only, so the result does not depend on the split.

    Args:
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)``.
        layer (torch.nn.Module): the target layer.
        cam_class (type): a pytorch-grad-cam ``BaseCAM`` subclass, e.g. ``GradCAM``.
        reshape_transform (Callable, optional): pytorch-grad-cam's ``reshape_transform``
            (``(N, T, C)`` tokens -> ``(N, C, h, w)``), e.g. :func:`vit_reshape_transform`.
        batch_size (int, optional): masked or ablated images per forward pass (ScoreCAM: 16,
            AblationCAM: 32 by default, the library's defaults); lower it to save memory.
        images_per_call (int, optional): images per CAM call; ``None``: all (ScoreCAM: 1).
        cam_kwargs (dict, optional): further constructor arguments (AblationCAM's
            ``ratio_channels_to_ablate``).
        call_kwargs (dict, optional): arguments of the CAM call (``aug_smooth``,
            ``eigen_smooth``).

    Examples::

        >>> from pytorch_grad_cam import GradCAMPlusPlus
        >>> cam = PytorchGradCamAttribution(model, model.layer4, GradCAMPlusPlus)
        >>> cam.attribute(images, target=labels).shape       # (N, 1, H, W) in [0, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        cam_class: type,
        reshape_transform: Optional[Callable[[Tensor], Tensor]] = None,
        batch_size: Optional[int] = None,
        images_per_call: Optional[int] = None,
        cam_kwargs: Optional[Dict[str, Any]] = None,
        call_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.base_cam import BaseCAM

        if not (isinstance(cam_class, type) and issubclass(cam_class, BaseCAM)):
            raise TypeError(f"cam_class must be a pytorch-grad-cam BaseCAM subclass, got {cam_class!r}")
        for argname, value in (("batch_size", batch_size), ("images_per_call", images_per_call)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{argname} must be a positive int, got {value!r}")
        Attribution.__init__(self, model)
        self.model = model
        self.layer = layer
        self.cam_class = cam_class
        self.reshape_transform = reshape_transform
        self.batch_size = batch_size
        if images_per_call is None and issubclass(cam_class, ScoreCAM):
            images_per_call = 1
        self.images_per_call = images_per_call
        self.cam_kwargs = dict(cam_kwargs or {})
        self.call_kwargs = dict(call_kwargs or {})

    def _new_cam(self):
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

        kwargs = dict(self.cam_kwargs)
        if issubclass(self.cam_class, AblationCAM):
            # A new ablation layer per object: the library's default argument is one shared
            # instance, which keeps the state of the last call.
            kwargs.setdefault(
                "ablation_layer", AblationLayerVit() if self.reshape_transform else AblationLayer()
            )
            if self.batch_size is not None:
                kwargs["batch_size"] = self.batch_size
        cam = self.cam_class(self.model, [self.layer], reshape_transform=self.reshape_transform, **kwargs)
        if issubclass(self.cam_class, ScoreCAM) and self.batch_size is not None:
            cam.batch_size = self.batch_size  # read by ScoreCAM.get_cam_weights
        return cam

    def attribute(self, inputs: Tensor, target: Any = None,  # type: ignore[override]
                  additional_forward_args: Optional[object] = None) -> Tensor:
        r"""pytorch-grad-cam's map of ``target`` for ``inputs``.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class (pytorch-grad-cam's default).
            additional_forward_args: not supported (pytorch-grad-cam calls ``model(inputs)``).

        Returns:
            Tensor ``(N, 1, H, W)`` float32 in ``[0, 1]`` on ``inputs.device`` (NaN where the
            library returned NaN).

        Raises:
            ValueError: ``additional_forward_args`` given, or inputs that are not images.
        """
        from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if additional_forward_args is not None:
            raise ValueError(
                "pytorch-grad-cam calls model(inputs) only: additional_forward_args are not "
                "supported by the pgc: methods"
            )
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be (N, C, H, W) images, got {getattr(inputs, 'shape', inputs)}")
        n = inputs.shape[0]
        classes: Optional[List[int]] = None
        if target is not None:
            t = torch.as_tensor(target).reshape(-1)
            classes = [int(c) for c in (t.expand(n) if t.numel() == 1 else t).tolist()]
            if len(classes) != n:
                raise ValueError(f"target has {len(classes)} entries for a batch of {n}")
        step = self.images_per_call or max(n, 1)
        training = {m: m.training for m in self.model.modules()}
        grads = [(p, p.grad) for p in self.model.parameters()]
        maps = []
        try:
            with torch.enable_grad():
                for start in range(0, n, step):
                    chunk = inputs[start:start + step].detach()
                    targets = None if classes is None else [
                        ClassifierOutputTarget(c) for c in classes[start:start + step]
                    ]
                    cam = self._new_cam()
                    try:
                        out = cam(chunk, targets, **self.call_kwargs)
                    finally:
                        cam.activations_and_grads.release()
                        ablation = getattr(cam, "ablation_layer", None)
                        if ablation is not None and any(m is ablation for m in self.model.modules()):
                            replace_layer_recursive(self.model, ablation, self.layer)
                    maps.append(torch.from_numpy(out).float())
        finally:
            for module, flag in training.items():
                module.training = flag
            for p, g in grads:
                p.grad = g
        if not maps:
            return inputs.new_zeros((0, 1) + tuple(inputs.shape[-2:]))
        return torch.cat(maps).unsqueeze(1).to(inputs.device)
