"""One registry of saliency methods configured per architecture, for recipes and metrics loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.gradient import _forward_layer_eval
from captum.attr import LayerGradCam
from torch import Tensor, nn
from torchvision.models import VGG, AlexNet, ResNet

from captum_consistency.attr._elementwise_grad_cam import LayerElementwiseGradCam
from captum_consistency.attr._excitation_backprop import (
    ContrastiveExcitationBackprop,
    _target_tensor,
    resolve_layer,
)
from captum_consistency.attr._fullgrad import FullGrad

__all__ = ["get_attribution", "available_attributions", "default_layers", "SaliencyMethod", "ARCHITECTURES"]

#: Method names accepted by :func:`get_attribution`.
METHODS = ("gradcam", "elementwise-gradcam", "cmwp", "fullgrad")
#: Architecture families with a default configuration.
ARCHITECTURES = ("resnet", "vgg", "alexnet")


def available_attributions() -> List[str]:
    """The method names accepted by :func:`get_attribution`.

    Returns:
        list of str: ``["gradcam", "elementwise-gradcam", "cmwp", "fullgrad"]``.

    Examples::

        >>> for name in available_attributions():
        ...     saliency = get_attribution(name, model).attribute(images, labels)
    """
    return list(METHODS)


def _detect_arch(model: nn.Module) -> str:
    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, VGG):
        return "vgg"
    if isinstance(model, AlexNet):
        return "alexnet"
    raise ValueError(
        f"no default layers for {type(model).__name__}; get_attribution knows torchvision "
        f"{', '.join(ARCHITECTURES)} models: pass arch=... for a model with the same module names, "
        "or the layers explicitly (layer=, contrast_layer=, classifier_layer=)"
    )


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _last(model: nn.Module, container: str, kind: type, from_end: int = 1) -> str:
    """Name of the ``from_end``-th last module of type ``kind`` inside ``model.<container>``."""
    parent = resolve_layer(model, container, container)
    found = [name for name, m in parent.named_modules() if isinstance(m, kind)]
    if len(found) < from_end:
        raise ValueError(f"{container} has fewer than {from_end} {kind.__name__} modules")
    return f"{container}.{found[-from_end]}"


def default_layers(model: nn.Module, arch: str) -> Dict[str, str]:
    r"""The layers of the paper's protocol (and TorchRay's benchmark) for each architecture.

    - ``resnet``: Grad-CAM at ``layer4``; cMWP saliency at ``layer3``, contrast at ``avgpool``
      (the pooled features), classifier ``fc``.
    - ``vgg``: Grad-CAM at the last ReLU of ``features`` (relu5, before pool5); cMWP saliency
      at pool4 (the second-to-last max pool of ``features``), contrast at relu7 (the last ReLU
      of ``classifier``), classifier its last ``Linear``.
    - ``alexnet``: Grad-CAM at ``features`` (conv5 after its ReLU and pool5, 6x6 at 224 px:
      the layer the GC loss regularises in the authors' code and in
      :func:`captum_consistency.builders.gradcam_layer`, so training and evaluation agree);
      cMWP saliency at pool2 (the second-to-last max pool, before conv3-5, as pool4 is for
      VGG), contrast at relu7, classifier the last ``Linear``.

    For VGG-16 these are ``features.29``, ``features.23``, ``classifier.4`` and
    ``classifier.6``, the layers of TorchRay's pointing-game benchmark; for AlexNet
    ``features``, ``features.5``, ``classifier.5`` and ``classifier.6``. With global max
    pooling (``to_global_max_pool``) the ResNet's ``avgpool`` is the max pool, which cMWP
    passes with its ordinary gradient.

    Args:
        model (torch.nn.Module): the model (module names are read from it).
        arch (str): ``"resnet"``, ``"vgg"`` or ``"alexnet"``.

    Returns:
        dict with the names of ``layer`` (Grad-CAM), ``saliency_layer``, ``contrast_layer`` and
        ``classifier_layer`` (cMWP).

    Examples::

        >>> default_layers(torchvision.models.vgg16(), "vgg")["saliency_layer"]
        'features.23'
    """
    if arch == "resnet":
        return {
            "layer": "layer4",
            "saliency_layer": "layer3",
            "contrast_layer": "avgpool",
            "classifier_layer": "fc",
        }
    if arch in ("vgg", "alexnet"):
        return {
            "layer": "features" if arch == "alexnet" else _last(model, "features", nn.ReLU),
            "saliency_layer": _last(model, "features", nn.MaxPool2d, from_end=2),
            "contrast_layer": _last(model, "classifier", nn.ReLU),
            "classifier_layer": _last(model, "classifier", nn.Linear),
        }
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def _num_classes(classifier: nn.Module) -> Optional[int]:
    if isinstance(classifier, nn.Linear):
        return classifier.out_features
    if isinstance(classifier, nn.modules.conv._ConvNd):
        return classifier.out_channels
    return None


@dataclass
class SaliencyMethod:
    r"""A configured saliency method with the uniform call ``attribute(inputs, target)``.

    Attributes:
        name (str): the registry name (``"gradcam"``, ``"elementwise-gradcam"``, ``"cmwp"``,
            ``"fullgrad"``).
        arch (str): the architecture family whose defaults were used.
        model (torch.nn.Module): the model.
        method: the underlying Captum-style attribution object (``LayerGradCam``,
            ``LayerElementwiseGradCam``, ``ContrastiveExcitationBackprop`` or ``FullGrad``).
        layers (dict[str, str]): the layers it uses, by role.
        num_classes (int, optional): the classifier's output size, used to validate targets.

    Examples::

        >>> cmwp = get_attribution("cmwp", torchvision.models.resnet50().eval())
        >>> cmwp.layers
        {'layer': 'layer3', 'contrast_layer': 'avgpool', 'classifier_layer': 'fc'}
        >>> saliency = cmwp(images, target=labels)  # (N, 1, h, w), same as .attribute
    """


    name: str
    arch: str
    model: nn.Module
    method: Any
    layers: Dict[str, str]
    num_classes: Optional[int]

    def attribute(
        self,
        inputs: Tensor,
        target: Union[None, int, Sequence[int], Tensor] = None,
        additional_forward_args: Optional[object] = None,
    ) -> Tensor:
        r"""Non-negative saliency ``(N, 1, h, w)`` of ``target`` for images ``(N, C, H, W)``.

        ``h, w`` is the resolution of the method's layer (Grad-CAM: e.g. 7x7 for a ResNet at
        224; cMWP: e.g. 14x14) or the input's (FullGrad); upsample with
        :meth:`captum.attr.LayerAttribution.interpolate` to compare methods.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images, normalised as the model expects.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class.
            additional_forward_args (Any, optional): extra arguments for the model.

        Returns:
            Tensor ``(N, 1, h, w)``, detached, ``>= 0``; empty maps ``(0, 1, h, w)`` for an
            empty batch.

        Raises:
            ValueError: a target outside ``[0, num_classes)``.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be a tensor (N, C, H, W), got {getattr(inputs, 'shape', inputs)!r}")
        n = inputs.shape[0]
        if target is None:
            if self.name in ("gradcam", "elementwise-gradcam"):
                # Captum needs explicit targets: explain the predicted class
                with torch.no_grad():
                    target = self.model(inputs, *(_as_tuple(additional_forward_args))).argmax(1)
        if target is not None:
            target = _target_tensor(target, n, inputs.device)
            if self.num_classes is not None:
                bad = (target < 0) | (target >= self.num_classes)
                if bool(bad.any()):
                    raise ValueError(
                        f"target {target[bad].tolist()} outside the classifier's range "
                        f"[0, {self.num_classes})"
                    )
        if n == 0 and self.name == "gradcam":
            # Captum's LayerGradCam indexes the first sample; the layer's output gives the shape.
            (acts,) = _forward_layer_eval(
                self.model, inputs, self.method.layer, additional_forward_args
            )
            return acts.new_zeros((0, 1) + tuple(acts.shape[2:])).detach()
        if self.name in ("gradcam", "elementwise-gradcam"):
            out = self.method.attribute(
                inputs, target=target, additional_forward_args=additional_forward_args,
                relu_attributions=True,
            )
        else:
            out = self.method.attribute(inputs, target=target, additional_forward_args=additional_forward_args)
        return out.detach()

    __call__ = attribute


