"""Checks for the registry's methods whose rule applies to some module types only.

Guided backpropagation, deconvolution and DeepLift replace the gradient of given module types;
:func:`unhandled_nonlinearities` finds the non-linearities a model calls outside them (to warn),
and :func:`with_unique_module_calls` gives each call of such a module its own module (DeepLift
stores per-module state).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_consistency._warnings import CaptumConsistencyWarning

__all__ = ["unhandled_nonlinearities", "warn_unhandled", "with_unique_module_calls"]


#: Element-wise non-linearities (function names as torch dispatches them) whose backward a
#: modified-gradient rule (guided backprop, DeepLift) must replace.
_ACTIVATIONS = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid",
    "hardsigmoid_", "hardtanh", "hardtanh_", "elu", "elu_", "leaky_relu", "leaky_relu_", "mish",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus", "softmax", "log_softmax",
})
#: DeepLift also needs its own rule for normalisations by data statistics and max pooling.
_DEEPLIFT_EXTRA = frozenset({
    "layer_norm", "group_norm", "instance_norm", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
})


class _CallCounter(TorchFunctionMode):
    def __init__(self, names: frozenset) -> None:
        super().__init__()
        self.names = names
        self.depth = 0
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.depth == 0 and name in self.names:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def unhandled_nonlinearities(
    model: nn.Module,
    example: Tensor,
    handled: Tuple[Type[nn.Module], ...],
    names: frozenset = _ACTIVATIONS,
    additional_forward_args: Optional[object] = None,
) -> Counter:
    """Non-linear functions called outside modules of the ``handled`` types in one forward pass.

    A modified-gradient rule installed on module types (Captum's guided backprop on
    ``nn.ReLU``, DeepLift on its ``SUPPORTED_NON_LINEAR``) leaves every other non-linearity with
    its ordinary gradient: ``nn.GELU`` in ConvNeXt and ViT, ``nn.SiLU`` in EfficientNet, the
    functional ``F.relu`` of ``DenseNet.forward``. They are found by running ``example``
    through the model under a :class:`~torch.overrides.TorchFunctionMode`.

    Returns:
        collections.Counter: function name -> number of calls outside handled modules.
    """
    counter = _CallCounter(names)

    def enter(module, args):
        counter.depth += 1

    def leave(module, args, output):
        counter.depth -= 1

    handles = []
    for module in model.modules():
        if isinstance(module, handled):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    extra = additional_forward_args
    extra = () if extra is None else (extra if isinstance(extra, tuple) else (extra,))
    try:
        with torch.no_grad(), counter:
            model(example, *extra)
    finally:
        for h in handles:
            h.remove()
    return counter.calls


def warn_unhandled(method: str, rule: str, handled: Sequence[type], calls: Counter) -> None:
    """Warns that ``calls`` (from :func:`unhandled_nonlinearities`) bypass ``rule``."""
    if not calls:
        return
    listed = ", ".join(f"{name} x{count}" for name, count in sorted(calls.items()))
    types = ", ".join(t.__name__ for t in handled)
    warnings.warn(
        f"{method}: the {rule} replaces the gradient of {types} modules only; these "
        f"non-linearities of the model pass their ordinary gradient: {listed}. The map mixes "
        f"the rule with plain gradients (see the registry's documentation)",
        CaptumConsistencyWarning,
        stacklevel=3,
    )


def with_unique_module_calls(
    model: nn.Module,
    example: Tensor,
    types: Tuple[Type[nn.Module], ...],
    additional_forward_args: Optional[object] = None,
) -> nn.Module:
    """``model``, or a traced copy in which each call of a module of ``types`` has its own module.

    Captum's DeepLift stores a module's input and output on the module, so a module called
    twice (torchvision's ``BasicBlock`` calls ``self.relu`` twice) breaks it. The copy is a
    :func:`torch.fx.symbolic_trace` of the model whose second and later calls of such a module
    use a deep copy of it (these modules have no parameters, so the function is the same and
    the parameters are shared with ``model``).

    Raises:
        ValueError: a module is called more than once and the model cannot be traced.
    """
    counts: Counter = Counter()
    handles = [
        m.register_forward_hook(lambda mod, a, o: counts.update([id(mod)]))
        for m in model.modules() if isinstance(m, types)
    ]
    extra = additional_forward_args
    extra = () if extra is None else (extra if isinstance(extra, tuple) else (extra,))
    try:
        with torch.no_grad():
            model(example, *extra)
    finally:
        for h in handles:
            h.remove()
    reused = {k for k, c in counts.items() if c > 1}
    if not reused:
        return model
    names = {id(m): n for n, m in model.named_modules()}
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 -- any tracing failure gets the explanation below
        raise ValueError(
            f"DeepLift needs every non-linearity module called once; "
            f"{', '.join(sorted(names[k] for k in reused))} of {type(model).__name__} are called "
            f"several times and the model cannot be traced by torch.fx to give each call its own "
            f"module ({type(error).__name__}: {error}); give each call its own module"
        ) from error
    modules = dict(traced.named_modules())
    seen = set()
    for i, node in enumerate(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], types):
            continue
        if node.target in seen:
            name = f"_unique_call_{i}"
            traced.add_submodule(name, copy.deepcopy(modules[node.target]))
            node.target = name
        seen.add(node.target)
    traced.recompile()
    traced.train(model.training)
    return traced
