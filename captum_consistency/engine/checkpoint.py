"""Atomic training checkpoints that resume exactly where a run stopped.

A checkpoint is a ``dict`` written with :func:`torch.save` to a temporary file in the target's
folder, flushed to disk and renamed over the target with :func:`os.replace`. The rename is
atomic on POSIX file systems, so a process killed at any moment leaves either the previous
complete checkpoint or the new complete one, never a truncated file: a run never loses more
than the epoch in progress.

Contents (``format`` 1)::

    format, arch, num_classes, gmp, classes, multilabel,   # what the model is
    model,                                                 # state dict of the unwrapped model
    optimizer, scheduler, epoch,                           # epoch = number of completed epochs
    args, rng, metrics                                     # rng: one state per torchrun rank
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from captum_consistency.builders import unwrap_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "check_checkpoint_compatible",
    "load_model_weights",
    "remove_stale_temporaries",
    "load_pretrained_backbone",
]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout that :func:`save_checkpoint` writes and
:func:`load_checkpoint` accepts (a newer file is refused with a clear error)."""
_TMP_PREFIX = ".tmp-"


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Args:
        state (dict): what to save; ``format`` is added when missing.
        path (str): destination file; its folder is created if needed.

    Returns:
        str: ``path``.

    Examples::

        >>> save_checkpoint({"model": model.state_dict(), "epoch": 3}, "runs/x/checkpoint.pth")
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def remove_stale_temporaries(path: str) -> int:
    """Deletes temporary files that a killed :func:`save_checkpoint` left next to ``path``.

    Args:
        path (str): the checkpoint file whose folder is cleaned (the file itself is kept).

    Returns:
        int: how many were removed.

    Examples::

        >>> remove_stale_temporaries("runs/x/checkpoint.pth")  # before resuming
        0
    """
    folder = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(folder, _TMP_PREFIX + glob.escape(os.path.basename(path)) + ".*")
    stale = glob.glob(pattern)
    for f in stale:
        try:
            os.remove(f)
        except OSError:
            pass
    return len(stale)


