"""FullGrad (Srinivas and Fleuret, NeurIPS 2019), Captum style, with its decomposition exposed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from captum._utils.common import _format_additional_forward_args
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from captum_consistency.attr._layers import (
    _AVG_POOLS,
    _DROPOUTS,
    _MAX_POOLS,
    _RESHAPES,
    Inputs,
    Target,
    _class_index,
    _FrozenParameters,
)

__all__ = ["FullGrad", "FullGradDecomposition", "fullgrad_postprocess"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
# Leaf modules under which the bias decomposition is complete (piecewise linear, no hidden bias).
_PIECEWISE_LINEAR = (
    _CONV
    + (nn.Linear, _BATCH_NORM, nn.ReLU, nn.LeakyReLU, nn.PReLU)
    + _MAX_POOLS
    + _AVG_POOLS
    + _DROPOUTS
    + _RESHAPES
)


def _implicit_bias(module: nn.Module) -> Optional[Tensor]:
    """The bias of a layer as an affine map in eval mode (``None``: the layer has none)."""
    if isinstance(module, _BATCH_NORM):
        # y = gamma (x - mu) / sqrt(var + eps) + beta = scale * x + (beta - mu * scale)
        mean, var = module.running_mean, module.running_var
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -mean * scale
        return bias + module.bias if module.bias is not None else bias
    if isinstance(module, _CONV + (nn.Linear,)) and module.bias is not None:
        return module.bias
    return None


def _default_rtol(x: Tensor) -> float:
    """Completeness tolerance for the precision ``x``'s forward pass ran in."""
    if x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type):
        return 5e-2
    if x.is_cuda and x.dtype == torch.float32 and (
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    ):
        return 2e-2
    return 1e-3


def fullgrad_postprocess(term: Tensor, eps: float = 1e-6) -> Tensor:
    r"""The authors' ``_postProcess`` of one term, followed by the channel sum.

    ``|t|`` rescaled per image to ``[0, 1]`` over all channels and positions,
    ``(|t| - min) / (max(|t| - min) + eps)``, then summed over channels: ``(N, C, *S) -> (N, 1, *S)``.
    Computed as ``(sum_c |t_c| - C min) / (max - min + eps)`` without materialising the
    rescaled tensor.

    Args:
        term (Tensor): ``(N, C, *spatial)``.
        eps (float): added to the range (the reference's ``1e-6``).

    Returns:
        Tensor ``(N, 1, *spatial)``.

    Examples::

        >>> fullgrad_postprocess(torch.tensor([[[[1.0, -3.0]], [[0.5, 2.0]]]]))
        tensor([[[[0.2000, 1.6000]]]])
    """
    return _rescaled_channel_sum(term.abs(), eps)


def _rescaled_channel_sum(a: Tensor, eps: float) -> Tensor:
    """:func:`fullgrad_postprocess` of a term whose absolute value ``a`` is already taken."""
    lo, hi = torch.aminmax(a.flatten(1), dim=1)
    view = (-1,) + (1,) * (a.dim() - 1)
    return (a.sum(1, keepdim=True) - a.shape[1] * lo.view(view)) / ((hi - lo).view(view) + eps)


@dataclass
class FullGradDecomposition:
    r"""FullGrad decomposition of the target outputs (Srinivas and Fleuret 2019, Eq. 2).

    For a piecewise-linear network in eval mode,
    ``f(x) = <grad_x f, x> + sum_l <grad_{b_l} f, b_l>``, where the bias-gradient of layer ``l``
    is the gradient at its output times its (possibly implicit) bias, per position.

    Attributes:
        output (Tensor): ``(N,)`` the target outputs ``f(x)``.
        input_term (Tensor): ``(N, C, H, W)`` input-gradient times input.
        bias_terms (dict[str, Tensor]): layer name -> bias-gradient times bias, shaped like the
            layer's output (``(N, C', h, w)`` for convolutions and batch norm, ``(N, K)`` for
            linear layers), for every layer with a bias.

    Examples::

        >>> dec = FullGrad(model.eval()).decompose(images, target=labels)
        >>> dec.input_term.shape, sorted(dec.bias_terms)[:2]
        (torch.Size([8, 3, 224, 224]), ['bn1', 'fc'])
        >>> torch.allclose(dec.total(), dec.output, rtol=1e-4)  # completeness
        True
    """

    output: Tensor
    input_term: Tensor
    bias_terms: Dict[str, Tensor] = field(default_factory=dict)

    def total(self) -> Tensor:
        """``(N,)`` sum of all terms; equals :attr:`output` when the decomposition is complete.

        Returns:
            Tensor: ``(N,)`` the input term plus every bias term, each summed over its entries.
        """
        total = self.input_term.flatten(1).sum(1)
        for term in self.bias_terms.values():
            total = total + term.flatten(1).sum(1)
        return total

    def convergence_delta(self) -> Tensor:
        """``(N,)`` ``total() - output``, Captum's convergence delta.

        Returns:
            Tensor: ``(N,)``, zero up to rounding for a complete decomposition.
        """

        return self.total() - self.output


