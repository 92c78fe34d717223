"""Contrastive excitation backprop (contrastive marginal winning probability, cMWP), Captum style.

Zhang, Lin, Brandt, Shen and Sclaroff, "Top-down Neural Attention by Excitation Backprop",
ECCV 2016 (https://arxiv.org/abs/1608.00507). The excitation rules follow the authors' Caffe
code and TorchRay's ``contrastive_excitation_backprop``, which this implementation matches
numerically (see ``tests/test_excitation_backprop.py``), but they are installed with module
forward hooks and custom autograd functions that live only for one ``attribute`` call: nothing
in ``torch.nn.functional`` is patched, so other threads and other models are unaffected.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from captum._utils.common import _format_additional_forward_args, _format_tensor_into_tuples
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.resnet import Bottleneck

from captum_consistency.attr._excitation_rules import (
    _EXCITATION_LINEAR,
    _EXCITATION_POOL,
    _ORDINARY,
    _PASS_THROUGH,
    _RESIDUAL_BLOCKS,
    EXCITATION_EPS,
    _Excitation,
    _PassThrough,
    _positive_forward,
    _ResidualSum,
    find_classifier_layer,
)
from captum_consistency.attr._layers import (
    Inputs,
    Target,
    _class_index,
    _FrozenParameters,
    _target_tensor,  # imported from here by the registry
    resolve_layer,
)

__all__ = ["ContrastiveExcitationBackprop", "resolve_layer", "find_classifier_layer"]


class ContrastiveExcitationBackprop(LayerAttribution, GradientAttribution):
    r"""Contrastive excitation backprop: the contrastive marginal winning probability (cMWP).

    Excitation backprop (Zhang et al., "Top-down Neural Attention by Excitation Backprop",
    ECCV 2016) propagates a top-down signal only along *excitatory* connections. For a layer
    ``y = f(x, w)`` (convolution, linear, average pooling), with the output signal ``p``:

    .. math::

        p'_j = x_j \sum_i \frac{w^+_{ij}}{\sum_k w^+_{ik} x_k + \epsilon} p_i,
        \qquad w^+ = \max(w, 0),

    i.e. ``p' = x * f^*(w+, p / f(x, w+))`` with ``f^*`` the layer's ordinary backward, the bias
    dropped and ``epsilon = 1e-20``. Batch norm passes the signal through unchanged; ReLU and max
    pooling use their ordinary gradient. The *contrastive* variant runs the pass a second time
    with the classifier weights negated (the "dual" unit, which fires for every class but the
    target), stops it at ``contrast_layer`` and subtracts it there:

    .. math::

        \mathrm{cMWP} = \max\Big(0, \sum_c \big(\mathrm{MWP}_t - \mathrm{MWP}_{\bar t}\big)_c\Big)
        \text{ at } \texttt{layer}.

    **Implementation.** One forward pass; the rules are installed with forward hooks that wrap
    the outputs of the layers *after* ``layer`` in custom autograd functions (the layers before
    it run untouched, with no graph), and removed afterwards. The classifier's two excitation
    passes (``w+`` and ``(-w)+``) are evaluated directly at its input, the contrast is
    backpropagated from there to ``contrast_layer``, then the target signal is backpropagated to
    ``layer`` with the contrast subtracted at ``contrast_layer``. All of it is batched, with one
    target per sample. In-place ReLUs are fine. The model is put in eval mode with its
    parameters' ``requires_grad`` off during the call; both are restored afterwards.

    **Residual blocks.** torchvision's :class:`~torchvision.models.resnet.BasicBlock` and
    :class:`~torchvision.models.resnet.Bottleneck` add the shortcut in place inside their
    ``forward`` (``out += identity; out = relu(out)``), where no module hook can see it. A hook
    on the block records the branch value (the output of its last batch norm) and the shortcut
    (the block input, or the output of ``downsample``) and replaces the block output by a node
    whose backward is the ReLU's gradient followed by the proportional split
    ``p_branch = b / (b + i) * p``, ``p_shortcut = i / (b + i) * p`` -- TorchRay's
    ``EltwiseSum`` rule, without having to rewrite the block's ``forward``. Other modules that
    add tensors in their own ``forward`` are not detected: their additions get the ordinary
    gradient.

    Any other leaf module met after ``layer`` (e.g. ``nn.GELU``, ``nn.LayerNorm``,
    ``nn.ConvTranspose2d``) raises a ``ValueError`` naming it, unless its type is listed in
    ``ordinary_gradient_modules``.

    Args:
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)`` (or
            ``(N, num_classes, *spatial)`` for a fully convolutional one).
        layer (str or torch.nn.Module): layer at whose output the saliency is read, e.g.
            ``"layer3"`` (ResNet), ``"features.23"`` (pool4 of VGG-16).
        contrast_layer (str or torch.nn.Module): layer at whose output the dual-unit signal is
            subtracted, between ``layer`` and the classifier, e.g. ``"avgpool"`` (ResNet) or
            ``"classifier.4"`` (relu7 of VGG).
        classifier_layer (str or torch.nn.Module, optional): the layer whose weights are
            negated for the contrast. ``None``: the last ``nn.Linear``/``nn.Conv`` of the model
            in registration order (TorchRay's convention).
        ordinary_gradient_modules (sequence of types): extra leaf module types that should get
            their ordinary gradient (identities, reshapes, max-like routing).

    Examples::

        >>> model = torchvision.models.vgg16(weights="IMAGENET1K_V1").eval()
        >>> cmwp = ContrastiveExcitationBackprop(model, "features.23", "classifier.4")
        >>> sal = cmwp.attribute(images, target=labels)          # (N, 1, 14, 14) at 224x224
        >>> up = LayerAttribution.interpolate(sal, images.shape[-2:], "bilinear")
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Union[str, nn.Module],
        contrast_layer: Union[str, nn.Module],
        classifier_layer: Union[None, str, nn.Module] = None,
        ordinary_gradient_modules: Sequence[Type[nn.Module]] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layer = resolve_layer(model, layer, "layer")
        contrast = resolve_layer(model, contrast_layer, "contrast_layer")
        if classifier_layer is None:
            classifier = find_classifier_layer(model)
        else:
            classifier = resolve_layer(model, classifier_layer, "classifier_layer")
        if not isinstance(classifier, _EXCITATION_LINEAR):
            raise ValueError(
                "classifier_layer must be an nn.Linear or nn.Conv{1,2,3}d, got "
                f"{type(classifier).__name__}"
            )
        if contrast is classifier or layer is classifier:
            raise ValueError("layer and contrast_layer must come before classifier_layer")
        extra = tuple(ordinary_gradient_modules)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in extra):
            raise TypeError("ordinary_gradient_modules must be a sequence of nn.Module subclasses")
        LayerAttribution.__init__(self, model, layer)
        GradientAttribution.__init__(self, model)
        self.model = model
        self._saliency_layer: nn.Module = layer  # ``self.layer``, typed as one module
        self.contrast_layer = contrast
        self.classifier_layer = classifier
        self.ordinary_gradient_modules = extra

    # ------------------------------------------------------------------------------------------
    def _install_hooks(self, state: Dict[str, Any]) -> List[RemovableHandle]:
        handles: List[RemovableHandle] = []
        ordinary = _ORDINARY + self.ordinary_gradient_modules
        weights: Dict[nn.Module, Tensor] = {}

        def rule_hook(name: str) -> Callable:
            def hook(module: nn.Module, args: Tuple[Any, ...], out: Any) -> Optional[Tensor]:
                if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
                    return None  # before `layer`: nothing to do
                if isinstance(module, ordinary):
                    return None
                x = args[0]
                if isinstance(module, _EXCITATION_LINEAR):
                    if module not in weights:
                        weights[module] = module.weight.detach().clamp(min=0)
                    return _Excitation.apply(x, out.detach(), _positive_forward(module, weights[module]))
                if isinstance(module, _EXCITATION_POOL):
                    return _Excitation.apply(x, out.detach(), _positive_forward(module, None))
                if isinstance(module, _PASS_THROUGH):
                    return _PassThrough.apply(x, out.detach())
                raise ValueError(
                    f"ContrastiveExcitationBackprop has no excitation rule for module {name!r} of "
                    f"type {type(module).__name__}; supported: convolutions, linear layers, average "
                    "pooling, batch norm, ReLU, max pooling, dropout, flatten and torchvision "
                    "residual blocks (pass ordinary_gradient_modules=(...) for modules whose "
                    "ordinary gradient is the right rule)"
                )

            return hook

        def block_hooks(block: nn.Module) -> None:
            last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            record: Dict[str, Tensor] = {}
            # `layer` inside the block: its shortcut may need the signal even if the branch does not
            inner = any(m is self._saliency_layer for m in block.modules() if m is not block)

            def branch_hook(module: nn.Module, args: Tuple[Any, ...], out: Tensor) -> Optional[Tensor]:
                record["branch"] = out
                if not (out.requires_grad or inner):
                    return None  # before `layer`: the block runs as usual
                # ``out += identity`` in the block modifies what this returns: keep the original.
                return out.clone()

            def shortcut_hook(module: nn.Module, args: Tuple[Any, ...], out: Tensor) -> None:
                record["identity"] = out

            def block_hook(module: nn.Module, args: Tuple[Any, ...], y: Tensor) -> Optional[Tensor]:
                branch = record.pop("branch")
                identity = record.pop("identity", args[0])
                if not (branch.requires_grad or identity.requires_grad):
                    return None
                return _ResidualSum.apply(
                    y.detach(), branch, identity, branch.detach(), identity.detach()
                )

            # registered after the rule hooks of these modules, so they see the rule outputs
            handles.append(last_bn.register_forward_hook(branch_hook))
            if block.downsample is not None:
                handles.append(block.downsample.register_forward_hook(shortcut_hook))
            handles.append(block.register_forward_hook(block_hook))

        def capture_hook(key: str, leaf: bool) -> Callable:
            def hook(module: nn.Module, args: Tuple[Any, ...], out: Any) -> Tensor:
                if not isinstance(out, Tensor):
                    raise ValueError(f"the {key} layer must return a single tensor")
                if key == "classifier":
                    state["classifier_input"] = args[0]
                tensor = out.detach().requires_grad_(True) if leaf else out
                state[key] = tensor
                # a clone so that later in-place ops (ReLU) neither hit a leaf nor change `tensor`
                return tensor.clone()

            return hook

        for name, module in self.model.named_modules():
            if module is self.classifier_layer:
                continue
            if next(module.children(), None) is None:  # leaf
                handles.append(module.register_forward_hook(rule_hook(name)))
        for module in self.model.modules():
            if isinstance(module, _RESIDUAL_BLOCKS):
                block_hooks(module)
        handles.append(self._saliency_layer.register_forward_hook(capture_hook("saliency", True)))
        handles.append(self.contrast_layer.register_forward_hook(capture_hook("contrast", False)))
        handles.append(self.classifier_layer.register_forward_hook(capture_hook("classifier", True)))
        return handles

    @log_usage()
    def attribute(
        self, inputs: Inputs, target: Target = None, additional_forward_args: Optional[object] = None
    ) -> Tensor:
        r"""Computes the cMWP saliency of ``target`` at ``layer``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): model inputs, batch first, e.g. ``(N, 3, H, W)``.
            target (int, sequence of int or Tensor, optional): class index per sample (``(N,)``)
                or one for all. ``None``: the predicted class of each sample.
            additional_forward_args (Any, optional): extra arguments passed to the model after
                ``inputs``.

        Returns:
            Tensor ``(N, 1, *spatial)`` at the resolution of ``layer``'s output, non-negative:
            the channel sum of the contrastive signal, clamped at 0.

        Raises:
            ValueError: a target outside ``[0, num_classes)``, a module with no excitation rule
                after ``layer``, or layers that are not in the order
                ``layer -> contrast_layer -> classifier_layer``.

        Examples::

            >>> sal = ContrastiveExcitationBackprop(model, "layer3", "avgpool").attribute(x, 7)
        """
        model = self.model
        inputs = tuple(t.detach() for t in _format_tensor_into_tuples(inputs))
        extra = _format_additional_forward_args(additional_forward_args) or ()
        modes = {m: m.training for m in model.modules()}
        state: Dict[str, Any] = {}
        handles: List[RemovableHandle] = []
        try:
            model.eval()
            with _FrozenParameters(model):
                handles = self._install_hooks(state)
                with torch.enable_grad():
                    output = model(*inputs, *extra)
                for key, what in (("saliency", "layer"), ("contrast", "contrast_layer"),
                                  ("classifier", "classifier_layer")):
                    if key not in state:
                        raise ValueError(f"{what} was not called in the model's forward pass")
                if not isinstance(output, Tensor) or output.dim() < 2:
                    raise ValueError("the model must return a tensor (N, num_classes, ...)")
                grad_output = _one_hot(output, target)
                return self._backward(output, grad_output, state)
        finally:
            for handle in handles:
                handle.remove()
            for m, mode in modes.items():
                m.training = mode

    def _backward(self, output: Tensor, grad_output: Tensor, state: Dict[str, Any]) -> Tensor:
        classifier = self.classifier_layer
        cls_out, cls_in = state["classifier"], state["classifier_input"]
        saliency_act, contrast_act = state["saliency"], state["contrast"]
        if not (cls_in.requires_grad and contrast_act.requires_grad):
            raise ValueError(
                "layer must run before contrast_layer, and contrast_layer before classifier_layer, "
                "in the model's forward pass"
            )
        # signal at the classifier's output (ordinary rules after it, usually nothing)
        (p_cls,) = torch.autograd.grad(output, cls_out, grad_output, allow_unused=True)
        if p_cls is None:
            raise ValueError("the model's output does not depend on classifier_layer")
        # excitation through the classifier with w+ (target) and (-w)+ (dual unit)
        weight = classifier.weight.detach()
        x = cls_in.detach().requires_grad_(True)
        signals = []
        for w in (weight.clamp(min=0), (-weight).clamp(min=0)):
            with torch.enable_grad():
                z = _positive_forward(classifier, w)(x)
            (g,) = torch.autograd.grad(z, x, p_cls / (z.detach() + EXCITATION_EPS))
            signals.append(g * x.detach())
        positive, negative = signals
        (contrast,) = torch.autograd.grad(cls_in, contrast_act, negative, retain_graph=True,
                                          allow_unused=True)
        if contrast is None:
            raise ValueError("classifier_layer does not depend on contrast_layer")
        handle = contrast_act.register_hook(lambda g: g - contrast)
        try:
            (signal,) = torch.autograd.grad(cls_in, saliency_act, positive, allow_unused=True)
        finally:
            handle.remove()
        if signal is None:
            raise ValueError("contrast_layer does not depend on layer")
        return signal.sum(dim=1, keepdim=True).clamp(min=0)



def _one_hot(output: Tensor, target: Target) -> Tensor:
    """One-hot ``(N, K, ...)`` signal at the model output, validating ``target``."""
    n = output.shape[0]
    index = _class_index(output, target)
    grad = torch.zeros_like(output)
    shape = (n, 1) + (1,) * (output.dim() - 2)
    grad.scatter_(1, index.view(shape).expand(shape[:1] + (1,) + output.shape[2:]), 1.0)
    return grad
