"""What the three recipes share on the command line: the data options and the up-front checks.

``recipes/train.py``, ``recipes/evaluate.py`` and ``recipes/robustness.py`` take one set of
data options (:func:`add_data_arguments`), so that the same ``--data ... --data-root ...``
line works with all three; an option a recipe does not use is accepted, ignored, and marked
so in its ``--help``. :func:`check_input_size` refuses an image size or batch size that the
architecture cannot run before any data is read, with the smallest value that works.

Every check a recipe makes before it trains or evaluates ends as argparse's usage error (the
usage line, the message, exit status 2, no traceback): numbers are checked by the option's
type (:func:`positive_int`, :func:`positive_float`, :func:`non_negative_float`,
:func:`non_negative_int`, :func:`probability`; none accepts NaN or infinity), output folders by
:func:`writable_dir`, and the checks that need the data or the checkpoint run inside
:func:`run_cli` until the recipe calls :func:`end_of_checks`.
"""

from __future__ import annotations

import argparse
import contextvars
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from captum_consistency.builders import ARCHITECTURES, build_model, is_timm_arch
from captum_consistency.engine.datasets import DATA_KINDS

__all__ = [
    "RECIPES",
    "positive_int",
    "non_negative_int",
    "architecture",
    "unit_fraction",
    "positive_float",
    "non_negative_float",
    "probability",
    "writable_dir",
    "run_cli",
    "end_of_checks",
    "add_data_arguments",
    "check_input_size",
]

#: The recipes that share :func:`add_data_arguments`.
RECIPES: Tuple[str, ...] = ("train", "evaluate", "robustness")
_ALL = frozenset(RECIPES)
# Image sides tried when searching the smallest one an architecture accepts.
_MAX_SIDE = 4096