def _as_tuple(args: Optional[object]) -> Tuple[Any, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def get_attribution(
    name: str,
    model: nn.Module,
    *,
    arch: Optional[str] = None,
    layer: Union[None, str, nn.Module] = None,
    contrast_layer: Union[None, str, nn.Module] = None,
    classifier_layer: Union[None, str, nn.Module] = None,
) -> SaliencyMethod:
    r"""A saliency method by name, configured for a torchvision ResNet, VGG or AlexNet.

    - ``"gradcam"``: Captum's :class:`~captum.attr.LayerGradCam` with
      ``relu_attributions=True`` (Selvaraju et al. 2017);
    - ``"elementwise-gradcam"``: :class:`~captum_consistency.attr.LayerElementwiseGradCam` with
      ``relu_attributions=True`` (the paper's Eq. 3);
    - ``"cmwp"``: :class:`~captum_consistency.attr.ContrastiveExcitationBackprop`
      (Zhang et al. 2016);
    - ``"fullgrad"``: :class:`~captum_consistency.attr.FullGrad` (Srinivas and Fleuret 2019).

    The layers are those of :func:`default_layers` (ResNet: Grad-CAM at ``layer4``, cMWP at
    ``layer3`` with the contrast at ``avgpool``; VGG/AlexNet: Grad-CAM at the last ReLU of
    ``features``, cMWP at the pool before the last conv group with the contrast at relu7), and
    can be overridden. Every method returns a non-negative ``(N, 1, h, w)`` map from
    ``attribute(inputs, target)``; put the model in eval mode first.

    Args:
        name (str): one of ``"gradcam"``, ``"elementwise-gradcam"``, ``"cmwp"``, ``"fullgrad"``
            (case-insensitive; ``_`` and ``-`` are interchangeable).
        model (torch.nn.Module): a torchvision ``ResNet``, ``VGG`` or ``AlexNet`` (or a model
            with the same module names, with ``arch=``).
        arch (str, optional): ``"resnet"``, ``"vgg"`` or ``"alexnet"``; ``None``: detected from
            the model's class.
        layer (str or torch.nn.Module, optional): Grad-CAM layer, or cMWP saliency layer.
        contrast_layer (str or torch.nn.Module, optional): cMWP contrast layer.
        classifier_layer (str or torch.nn.Module, optional): cMWP classifier layer.

    Returns:
        :class:`SaliencyMethod`.

    Raises:
        ValueError: an unknown name or architecture (the message lists the valid ones), or a
            layer that is not in the model.

    Examples::

        >>> model = torchvision.models.resnet18(num_classes=80).eval()
        >>> for name in available_attributions():
        ...     sal = get_attribution(name, model).attribute(images, labels)  # (N, 1, h, w)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown attribution {name!r}; valid: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if arch is None:
        arch = _detect_arch(model)
    elif arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    defaults = default_layers(model, arch)
    classifier = resolve_layer(model, classifier_layer or defaults["classifier_layer"], "classifier_layer")
    num_classes = _num_classes(classifier)

    def named(value: Union[None, str, nn.Module], default: str, argname: str) -> Tuple[nn.Module, str]:
        module = resolve_layer(model, value if value is not None else default, argname)
        return module, _name_of(model, module)

    if key in ("gradcam", "elementwise-gradcam"):
        module, layer_name = named(layer, defaults["layer"], "layer")
        cls = LayerGradCam if key == "gradcam" else LayerElementwiseGradCam
        method: Any = cls(model, module)
        layers = {"layer": layer_name}
    elif key == "cmwp":
        module, layer_name = named(layer, defaults["saliency_layer"], "layer")
        contrast, contrast_name = named(contrast_layer, defaults["contrast_layer"], "contrast_layer")
        method = ContrastiveExcitationBackprop(model, module, contrast, classifier)
        layers = {
            "layer": layer_name,
            "contrast_layer": contrast_name,
            "classifier_layer": _name_of(model, classifier),
        }
    else:
        method = FullGrad(model)
        layers = {}
    return SaliencyMethod(key, arch, model, method, layers, num_classes)