class FullGrad(GradientAttribution):
    r"""FullGrad saliency (Srinivas and Fleuret, "Full-Gradient Representation for Neural
    Network Visualization", NeurIPS 2019, https://arxiv.org/abs/1905.00780).

    A piecewise-linear network with biases ``b_l`` is, around ``x``, exactly

    .. math::

        f(x) = \nabla_x f(x)^\top x + \sum_l \nabla_{b_l} f(x)^\top b_l ,

    the *full-gradient* decomposition (``b_l`` includes batch norm's implicit bias
    ``beta - mu gamma / sqrt(var + eps)`` in eval mode). The saliency map aggregates the terms
    spatially, as in the authors' reference code:

    .. math::

        S(x) = \psi(\nabla_x f \odot x) + \sum_{l \in \text{conv, BN}} \sum_c
        \psi(\nabla_{b_l} f \odot b_l)_c ,

    where ``psi`` is the absolute value, rescaled per image to ``[0, 1]`` over all channels and
    positions (``eps = 1e-6``), upsampled bilinearly with ``align_corners=True`` to the input
    size; the input term and each layer's term are summed over channels. Linear layers' terms
    have no spatial extent: they are part of the decomposition (and of the completeness check)
    but not of the map.

    Every call checks completeness (``total == output`` up to ``completeness_rtol`` times the
    sum of the terms' magnitudes) and raises a ``ValueError`` when it fails -- a model with batch
    norm in training mode, a non-piecewise-linear activation (GELU, SiLU, ...), a normalisation
    other than batch norm, or a layer with a bias FullGrad does not know -- instead of returning
    a silently wrong map. Batch norm in training mode is refused before the forward pass (it
    would also update the running statistics). Reduced precision loosens the check by default:
    float32 on CUDA with TF32 convolutions or matrix products allowed (PyTorch's default for
    convolutions) rounds products to 10 mantissa bits, and half/bfloat16 to fewer.

    **Differences with pytorch-grad-cam's ``FullGrad``** (both use every ``Conv2d`` and
    ``BatchNorm2d``, the same implicit bias and the same gradients): pytorch-grad-cam rescales
    each *channel* of each term to ``[0, 1]`` separately (eps ``1e-7``) instead of each term as a
    whole, resizes with OpenCV's bilinear ``cv2.resize`` (half-pixel centres, i.e.
    ``align_corners=False``), and min-max normalises the final map to ``[0, 1]``. Per-channel
    rescaling gives every channel of every layer equal weight, so weak channels are amplified
    and the maps differ in shape, not only in scale (see ``tests/test_fullgrad.py``, which
    reproduces pytorch-grad-cam's map from this class's decomposition).

    Args:
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)``; put it in eval
            mode.
        completeness_rtol (float, optional): relative tolerance of the completeness check
            (relative to the sum of the absolute values of the per-sample totals of all terms).
            ``None``: ``1e-3`` in full float32/float64 precision, ``2e-2`` for float32 on CUDA
            when TF32 is allowed, ``5e-2`` for float16/bfloat16 inputs or under autocast.
        eps (float): the post-processing's ``eps``.

    Examples::

        >>> model = torchvision.models.resnet18(weights="IMAGENET1K_V1").eval()
        >>> fullgrad = FullGrad(model)
        >>> sal = fullgrad.attribute(images, target=labels)  # (N, 1, H, W)
        >>> dec = fullgrad.decompose(images, target=labels)
        >>> torch.allclose(dec.total(), dec.output, rtol=1e-4)
        True
    """

    def __init__(
        self, model: nn.Module, completeness_rtol: Optional[float] = None, eps: float = 1e-6
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if completeness_rtol is not None and not completeness_rtol > 0:
            raise ValueError(f"completeness_rtol must be positive, got {completeness_rtol}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        GradientAttribution.__init__(self, model)
        self.model = model
        self.completeness_rtol = completeness_rtol
        self.eps = eps

    def has_convergence_delta(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------
    def _bias_layers(self) -> List[Tuple[str, nn.Module]]:
        layers = []
        for name, module in self.model.named_modules():
            if isinstance(module, _BATCH_NORM):
                if module.training:
                    raise ValueError(
                        f"FullGrad needs batch norm in eval mode: {name!r} "
                        f"({type(module).__name__}) is in training mode, where it normalises "
                        "with batch statistics and the bias decomposition is not complete; "
                        "call model.eval() first"
                    )
                if module.running_mean is None or module.running_var is None:
                    raise ValueError(
                        f"FullGrad needs batch norm with running statistics: {name!r} was built "
                        "with track_running_stats=False and normalises with batch statistics"
                    )
            if _implicit_bias(module) is not None:
                layers.append((name, module))
        return layers

    def _run(
        self,
        inputs: Inputs,
        target: Target,
        additional_forward_args: Optional[object],
        on_grad: Callable[[str, Tensor, Tensor], None],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Forward/backward; calls ``on_grad(name, grad, bias)`` with the gradient at the output
        of every layer with a bias and the bias shaped to broadcast with it; returns
        ``(output (N,), input_term, per-layer per-sample totals of the bias terms (L, N))``."""
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError("FullGrad takes one input tensor; pass others as additional_forward_args")
            inputs = inputs[0]
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            raise ValueError(f"inputs must be a floating point tensor (N, C, ...), got {inputs!r:.80}")
        extra = _format_additional_forward_args(additional_forward_args) or ()
        layers = self._bias_layers()
        biases = {name: _implicit_bias(module).detach() for name, module in layers}
        handles: List[RemovableHandle] = []
        sums: List[Tensor] = []

        def hook(name: str) -> Callable:
            def forward_hook(module: nn.Module, args: Any, out: Tensor) -> None:
                if not isinstance(out, Tensor) or not out.requires_grad:
                    return
                if isinstance(module, nn.Linear) and out.dim() > 2:
                    raise ValueError(
                        f"FullGrad: {name!r} (Linear) adds its bias on the last dimension of a "
                        f"{tuple(out.shape)} tensor (channels last, as in ConvNeXt and ViT "
                        "blocks); FullGrad's terms put channels on dimension 1, and its "
                        "decomposition is exact only for piecewise-linear models (ConvNeXt and "
                        "ViT use GELU and LayerNorm)"
                    )
                bias = biases[name].view((1, -1) + (1,) * (out.dim() - 2))

                # registered before any in-place op (ReLU) on `out`, so it sees the gradient at
                # the layer's own output
                def grad_hook(grad: Tensor) -> None:
                    # sum_{c, pos} grad * b = sum_c b_c sum_pos grad, without the product tensor
                    per_channel = grad.sum(dim=tuple(range(2, grad.dim()))) if grad.dim() > 2 else grad
                    sums.append(per_channel @ biases[name])
                    on_grad(name, grad, bias)

                out.register_hook(grad_hook)

            return forward_hook

        x = inputs.detach().requires_grad_(True)
        try:
            with _FrozenParameters(self.model):
                for name, module in layers:
                    handles.append(module.register_forward_hook(hook(name)))
                with torch.enable_grad():
                    output = self.model(x, *extra)
                    if not isinstance(output, Tensor) or output.dim() != 2:
                        raise ValueError("FullGrad needs a model returning (N, num_classes)")
                    index = _class_index(output, target)
                    selected = output.gather(1, index.view(-1, 1)).squeeze(1)
                    (grad,) = torch.autograd.grad(selected.sum(), x)
        finally:
            for handle in handles:
                handle.remove()
        totals = torch.stack(sums) if sums else selected.new_zeros((0, selected.shape[0]))
        return selected.detach(), grad * x.detach(), totals

    def _check(self, output: Tensor, input_term: Tensor, totals: Tensor) -> Tensor:
        input_total = input_term.flatten(1).sum(1)
        total = input_total + totals.sum(0)
        delta = total - output
        scale = input_total.abs() + totals.abs().sum(0)  # >= |output| when complete
        rtol = self.completeness_rtol
        if rtol is None:
            rtol = _default_rtol(input_term)
        bad = delta.abs() > rtol * scale
        if bool(bad.any()):
            suspects = [
                f"{name or '<model>'} ({type(m).__name__})"
                for name, m in self.model.named_modules()
                if next(m.children(), None) is None and not isinstance(m, _PIECEWISE_LINEAR)
            ]
            i = int(bad.nonzero()[0])
            raise ValueError(
                "FullGrad completeness check failed: input-gradient x input + bias-gradients = "
                f"{total[i].item():.6g} but the target output is {output[i].item():.6g} (sample {i}). "
                "The decomposition is only exact for piecewise-linear models in eval mode whose "
                "biases are in conv, linear and batch-norm layers"
                + (f"; modules that break it: {', '.join(suspects[:8])}" if suspects else "")
                + ("; the model is in training mode" if self.model.training else "")
                + f" (relative error {(delta[i].abs() / scale[i]).item():.2g} > completeness_rtol {rtol:g})"
            )
        return delta

    @log_usage()
    def decompose(
        self, inputs: Inputs, target: Target = None, additional_forward_args: Optional[object] = None
    ) -> FullGradDecomposition:
        r"""The full-gradient decomposition of the target outputs, unprocessed.

        Args:
            inputs (Tensor): ``(N, C, H, W)``.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class.
            additional_forward_args (Any, optional): extra arguments for the model.

        Returns:
            :class:`FullGradDecomposition` with the target outputs, the input term and every
            layer's bias term (no completeness check: inspect ``convergence_delta()``).

        Examples::

            >>> dec = FullGrad(model).decompose(x, target=3)
            >>> dec.convergence_delta().abs().max()
        """
        terms: Dict[str, Tensor] = {}

        def keep(name: str, grad: Tensor, bias: Tensor) -> None:
            term = grad * bias
            terms[name] = terms[name] + term if name in terms else term

        output, input_term, _ = self._run(inputs, target, additional_forward_args, keep)
        ordered = {name: terms[name] for name, _ in self._bias_layers() if name in terms}
        return FullGradDecomposition(output, input_term, ordered)

    @log_usage()
    def attribute(
        self,
        inputs: Inputs,
        target: Target = None,
        additional_forward_args: Optional[object] = None,
        return_convergence_delta: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""FullGrad saliency map of ``target``.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class.
            additional_forward_args (Any, optional): extra arguments for the model.
            return_convergence_delta (bool): also return the ``(N,)`` completeness error
                ``sum of all terms - target output``.

        Returns:
            Tensor ``(N, 1, H, W)``, non-negative (and the delta if requested).

        Raises:
            ValueError: a target outside the classifier's range, batch norm in training mode,
                or a failed completeness check.

        Examples::

            >>> sal, delta = FullGrad(model).attribute(x, target=labels, return_convergence_delta=True)
        """
        if isinstance(inputs, Tensor) and inputs.dim() != 4:
            raise ValueError(f"inputs must be images (N, C, H, W), got shape {tuple(inputs.shape)}")
        maps: Dict[Tuple[int, ...], Tensor] = {}

        def accumulate(name: str, grad: Tensor, bias: Tensor) -> None:
            if grad.dim() != 4:  # linear layers: in the decomposition, not in the map
                return
            m = _rescaled_channel_sum(torch.mul(grad, bias).abs_(), self.eps)
            key = tuple(m.shape[2:])
            maps[key] = maps[key] + m if key in maps else m

        output, input_term, totals = self._run(inputs, target, additional_forward_args, accumulate)
        delta = self._check(output, input_term, totals)
        saliency = fullgrad_postprocess(input_term, self.eps)
        size = tuple(input_term.shape[2:])
        for key, m in maps.items():
            # bilinear interpolation is linear: upsampling the channel sums of all layers of one
            # resolution at once equals the reference's per-layer, per-channel upsampling
            if key != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
            saliency = saliency + m
        return (saliency, delta) if return_convergence_delta else saliency
