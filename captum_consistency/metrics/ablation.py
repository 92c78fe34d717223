r"""Model-level measures on 2x2 composites: what the classifier's *output* reads, whatever any
attribution method says.

A Grad-CAM map can be moved by training without changing what the network relies on (Heo et
al., NeurIPS 2019, "Fooling Neural Network Interpretations via Adversarial Model
Manipulation"). These measures read only the model's outputs under ablation of whole cells of a
composite (Eq. 4 of Pillai & Pirsiavash, AAAI 2021), so they tell whether GC changed the
*model*:

* :func:`cell_ablation_share` -- the counterfactual twin of the Negative Quadrants Heatmap:
  the share of the class score's positive evidence that the three distractor cells carry;
* :func:`own_cell_removed` -- how far the distractors alone carry the decision once the
  image's own cell is replaced.

The four ablations of :func:`cell_ablation_share` run through Captum's
:class:`~captum.attr.FeatureAblation` with the four cells as the feature mask, all four in one
forward pass of ``4 N`` composites (``perturbations_per_eval=4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency._modes import eval_mode
from captum_consistency.composition import NUM_CELLS, cell_rows_cols, check_cells, split_grid

__all__ = [
    "CellAblation",
    "OwnCellRemoved",
    "cell_ablation_share",
    "own_cell_removed",
    "cell_replacement",
    "ABLATION_BASELINES",
]

#: The named replacements of an ablated cell (:func:`cell_replacement`); a tensor shaped like
#: the composites (e.g. a composite of images of other classes) or a number is also accepted.
ABLATION_BASELINES = ("zero", "mean", "blur")

Baseline = Union[str, float, int, Tensor]


@dataclass
class CellAblation:
    """What :func:`cell_ablation_share` returns (one row per composite).

    Attributes:
        share (Tensor): ``(N,)`` share of the positive effects carried by the three distractor
            cells, in [0, 1]; NaN where it is undefined (``undefined``).
        effects (Tensor): ``(N, 4)`` decrease of the class score when cell ``k`` is replaced
            (cell ``k`` at row ``k // 2``, column ``k % 2``); negative where the cell spoke
            against the class.
        undefined (Tensor): ``(N,)`` bool, True where no cell has a positive effect (the score
            does not fall under any ablation): the share is undefined there, and a mean over
            composites must leave these out and count them.
    """

    share: Tensor
    effects: Tensor
    undefined: Tensor

    def mean(self) -> Optional[float]:
        """The mean share over the composites where it is defined (``None`` if none is)."""
        valid = self.share[~self.undefined]
        return float(valid.double().mean()) if valid.numel() else None


@dataclass
class OwnCellRemoved:
    """What :func:`own_cell_removed` returns (one row per composite).

    Attributes:
        probability (Tensor): ``(N,)`` softmax probability of the target once the image's own
            cell is replaced: what the three distractors alone give the class.
        probability_before (Tensor): ``(N,)`` the same on the intact composite.
        predicted (Tensor): ``(N,)`` bool, the target is still the arg-max class without its
            own cell.
    """

    probability: Tensor
    probability_before: Tensor
    predicted: Tensor


def _check_inputs(composites: Tensor, cells: Tensor, targets: Tensor) -> None:
    if not isinstance(composites, Tensor) or composites.dim() != 4:
        raise ValueError(
            "composites must be a (N, C, H, W) tensor of 2x2 composites, got "
            f"{tuple(composites.shape) if isinstance(composites, Tensor) else type(composites).__name__}")
    if not composites.dtype.is_floating_point:
        raise TypeError(f"composites must be a floating-point tensor, got dtype {composites.dtype}")
    n, _, h, w = composites.shape
    if h % 2 or w % 2:
        raise ValueError(f"composites must have an even height and width (2x2 cells), got {h}x{w}")
    check_cells(cells, n)
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a (N,) LongTensor of classes, got {type(targets).__name__}")
    if targets.dim() != 1:
        raise ValueError(
            "targets must be single-label: a (N,) tensor of class indices, got shape "
            f"{tuple(targets.shape)} (for multi-hot targets, pass the class to explain, e.g. "
            "captum_consistency.data.sample_present_classes(targets))")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape[0] != n:
        raise ValueError(f"targets must have {n} entries (one per composite), got {targets.shape[0]}")


def _check_classes(targets: Tensor, num_classes: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must be class indices in [0, {num_classes - 1}] (the model has "
            f"{num_classes} outputs), got values in [{int(targets.min())}, {int(targets.max())}]")


def _logits_of(output: object) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise TypeError(
            "the model must return (N, num_classes) logits, got "
            f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}")
    return output


def cell_replacement(composites: Tensor, baseline: Baseline = "zero") -> Union[Tensor, float]:
    """What replaces an ablated cell: a number, or a tensor shaped like ``composites``.

    Args:
        composites (Tensor): ``(N, C, H, W)`` 2x2 composites (even ``H`` and ``W``).
        baseline (str, float or Tensor):

            * ``"zero"`` (or ``0``): zeros. For inputs normalised by the data set's mean and
              standard deviation, as torchvision's and this library's transforms give them, this
              is the data set's mean colour: a cell with no content at all. The reports use it.
            * ``"mean"``: each cell's own per-channel mean (the cell's average colour is kept,
              its structure removed).
            * ``"blur"``: each cell blurred on its own (Gaussian, sigma an eighth of the cell
              side, :func:`torchvision.transforms.functional.gaussian_blur`), so that no colour
              leaks across the cell borders.
            * a number: a constant.
            * a tensor shaped like ``composites``: the replacement pixels, e.g. a composite of
              images of other classes (cell ``k`` of it replaces cell ``k``).

    Returns:
        A float, or a tensor ``(N, C, H, W)`` on ``composites``' device.
    """
    if isinstance(baseline, Tensor):
        if baseline.shape != composites.shape:
            raise ValueError(
                f"a baseline tensor must be shaped like the composites {tuple(composites.shape)}, "
                f"got {tuple(baseline.shape)}")
        return baseline.to(device=composites.device, dtype=composites.dtype)
    if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
        raise TypeError(f"baseline must be one of {ABLATION_BASELINES}, a number or a tensor, "
                        f"got {type(baseline).__name__}")
    if not isinstance(baseline, str):
        value = float(baseline)
        if not torch.isfinite(torch.tensor(value)):
            raise ValueError(f"a numeric baseline must be finite, got {baseline}")
        return value
    if baseline == "zero":
        return 0.0
    if baseline not in ABLATION_BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {ABLATION_BASELINES}, "
                         "a number or a tensor")
    by_cell = split_grid(composites)  # (N, 4, C, h, w)
    n, _, c, h, w = by_cell.shape
    if baseline == "mean":
        filled = by_cell.mean(dim=(-2, -1), keepdim=True).expand_as(by_cell)
    else:
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(h, w) / 8.0
        kernel = 2 * int(round(2 * sigma)) + 1
        # reflect padding needs the kernel's half width below the side
        kernel = min(kernel, 2 * ((min(h, w) - 1) // 2) + 1)
        filled = gaussian_blur(by_cell.reshape(n * NUM_CELLS, c, h, w), [kernel, kernel],
                               [sigma, sigma]).reshape(by_cell.shape)
    # back to the grid layout: the inverse of split_grid's reshape
    return filled.reshape(n, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(composites.shape)


def _cell_feature_mask(height: int, width: int, device: torch.device) -> Tensor:
    """``(1, 1, H, W)`` int64: the cell index of every pixel (Captum's feature mask)."""
    rows = (torch.arange(height, device=device) >= height // 2).long()
    cols = (torch.arange(width, device=device) >= width // 2).long()
    return (2 * rows.view(-1, 1) + cols.view(1, -1)).view(1, 1, height, width)


def _score_function(model: nn.Module, score: str) -> Callable[[Tensor], Tensor]:
    if score == "logit":
        return lambda x: _logits_of(model(x))
    if score == "probability":
        return lambda x: F.softmax(_logits_of(model(x)).float(), dim=1)
    raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")


def _chunks(n: int, batch_size: Optional[int]):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    step = n if batch_size is None else batch_size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(n, start + step))


def cell_ablation_share(
    model: nn.Module,
    composites: Tensor,
    cells: Tensor,
    targets: Tensor,
    baseline: Baseline = "zero",
    score: str = "logit",
    batch_size: Optional[int] = None,
) -> CellAblation:
    r"""The share of a class's evidence that the distractor cells of a composite carry.

    Each of the four cells of composite ``c`` is replaced in turn (``baseline``); the decrease
    of the class score ``s`` is that cell's effect,
    :math:`e_j = s(c) - s(c \text{ with cell } j \text{ replaced})`. With ``k`` the image's own
    cell and :math:`e^+ = \max(e, 0)`,

    .. math::

        \mathrm{share} = \frac{\sum_{j \ne k} e_j^+}{\sum_{j} e_j^+}

    0 means the distractors add no evidence for the class (what GC asks of the Grad-CAM map,
    asked here of the model); 0.75 is what a model that reads the four cells alike gives. Where
    no cell has a positive effect the share is undefined: NaN, flagged in ``undefined``, to be
    counted and left out of a mean (:meth:`CellAblation.mean`).

    The ablations are Captum's :class:`~captum.attr.FeatureAblation` with the four cells as the
    feature mask, run together (``perturbations_per_eval=4``): one forward pass of the intact
    composites and one of the ``4 N`` ablated ones per chunk of ``batch_size``. The model is
    evaluated in eval mode and its mode restored: batch-norm statistics are never changed.

    Args:
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)`` logits.
        composites (Tensor): ``(N, C, H, W)`` 2x2 composites (even ``H``, ``W``), e.g. from
            :func:`~captum_consistency.compose_grid`.
        cells (Tensor): ``(N,)`` integer cell of the image that holds the class, in 0..3.
        targets (Tensor): ``(N,)`` the class of each composite (single-label; a multi-hot
            target is refused: pass the class to explain).
        baseline (str, float or Tensor): the replacement of an ablated cell
            (:func:`cell_replacement`): ``"zero"`` (the data set's mean colour for normalised
            inputs; the default and what the reports use), ``"mean"``, ``"blur"``, a number or
            a tensor shaped like ``composites``.
        score (str): ``"logit"`` (the class's logit) or ``"probability"`` (its softmax
            probability).
        batch_size (int, optional): composites per chunk (each chunk runs ``4 x batch_size``
            ablated composites in one forward); ``None`` takes all at once.

    Returns:
        CellAblation: ``share`` ``(N,)``, ``effects`` ``(N, 4)`` and ``undefined`` ``(N,)``.

    Examples::

        >>> grid, cells = compose_grid(images, distractors, return_cells=True)
        >>> result = cell_ablation_share(model, grid, cells, labels)
        >>> result.mean(), int(result.undefined.sum())
    """
    from captum.attr import FeatureAblation

    _check_inputs(composites, cells, targets)
    cell_replacement(composites[:0], baseline[:0] if isinstance(baseline, Tensor) and
                     baseline.shape == composites.shape else baseline)  # checks the baseline
    n, _, h, w = composites.shape
    device = composites.device
    cells = cells.to(device)
    targets = targets.to(device)
    mask = _cell_feature_mask(h, w, device)
    # one pixel per cell: its top-left corner
    rows, cols = cell_rows_cols(torch.arange(NUM_CELLS, device=device))
    ys, xs = rows * (h // 2), cols * (w // 2)
    effects = composites.new_empty((n, NUM_CELLS), dtype=torch.float32)
    with eval_mode(model), torch.no_grad():
        forward = _score_function(model, score)
        ablation = FeatureAblation(forward)
        checked = False
        for part in _chunks(n, batch_size):
            x = composites[part]
            if not checked:
                _check_classes(targets, forward(x[:1]).shape[1])
                checked = True
            base = cell_replacement(x, baseline[part] if isinstance(baseline, Tensor) else baseline)
            attr = ablation.attribute(x, baselines=base, target=targets[part], feature_mask=mask,
                                      perturbations_per_eval=NUM_CELLS)
            effects[part] = attr[:, 0, ys, xs].float()
    positive = effects.clamp(min=0)
    total = positive.sum(dim=1)
    own = positive.gather(1, cells.view(-1, 1)).squeeze(1)
    undefined = ~(total > 0)
    share = torch.where(undefined, torch.full_like(total, float("nan")),
                        (total - own) / torch.where(undefined, torch.ones_like(total), total))
    return CellAblation(share=share, effects=effects, undefined=undefined)


def own_cell_removed(
    model: nn.Module,
    composites: Tensor,
    cells: Tensor,
    targets: Tensor,
    baseline: Baseline = "zero",
    batch_size: Optional[int] = None,
) -> OwnCellRemoved:
    r"""The class probability, and whether the class is still predicted, once the image's own
    cell of each composite is replaced: how far the three distractors alone carry the decision.

    A model that uses only the object gives the class no more than chance without its cell
    (the distractors hold other classes by construction). One forward pass of the intact and
    one of the ablated composites per chunk; eval mode, the model's mode restored.

    Args:
        model (torch.nn.Module): the classifier.
        composites (Tensor): ``(N, C, H, W)`` 2x2 composites.
        cells (Tensor): ``(N,)`` the image's own cell, in 0..3.
        targets (Tensor): ``(N,)`` its class (single-label).
        baseline (str, float or Tensor): the replacement of the own cell, as in
            :func:`cell_ablation_share` (:func:`cell_replacement`).
        batch_size (int, optional): composites per forward pass (``None``: all).

    Returns:
        OwnCellRemoved: ``probability``, ``probability_before`` and ``predicted``, ``(N,)`` each.

    Examples::

        >>> removed = own_cell_removed(model, grid, cells, labels)
        >>> removed.predicted.float().mean()   # share still predicted from the distractors
    """
    _check_inputs(composites, cells, targets)
    n, _, h, w = composites.shape
    device = composites.device
    cells = cells.to(device)
    targets = targets.to(device)
    mask = _cell_feature_mask(h, w, device)  # (1, 1, H, W)
    prob = composites.new_empty(n, dtype=torch.float32)
    before = composites.new_empty(n, dtype=torch.float32)
    predicted = torch.empty(n, dtype=torch.bool, device=device)
    with eval_mode(model), torch.no_grad():
        for part in _chunks(n, batch_size):
            x, t = composites[part], targets[part]
            base = cell_replacement(x, baseline[part] if isinstance(baseline, Tensor) else baseline)
            own = mask == cells[part].view(-1, 1, 1, 1)
            ablated = torch.where(own, base if isinstance(base, Tensor) else x.new_tensor(base), x)
            logits = _logits_of(model(torch.cat([x, ablated]))).float()
            if part.start == 0:
                _check_classes(targets, logits.shape[1])
            p = F.softmax(logits, dim=1).gather(1, torch.cat([t, t]).view(-1, 1)).squeeze(1)
            m = x.shape[0]
            before[part], prob[part] = p[:m], p[m:]
            predicted[part] = logits[m:].argmax(dim=1) == t
    return OwnCellRemoved(probability=prob, probability_before=before, predicted=predicted)