def _torch_load(path: str, what: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` with an error that names the file and the cause."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(
                f"cannot read {what} {path}: it holds Python objects that a weights-only load "
                f"refuses (not a file written by captum-consistency?): {_first_line(e)}"
            ) from e
        raise ValueError(f"cannot read {what} {path}: the file is truncated or corrupt ({_first_line(e)})") from e
    except Exception as e:  # EOFError (truncated), RuntimeError (a broken zip archive), ...
        size = os.path.getsize(path)
        raise ValueError(
            f"cannot read {what} {path} ({size} bytes): the file is truncated or corrupt, e.g. "
            f"an interrupted copy ({_first_line(e)})"
        ) from e


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path (str): the file.
        map_location (str, torch.device or callable): passed to :func:`torch.load`.

    Returns:
        dict: the checkpoint (see the module docstring for its keys).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable captum-consistency checkpoint.

    Examples::

        >>> ckpt = load_checkpoint("runs/x/checkpoint.pth")
        >>> ckpt["arch"], ckpt["epoch"]
        ('resnet18', 3)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _torch_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise ValueError(
            f"{path} is not a captum-consistency checkpoint (expected a dict with 'model' and "
            "'arch', as written by recipes/train.py)"
        )
    if ckpt.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {ckpt['format']}, newer than this version "
            f"understands ({CHECKPOINT_FORMAT}); upgrade captum-consistency"
        )
    return ckpt


def check_checkpoint_compatible(
    ckpt: Dict[str, Any],
    path: str,
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    gmp: Optional[bool] = None,
    classes: Optional[Sequence[str]] = None,
) -> None:
    """Raises a clear ``ValueError`` when a checkpoint does not match the requested model.

    Each argument that is not ``None`` is compared with what the checkpoint records.

    Args:
        ckpt (dict): from :func:`load_checkpoint`.
        path (str): the checkpoint's file name, for the message.
        arch (str, optional): the architecture of the current run.
        num_classes (int, optional): the number of classes of the current data.
        gmp (bool, optional): whether the current run uses global max pooling.
        classes (sequence of str, optional): the class names of the current data, in order.

    Returns:
        None: it returns only when the checkpoint matches.

    Raises:
        ValueError: the checkpoint records another architecture, pooling, number of classes
            or class names; the message names the file and every mismatch.

    Examples::

        >>> ckpt = load_checkpoint(path)
        >>> check_checkpoint_compatible(ckpt, path, arch="resnet50", num_classes=1000)
    """
    problems = []
    if arch is not None and ckpt.get("arch") != arch:
        problems.append(f"architecture {ckpt.get('arch')!r}, but this run uses {arch!r}")
    if gmp is not None and bool(ckpt.get("gmp", False)) != bool(gmp):
        problems.append(f"gmp={bool(ckpt.get('gmp', False))}, but this run uses gmp={bool(gmp)}")
    if num_classes is not None and ckpt.get("num_classes") != num_classes:
        problems.append(f"{ckpt.get('num_classes')} classes, but the data has {num_classes}")
    elif classes is not None and ckpt.get("classes") is not None and list(ckpt["classes"]) != list(classes):
        problems.append("the same number of classes but different class names or order")
    if problems:
        raise ValueError(f"checkpoint {path} does not match this run: it has " + "; ".join(problems))


def load_model_weights(
    model: nn.Module, state_dict: Dict[str, Any], path: str, arch: Optional[str] = None
) -> None:
    """``load_state_dict(strict=True)`` on the unwrapped model, with the file named on failure.

    Weights of another architecture are reported in one line: which architecture the file
    holds (when it is one that :func:`~captum_consistency.builders.build_model` knows), which
    one was asked for, and how many tensors differ, instead of PyTorch's list of every
    mismatch.

    Args:
        model (torch.nn.Module): the model, possibly wrapped in ``DistributedDataParallel``.
        state_dict (dict): the weights, e.g. ``load_checkpoint(path)["model"]``.
        path (str): the file they come from, for the message.
        arch (str, optional): the architecture name of ``model``, for the message.

    Returns:
        None: the weights are loaded in place.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (another architecture).

    Examples::

        >>> load_model_weights(model, load_checkpoint(path)["model"], path, arch="resnet18")
    """
    target = unwrap_model(model)
    try:
        target.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        own = target.state_dict()
        missing, unexpected, mismatched = _differences(own, state_dict)
        asked = arch or type(target).__name__
        held = _architecture_of(state_dict)
        holds = f"holds {held} weights" if held else "holds weights of another architecture"
        raise ValueError(
            f"checkpoint {path} {holds}, but {asked} was asked for: {len(missing)} tensors "
            f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:2]}), {len(mismatched)} of another shape (e.g. {mismatched[:2]})"
        ) from None  # PyTorch's message lists every tensor: tens of kilobytes


def _differences(own: Dict[str, Any], state: Dict[str, Any]):
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        k for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    )
    return missing, unexpected, mismatched


def _architecture_of(state_dict: Dict[str, Any]) -> Optional[str]:
    """The architecture of :data:`~captum_consistency.builders.ARCHITECTURES` whose tensors
    ``state_dict`` holds (the classifier's size aside), or None. Models are built on the
    ``meta`` device: no memory, no initialisation."""
    from captum_consistency.builders import ARCHITECTURES, build_model

    for name in ARCHITECTURES:
        if name.startswith("regnet_") and not any(k.startswith("trunk_output.") for k in state_dict):
            continue  # RegNets are built on the CPU (their widths need real tensors): only if likely
        try:
            with torch.device("meta"):
                own = build_model(name, 1).state_dict()
        except Exception:  # an architecture that cannot be built this way: not a candidate
            continue
        missing, unexpected, mismatched = _differences(own, state_dict)
        if not missing and not unexpected and len(mismatched) <= 2:  # the classifier's size
            return name
    return None


def load_pretrained_backbone(model: nn.Module, path: str) -> List[str]:
    """Initialises ``model`` from another run's weights, except the tensors whose shape differs.

    For the paper's COCO models, which start from an ImageNet (GC) model: every tensor is
    copied but the classifier (1000 vs 80 outputs). Accepts a checkpoint of
    ``recipes/train.py`` or a bare state dict (e.g. torchvision weights saved to a file).

    Args:
        model (torch.nn.Module): the freshly built model (possibly wrapped).
        path (str): the weights file.

    Returns:
        list of str: the names of the tensors left at their initial values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or weights of another architecture (tensors missing or
            unexpected beyond the classifier).

    Examples::

        >>> coco_model = build_model("resnet18", num_classes=80)
        >>> load_pretrained_backbone(coco_model, "runs/imagenet-gc/checkpoint.pth")
        ['fc.bias', 'fc.weight']
    """

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-from file not found: {path}")
    obj = _torch_load(path, "weights", "cpu")
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return _load_fitting(model, state, path)


def _load_fitting(model: nn.Module, state: Dict[str, Any], source: str) -> List[str]:
    """Copies ``state`` into ``model`` but the (at most two) tensors of another shape, the
    classifier's; returns their names."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    target = unwrap_model(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or len(mismatched) > 2:
        raise ValueError(
            f"weights {source} do not fit {type(target).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:3]}); another architecture?"
        )
    keep = {k: v for k, v in state.items() if k not in mismatched}
    target.load_state_dict(keep, strict=False)
    return mismatched


def torchvision_weights_path(weights: Any) -> str:
    """Where torchvision caches a weights enum's file: ``<torch.hub.get_dir()>/checkpoints/``
    and the file name of its URL (``$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth``).

    Args:
        weights (torchvision.models.WeightsEnum): e.g. ``ResNet50_Weights.IMAGENET1K_V2``.

    Returns:
        str: the cache path, which exists once downloaded (or placed there by hand).
    """
    from urllib.parse import urlparse

    import torch.hub

    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def load_torchvision_weights(model: nn.Module, name: str, arch: str) -> List[str]:
    """Initialises ``model`` from torchvision's pretrained weights, named by their enum.

    The weights are resolved with ``torchvision.models.get_weight(name)`` and read with the
    enum's own ``get_state_dict``, so the download and the cache follow torchvision's rules
    (``$TORCH_HOME/hub/checkpoints``, :func:`torchvision_weights_path`). A classifier of
    another size than the weights' (ImageNet's 1000 classes on a data set of 80) keeps its
    fresh initialisation; its tensor names are returned, like
    :func:`load_pretrained_backbone`'s.

    Args:
        model (torch.nn.Module): the freshly built ``arch`` (possibly wrapped).
        name (str): ``"<Enum>.<member>"``, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``.
        arch (str): the torchvision architecture of ``model`` (``"resnet50"``).

    Returns:
        list of str: the names of the tensors left at their initial values.

    Raises:
        ValueError: ``name`` is not a weights enum of ``arch`` (the message lists those of
            ``torchvision.models.get_model_weights(arch)``), or the weights do not fit.
        RuntimeError: the file is not in the cache and cannot be downloaded (offline): the
            message gives the URL and the path where torchvision expects the file.

    Examples::

        >>> model = build_model("resnet50", num_classes=80)
        >>> load_torchvision_weights(model, "ResNet50_Weights.IMAGENET1K_V2", "resnet50")
        ['fc.bias', 'fc.weight']
    """
    import torchvision

    valid = [f"{w.__class__.__name__}.{w.name}" for w in torchvision.models.get_model_weights(arch)]
    if name not in valid:
        raise ValueError(
            f"--weights {name!r} are not torchvision weights of {arch}: use one of "
            f"{', '.join(valid) or '(none: torchvision has no pretrained weights for it)'}"
        )
    weights = torchvision.models.get_weight(name)
    path = torchvision_weights_path(weights)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, ConnectionError) as err:  # urllib's URLError is an OSError
        raise RuntimeError(
            f"could not download the weights {name} from {weights.url} ({err}); offline, "
            f"download that file elsewhere and put it at {path} (torchvision's cache: "
            "$TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to ~/.cache/torch)"
        ) from err
    return _load_fitting(model, state, f"{name} ({path})")