def recipe_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser of a recipe: its description, defaults shown in ``--help``.

    Args:
        description (str): what the recipe does.
        add_help (bool): add ``-h/--help`` (False to embed the parser in another one).

    Returns:
        argparse.ArgumentParser
    """
    return argparse.ArgumentParser(description=description, add_help=add_help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def positive_int(text: str) -> int:
    """``argparse`` type of an integer option that must be at least 1 (``--epochs``).

    Args:
        text (str): the command-line value.

    Returns:
        int: the value.

    Raises:
        argparse.ArgumentTypeError: not an integer, or smaller than 1; argparse turns it into
            a usage error naming the option.

    Examples::

        >>> parser.add_argument("--epochs", type=positive_int)
        >>> parser.parse_args(["--epochs", "0"])  # error: argument --epochs: must be >= 1, got 0
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """``argparse`` type of an integer option that must be at least 0 (``--workers``).

    Args:
        text (str): the command-line value.

    Returns:
        int: the value.

    Raises:
        argparse.ArgumentTypeError: not an integer, or negative.

    Examples::

        >>> parser.add_argument("--workers", type=non_negative_int)
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def architecture(text: str) -> str:
    """``argparse`` type of ``--arch``: a name of :data:`~captum_consistency.builders.ARCHITECTURES`
    or ``timm:<name>``, a timm model of the ResNet, ConvNeXt, EfficientNet or RegNet classes.

    A timm name is built once on the ``meta`` device (no memory, no weights) to check that
    timm is installed, knows the name and that its class has default layers.

    Args:
        text (str): the command-line value.

    Returns:
        str: the value.

    Raises:
        argparse.ArgumentTypeError: an unknown name, a timm name without timm installed or of
            another class; argparse turns it into a usage error naming the option.

    Examples::

        >>> parser.add_argument("--arch", type=architecture)
        >>> parser.parse_args(["--arch", "timm:convnext_atto"]).arch
        'timm:convnext_atto'
    """
    if is_timm_arch(text):
        try:
            with torch.device("meta"):
                build_model(text, 2)
        except (ImportError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    if text not in ARCHITECTURES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(ARCHITECTURES)}, or timm:<name> "
            "for a timm ResNet, ConvNeXt, EfficientNet or RegNet)"
        )
    return text


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """``argparse`` type of a fraction in ``(0, 1]`` (``--gc-fraction``).

    Args:
        text (str): the command-line value.

    Returns:
        float: the value.

    Raises:
        argparse.ArgumentTypeError: not a number, or outside ``(0, 1]``; argparse turns it
            into a usage error naming the option.

    Examples::

        >>> parser.add_argument("--gc-fraction", type=unit_fraction)
        >>> parser.parse_args(["--gc-fraction", "0"])  # error: ... must be in (0, 1], got 0.0
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type of a finite number ``> 0`` (``--lr``, ``--lr-gamma``).

    Args:
        text (str): the command-line value.

    Returns:
        float: the value.

    Raises:
        argparse.ArgumentTypeError: not a number, NaN, infinite, or ``<= 0``.

    Examples::

        >>> parser.add_argument("--lr-gamma", type=positive_float)
        >>> parser.parse_args(["--lr-gamma", "-1"])  # error: argument --lr-gamma: must be > 0
    """
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """``argparse`` type of a finite number ``>= 0`` (``--gc-lambda``, ``--weight-decay``).

    Args:
        text (str): the command-line value.

    Returns:
        float: the value.

    Raises:
        argparse.ArgumentTypeError: not a number, NaN, infinite, or negative.

    Examples::

        >>> parser.add_argument("--gc-lambda", type=non_negative_float)
        >>> parser.parse_args(["--gc-lambda", "nan"])  # error: must be a finite number
    """
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """``argparse`` type of a number in ``[0, 1]`` (``--synthetic-cue-strength``).

    Args:
        text (str): the command-line value.

    Returns:
        float: the value.

    Raises:
        argparse.ArgumentTypeError: not a number, NaN, or outside ``[0, 1]``.

    Examples::

        >>> parser.add_argument("--synthetic-cue-strength", type=probability)
    """
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def writable_dir(text: str) -> str:
    """``argparse`` type of an output folder: checked before the recipe runs, not after.

    The folder need not exist; it must not be a file, and its nearest existing ancestor must be
    a folder this process can write into (so that the results of a long evaluation are not
    lost when they are written). Nothing is created.

    Args:
        text (str): the command-line value.

    Returns:
        str: the path, unchanged.

    Raises:
        argparse.ArgumentTypeError: empty, a file (or under one), or not writable.

    Examples::

        >>> parser.add_argument("--output-dir", type=writable_dir, required=True)
    """
    if not text:
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
    path = os.path.abspath(text)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise argparse.ArgumentTypeError(f"{text!r} {where}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {probe} (permission denied)")
    return text


# Set while run_cli runs a recipe's checks: {"checking": bool}.
_CHECKING: contextvars.ContextVar[Optional[Dict[str, bool]]] = contextvars.ContextVar(
    "captum_consistency_recipe_checks", default=None
)
#: What a check before training or evaluating raises; run_cli turns these into usage errors.
_CHECK_ERRORS = (ValueError, OSError)


def end_of_checks() -> None:
    """Marks the end of a recipe's checks: from here on, :func:`run_cli` lets errors through.

    A recipe calls it once its options, data and checkpoint have been checked, just before
    training (or evaluating). Outside :func:`run_cli` it does nothing.
    """
    state = _CHECKING.get()
    if state is not None:
        state["checking"] = False


def run_cli(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], Any],
    argv: Optional[Sequence[str]] = None,
) -> Any:
    """Runs a recipe's ``main`` on the command line: every check before the work is a usage error.

    Parses ``argv`` (``sys.argv`` when ``None``) with ``parser``, then runs ``main(args)``. A
    ``ValueError`` or ``OSError`` raised before ``main`` calls :func:`end_of_checks` (a size
    the architecture cannot run, a missing data folder or checkpoint, an existing checkpoint
    without ``--resume``) ends as ``parser.error``: the usage line, ``error: <message>`` and
    exit status 2, without a traceback. Errors after that point (during training) propagate
    with their traceback, as genuine failures do.

    Args:
        parser (argparse.ArgumentParser): the recipe's parser.
        main (Callable): the recipe's ``main(args)``.
        argv (sequence of str, optional): the arguments; ``None`` reads ``sys.argv``.

    Returns:
        what ``main`` returns.

    Raises:
        SystemExit: status 2 for a bad option, as argparse does.

    Examples::

        >>> if __name__ == "__main__":
        ...     run_cli(get_args_parser(), main)
    """
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    state = {"checking": True}
    token = _CHECKING.set(state)
    try:
        return main(args)
    except _CHECK_ERRORS as e:
        if not state["checking"]:
            raise
        parser.error(str(e).strip() or type(e).__name__)
    finally:
        _CHECKING.reset(token)


def add_data_arguments(parser: argparse.ArgumentParser, recipe: str) -> argparse._ArgumentGroup:
    """Adds the data options shared by the recipes to ``parser``, as one argument group.

    Every recipe accepts every option; the help of an option that ``recipe`` does not use ends
    with ``[ignored by <recipe>.py]``. In ``train`` the options describe the data to train on
    (``--data`` is required); in ``evaluate`` and ``robustness`` those left unset are taken
    from the checkpoint (:func:`~captum_consistency.engine.datasets.resolve_data_args`).

    Args:
        parser (argparse.ArgumentParser): the recipe's parser.
        recipe (str): ``"train"``, ``"evaluate"`` or ``"robustness"``.

    Returns:
        argparse._ArgumentGroup: the group, to which the recipe may add its own data options.

    Raises:
        ValueError: unknown ``recipe``.

    Examples::

        >>> parser = argparse.ArgumentParser()
        >>> group = add_data_arguments(parser, "robustness")
        >>> args = parser.parse_args(["--data", "imagenet", "--boxes", "boxes/val"])  # accepted
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    train = recipe == "train"
    group = parser.add_argument_group(
        "data",
        "the same options in train.py, evaluate.py and robustness.py; those marked "
        f"[ignored by {recipe}.py] are accepted so that one command line serves all three",
    )

    def add(*flags: str, used_by=_ALL, help: str, **kwargs) -> None:
        if recipe not in used_by:
            help = f"{help} [ignored by {recipe}.py]"
        group.add_argument(*flags, help=help, **kwargs)

    saved = "" if train else " (default: the checkpoint's)"
    add("--data", required=train, default=None, choices=DATA_KINDS, help="data set kind" + saved)
    add("--data-root", default=None, type=_non_empty,
        help="ImageNet: folder of the split folders of <class>/<image> files; COCO: folder of "
        "the split folders and annotations/" + saved)
    add("--boxes", default=None, used_by={"train", "evaluate"},
        help="ImageNet: folder of the evaluated split's bounding-box XMLs (train.py: of the "
        "validation split, for the per-epoch PG and CH of --log-subset)")
    add("--train-boxes", default=None, used_by={"train"},
        help="ImageNet: folder of the training split's bounding-box XMLs, the object masks of "
        "a mask-guided --loss (train.py)")
    add("--ann-file", default=None, used_by={"train", "evaluate"},
        help="COCO: annotations of the training split (train.py) or of the evaluated split "
        "(evaluate.py); default <root>/annotations/instances_<split>.json")
    add("--val-ann-file", default=None, used_by={"train"},
        help="COCO: annotations of the per-epoch validation split")
    add("--train-split", default=None, used_by={"train"},
        help="training split (imagenet: train, coco: train2014)")
    add("--val-split", default=None, used_by={"train"},
        help="per-epoch validation split (imagenet: val, coco: val2014)")
    add("--split", default=None, used_by={"evaluate", "robustness"},
        help="evaluated split (imagenet: val, coco: val2014, synthetic: test)")
    add("--skip-corrupt", action="store_true",
        help="skip (and count) undecodable images instead of stopping with an error")
    add("--skip-missing-boxes", action="store_true", used_by={"train", "evaluate"},
        help="ImageNet: skip (and count) images without a usable XML instead of stopping")
    add("--allow-empty-classes", action="store_true",
        help="ImageNet: keep class folders that hold no image (their indices unchanged) "
        "instead of stopping")
    synthetic_saved = "" if train else "; default: the checkpoint's"
    add("--synthetic-classes", default=4 if train else None, type=positive_int,
        help="synthetic: number of classes" + synthetic_saved)
    add("--synthetic-train-length", default=10000 if train else None, type=positive_int,
        used_by={"train"}, help="synthetic: training images")
    add("--synthetic-val-length", default=1000 if train else None, type=positive_int,
        help="synthetic: validation images (train.py), evaluated images (evaluate.py, "
        "robustness.py)" + synthetic_saved)
    add("--synthetic-cue-strength", default=0.9 if train else None, type=probability,
        help="synthetic: probability that the context cue matches the class" + synthetic_saved)
    add("--synthetic-seed", default=0 if train else None, type=int,
        help="synthetic: generator seed" + synthetic_saved)
    return group


