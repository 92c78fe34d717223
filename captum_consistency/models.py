"""Models and model changes: the paper's GMP ResNet, batch-norm folding, a small CPU ResNet.

* :func:`to_global_max_pool` -- the paper's architecture change (global max pooling).
* :func:`fold_batch_norm` -- batch norm folded into the convolutions, for evaluation.
* :class:`SmallResNet` -- a narrow torchvision ResNet with a CIFAR-style stem, the model of
  ``recipes/quickstart.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter, OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, ResNet

from captum_consistency._warnings import CaptumConsistencyWarning

__all__ = ["to_global_max_pool", "fold_batch_norm", "SmallResNet"]


def _is_global_avg_pool(module: Optional[nn.Module]) -> bool:
    if not isinstance(module, nn.AdaptiveAvgPool2d):
        return False
    size = module.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size == (1, 1)


def to_global_max_pool(model: nn.Module) -> nn.Module:
    r"""Replaces the global average pooling before the classifier with global max pooling.

    The "GMP" model of the paper (Pillai & Pirsiavash, AAAI 2021, Sec. 3): global average
    pooling spreads a decision over the whole image, the spatial analogue of Grad-CAM's gradient
    averaging; ``AdaptiveMaxPool2d(1)`` makes the model collect evidence from selective
    locations and gives sharper element-wise Grad-CAM maps. The head's ``AdaptiveAvgPool2d``
    with a 1x1 output is replaced in place: ``model.avgpool`` when it is one (torchvision
    ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet), else the last such module outside a
    squeeze-and-excitation block (whose pooling is channel attention, not the head's): for timm's
    ResNet, ConvNeXt, EfficientNet and RegNet, the ``pool`` of the head's
    ``SelectAdaptivePool2d`` (its ``pool_type`` becomes ``"max"``). Pooling
    has no parameters, so the state dict is unchanged and torchvision weights still load.

    Args:
        model (torch.nn.Module): e.g. ``torchvision.models.resnet50()`` or ``convnext_tiny()``.

    Returns:
        The same model object, modified in place.

    Raises:
        ValueError: the model has no global average pooling module to replace: VGG and AlexNet
            pool to 7x7 / 6x6 before their classifier, DenseNet and MobileNetV2 pool with
            ``F.adaptive_avg_pool2d`` inside ``forward()``, a ViT classifies its class token.

    Examples::

        >>> model = to_global_max_pool(torchvision.models.resnet18(num_classes=10))
        >>> model.avgpool
        AdaptiveMaxPool2d(output_size=1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torchvision.ops import SqueezeExcitation

    if _is_global_avg_pool(getattr(model, "avgpool", None)):
        model.avgpool = nn.AdaptiveMaxPool2d(1)
        return model
    found: List[Tuple[nn.Module, str]] = []
    for parent in model.modules():
        if isinstance(parent, SqueezeExcitation):
            continue
        for name, child in parent.named_children():
            if _is_global_avg_pool(child):
                found.append((parent, name))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no global average pooling module (nn.AdaptiveAvgPool2d "
            "to 1x1) before its classifier to replace (VGG and AlexNet pool to 7x7 / 6x6, "
            "DenseNet and MobileNetV2 pool with F.adaptive_avg_pool2d inside forward(), a ViT "
            "classifies its class token)"
        )
    parent, name = found[-1]  # the one closest to the classifier in module order
    setattr(parent, name, nn.AdaptiveMaxPool2d(1))
    if getattr(parent, "pool_type", None) == "avg":  # timm's SelectAdaptivePool2d says what it pools
        parent.pool_type = "max"
    return model


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    r"""Folds every eval-mode batch norm that directly follows a convolution into it, in place.

    In eval mode a batch norm is the affine map ``gamma (x - mu) / sqrt(var + eps) + beta``;
    after a convolution it folds into the convolution's weight and bias
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`) and becomes ``nn.Identity``. The network
    computes the same function (to float rounding), so every activation, Grad-CAM and
    element-wise Grad-CAM map at a block output such as ``layer4``, and every prediction are
    unchanged, while the forward pass no longer reads and writes each activation once more for
    the normalisation (see docs/benchmarks.md). Module names and
    nesting are kept: ``model.layer4`` is the same object and hooks on it still fire. The
    folded convolutions and batch norms themselves are replaced by new modules, so take
    references to *those* (for hooks or attribution layers) after folding.

    Use it for evaluation only. Attributions that give the batch norm's bias a role of its own
    (FullGrad's bias terms, excitation backprop's per-layer rules) are *not* invariant to
    folding; the evaluation recipe folds only for the Grad-CAM methods.

    Unlike :func:`torch.fx.experimental.optimization.fuse`, which returns a new
    ``GraphModule`` without the model's submodules, this keeps the model object, so the Grad-CAM
    layer of the evaluation (and any hook on it) is still there. The pairs are found with
    :func:`torch.fx.symbolic_trace`: a batch norm is folded when its
    input is the output of a convolution called once, used by nothing else, and the batch
    norm keeps running statistics. A model that cannot be traced is returned unchanged, with a
    warning.

    Args:
        model (torch.nn.Module): a model in eval mode (e.g. a torchvision ResNet, VGG-BN).

    Returns:
        The same model object, modified in place.

    Raises:
        ValueError: one of the model's convolutions or batch norms is in training mode, where
            batch norm uses batch statistics and cannot be folded.

    Examples::

        >>> model = fold_batch_norm(torchvision.models.resnet18().eval())
        >>> model.bn1
        Identity()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [n or type(model).__name__ for n, m in model.named_modules()
                if isinstance(m, _BATCH_NORMS + _CONVS) and m.training]
    if training:
        raise ValueError(
            f"fold_batch_norm needs a model in eval mode; {training[0]} is in training mode "
            "(call model.eval() first)"
        )
    try:
        with _hooks_set_aside(model):  # tracing would call the caller's hooks with fx proxies
            graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 -- any tracing failure: leave the model as it is
        warnings.warn(f"fold_batch_norm: {type(model).__name__} cannot be traced by torch.fx "
                      f"({type(error).__name__}: {error}); no batch norm folded",
                      CaptumConsistencyWarning, stacklevel=2)
        return model
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: List[Tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BATCH_NORMS):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node) and source.op == "call_module"
            and isinstance(modules[source.target], _CONVS)
            and len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1
            and modules[node.target].track_running_stats
            and modules[node.target].running_mean is not None
        ):
            pairs.append((source.target, node.target))
    for conv_name, bn_name in pairs:
        fused = fuse_conv_bn_eval(modules[conv_name], modules[bn_name])
        _set_submodule(model, conv_name, fused)
        _set_submodule(model, bn_name, nn.Identity())
    return model


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
)


@contextlib.contextmanager
def _hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """Empties the forward hooks of every submodule for the duration, then puts them back."""
    saved = []
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved.append((module, attr, hooks))
                setattr(module, attr, OrderedDict())
    try:
        yield
    finally:
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class SmallResNet(ResNet):
    r"""A narrow torchvision ResNet with a CIFAR-style stem, for small images on a CPU.

    It is :class:`torchvision.models.ResNet` itself (same ``forward``, ``BasicBlock`` stages
    ``layer1`` .. ``layer4`` of strides 1, 2, 2, 2, global average pooling ``avgpool`` and the
    linear ``fc``), built by torchvision's constructor, with two changes that the constructor
    does not expose:

    * the stem is ``conv1`` = 3x3 convolution, stride 1 (no 7x7 stride-2 convolution and no max
      pooling), as for CIFAR: the total stride is 8 instead of 32, so a ``S x S`` image gives a
      ``S/8 x S/8`` map at ``layer4`` (4x4 at 32 px) instead of a 1x1 one;
    * the stage widths are ``widths`` instead of 64, 128, 256, 512 (the cost of a step scales
      with the square of the width).

    So ``layer4`` keeps a usable Grad-CAM resolution and a training step costs a few
    milliseconds on a CPU; :func:`to_global_max_pool` turns it into the paper's GMP model, and
    every tool that expects a ResNet (``model.layer4``) works unchanged.

    Args:
        num_classes (int): size of the classifier's output, at least 2.
        widths (sequence of 4 int): channels of ``layer1`` .. ``layer4``. Default
            ``(16, 32, 64, 128)``.
        layers (sequence of 4 int): ``BasicBlock`` s per stage. Default ``(1, 1, 1, 1)``
            (a ResNet-10).

    Attributes:
        stride (int): total stride of ``layer4`` (8).

    Examples::

        >>> model = SmallResNet(num_classes=4)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 4])
        >>> to_global_max_pool(model).avgpool        # the paper's GMP variant
        AdaptiveMaxPool2d(output_size=1)
    """

    stride: int = 8

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        widths, layers = tuple(widths), tuple(layers)
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
        if len(layers) != 4 or any(not isinstance(b, int) or b < 1 for b in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers!r}")
        # torchvision's ResNet with these blocks, whose stem and stages are replaced below. Its
        # own modules are built without drawing from the global RNG, so that a seed gives the
        # weights it gives a model built with only the modules that stay.
        with torch.random.fork_rng(devices=[]):
            super().__init__(BasicBlock, list(layers), num_classes=num_classes)
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # torchvision's initialisation of the new modules
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