def _min_side(runs: Callable[[int], bool], start: int) -> Optional[int]:
    """The smallest side ``s >= 1`` with ``runs(s)``, given ``runs(start)`` is False (bisection)."""
    lo, hi = start, None  # runs(lo) is False
    side = max(2 * start, 8)
    while side <= _MAX_SIDE:
        if runs(side):
            hi = side
            break
        lo, side = side, 2 * side
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


def check_input_size(
    arch: str,
    image_size: int,
    batch_size: int = 1,
    *,
    train: bool = True,
    gmp: bool = False,
    gc: bool = False,
) -> int:
    """Checks that ``arch`` runs on ``image_size x image_size`` images, before data is read.

    The model is built on the ``meta`` device (no memory, no computation) and run once on a
    batch of that size; what fails there fails in the first step of a run, after the data has
    been indexed. Two limits are found this way: the input side below which a pooling or
    convolution has nothing left (AlexNet: 63 pixels), and, in training mode, batch norm on
    ``1 x 1`` maps with one image (one value per channel: ResNets below 33 pixels). With
    ``gc``, a third: the GC loss compares each image's map with its cell of the composite's
    map, so the Grad-CAM layer's map of a ``2S x 2S`` composite must give each of the four
    cells at least ``2 x 2`` locations (``4 x 4`` in all). Below that (ResNet-18: 49 pixels) the
    maps are ``1 x 1`` per cell, their normalised values constant, and the consistency term
    and its gradient vanish: the run would train a plain classifier while reporting a GC run.

    Args:
        arch (str): an architecture of :func:`~captum_consistency.builders.build_model`.
        image_size (int): the side ``S`` (``--image-size``); composites are ``2S`` and pass
            wherever ``S`` does.
        batch_size (int): images per process (``--batch-size``).
        train (bool): training mode (batch norm normalises with the batch's statistics).
        gmp (bool): global max pooling (ResNets).
        gc (bool): the run trains with the GC loss (``--gc-lambda > 0``): check the composite's
            Grad-CAM map as above.

    Returns:
        int: the smallest batch that trains at this size (``1``, or ``2`` when some batch norm
        sees ``1 x 1`` maps): pass it to
        :func:`~captum_consistency.engine.train_one_epoch` as ``min_batch_size``, so that a
        batch that ``--skip-corrupt`` shrinks below it is skipped. ``1`` when ``train`` is
        False.

    Raises:
        ValueError: the size or the batch cannot work (or, with ``gc``, leaves a cell of the
            composite's map less than 2x2 locations); the message names the option and the
            smallest value that works.

    Examples::

        >>> check_input_size("resnet18", 224, 32)
        1
        >>> check_input_size("alexnet", 32)  # ValueError: --image-size 32 is too small for
        ...                                  # alexnet: it needs at least 63 pixels ...
        >>> check_input_size("resnet18", 40, 4, gc=True)  # ValueError: ... at least 49 pixels
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"--image-size must be a positive int, got {image_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size!r}")
    with torch.device("meta"):
        model = build_model(arch, 2, gmp=gmp)
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen: Dict[int, int] = {}
    errors: Dict[int, str] = {}

    def record(module: nn.Module, inputs, output) -> None:
        seen[id(module)] = min(seen.get(id(module), 1 << 62), inputs[0][0, 0].numel())

    def smallest_norm_map(side: int) -> Optional[int]:
        """Values per channel and image at the smallest batch norm; None if the model fails."""
        seen.clear()
        try:
            with torch.no_grad():
                model(torch.empty(1, 3, side, side, device="meta"))
        except (RuntimeError, ValueError) as e:
            lines = str(e).strip().splitlines()
            errors[side] = lines[0] if lines else type(e).__name__
            return None
        return min(seen.values(), default=1 << 62)

    handles = [m.register_forward_hook(record) for m in norms]
    try:
        values = smallest_norm_map(image_size)
        if values is None:
            least = _min_side(lambda s: smallest_norm_map(s) is not None, image_size)
            need = f"at least {least} pixels" if least else f"more than {_MAX_SIDE} pixels"
            raise ValueError(
                f"--image-size {image_size} is too small for {arch}: it needs {need} "
                f"({errors[image_size]})"
            )
        if gc:
            _check_gc_map(model, arch, image_size, smallest_norm_map)
        if not train or values > 1:
            return 1
        if batch_size >= 2:
            return 2
        least = _min_side(lambda s: (smallest_norm_map(s) or 0) > 1, image_size)
        raise ValueError(
            f"--batch-size {batch_size} with --image-size {image_size} cannot train {arch}: its "
            "last batch norm sees 1x1 maps, one value per channel, which cannot be normalised; "
            f"use --batch-size 2 or more, or --image-size {least} or more"
        )
    finally:
        for h in handles:
            h.remove()


def _check_gc_map(model: nn.Module, arch: str, image_size: int, runs: Callable[[int], Optional[int]]) -> None:
    """Refuses a side ``S`` whose composite's Grad-CAM map leaves a cell under 2x2 locations."""
    from captum_consistency.builders import gradcam_layer

    layer = gradcam_layer(model)
    sizes: List[Tuple[int, int]] = []
    handle = layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))

    def cell_side(side: int) -> int:
        """Locations per cell side of the composite's map at image side ``side`` (0: fails)."""
        sizes.clear()
        if runs(2 * side) is None or not sizes:
            return 0
        return min(sizes[-1]) // 2

    try:
        per_cell = cell_side(image_size)
        if per_cell >= 2:
            return
        least = _min_side(lambda s: runs(s) is not None and cell_side(s) >= 2, image_size)
        need = f"at least {least} pixels" if least else f"more than {_MAX_SIDE} pixels"
        raise ValueError(
            f"--image-size {image_size} is too small for the GC loss with {arch}: the Grad-CAM "
            f"map of a {2 * image_size}x{2 * image_size} composite gives each cell {per_cell}x"
            f"{per_cell} location(s), and the consistency term needs at least 2x2 (below, it "
            f"and its gradient vanish); {arch} needs {need} (or --gc-lambda 0 for a baseline)"
        )
    finally:
        handle.remove()


def load_evaluated_checkpoint(args: argparse.Namespace, device: torch.device):
    """The model of ``--checkpoint`` and the data options of an evaluating recipe.

    Builds the checkpoint's model with its weights on ``device``, takes the data options left
    unset in ``args`` from the checkpoint
    (:func:`~captum_consistency.engine.datasets.resolve_data_args`) and checks that the
    architecture runs at that image size (:func:`check_input_size`), before any data is read.

    Args:
        args (argparse.Namespace): the recipe's options (``checkpoint``, the data options).
        device (torch.device): where the model goes.

    Returns:
        tuple: ``(model, checkpoint, (data, data_root, image_size, split, synthetic))``.
    """
    from captum_consistency.engine.datasets import load_model_from_checkpoint, resolve_data_args

    model, ckpt = load_model_from_checkpoint(args.checkpoint, device)
    resolved = resolve_data_args(args, ckpt)
    check_input_size(ckpt["arch"], resolved[2], train=False, gmp=bool(ckpt.get("gmp")))
    return model, ckpt, resolved
