"""The training loop (single process or DistributedDataParallel) and the paper's schedules.

One GC training step (Pillai & Pirsiavash, AAAI 2021, Eq. 5) is: draw one regularised class
per image (the label, or for multi-label data one of the positive labels), three distractors
whose labels exclude it (:func:`captum_consistency.data.gather_distractors` takes them from the
batch itself, on the device), a random cell per image, and call
:class:`captum_consistency.GradCamConsistencyLoss`, which builds the ``2S x 2S`` composites,
runs the model on the images and on the composites and returns the classification and
consistency terms. With ``loss_fn=None`` (``--gc-lambda 0``) the step is a plain
classification step: no composite is built or forwarded.

Everything per step stays on the device: running sums are tensors
(:class:`~captum_consistency.metrics.ClassificationMeter`), read on the host only every
``log_every`` steps and at the end of the epoch (one all-reduce under torchrun).

The optimizer and the learning-rate schedule are torch's own, built from a :class:`Schedule`
(``torch.optim.SGD`` and, per epoch, ``torch.optim.lr_scheduler.MultiStepLR``); a per-step
schedule is passed to :func:`train_one_epoch` as ``lr_scheduler``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from captum_consistency.composition import random_cells
from captum_consistency.engine.batches import TrainBatch, as_train_batch
from captum_consistency.engine.distributed import (
    all_ranks_true,
    all_reduce_sum,
    get_world_size,
    is_main_process,
)
from captum_consistency.losses.classification import ScaledBCEWithLogitsLoss  # noqa: F401  (exported here too)
from captum_consistency.metrics import ClassificationMeter

__all__ = [
    "Schedule",
    "default_schedule",
    "finetune_schedule",
    "ScaledBCEWithLogitsLoss",
    "sample_positive_class",
    "train_one_epoch",
]


@dataclass
class Schedule:
    """Optimisation hyper-parameters of a recipe.

    Attributes:
        lr: initial learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        epochs: number of epochs.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: decay factor.
        gc_lambda: weight of the consistency term.
        cls_weight: factor on the classification loss (80 for COCO's BCE).
        batch_size: global batch size of the paper (divided among torchrun ranks by the user).

    Examples::

        >>> schedule = Schedule(lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=30,
        ...                     milestones=[10, 20], gc_lambda=10.0)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr,
        ...                             momentum=schedule.momentum,
        ...                             weight_decay=schedule.weight_decay)
        >>> scheduler = torch.optim.lr_scheduler.MultiStepLR(  # stepped once per epoch
        ...     optimizer, milestones=schedule.milestones, gamma=schedule.gamma)
    """

    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    gc_lambda: float = 25.0
    cls_weight: float = 1.0
    batch_size: int = 256


def default_schedule(data: str, arch: str) -> Schedule:
    """The paper's schedules (Sec. 4.4) and the authors' COCO recipe.

    * ImageNet (and ``synthetic``, which is single-label): SGD, momentum 0.9, weight decay
      1e-4, lr 0.1 (0.01 for AlexNet) divided by 10 every 30 epochs, 90 epochs, batch 256,
      lambda 25, cross-entropy.
    * COCO (the authors' ``train_gcam_multiclass_grid_consistency.py`` and README): the
      classification loss is ``80 * BCEWithLogits`` (i.e. the sum over the 80 categories),
      lambda 1, SGD lr 0.01, momentum 0.9, weight decay 5e-4, 36 epochs, lr divided by 10 at
      epochs 24 and 30, batch 256, initialised from an ImageNet (GC) model (``--init-from``).

    Args:
        data (str): ``"imagenet"``, ``"coco"`` or ``"synthetic"``.
        arch (str): ``"resnet18"``, ``"resnet50"`` or ``"alexnet"``.

    Returns:
        Schedule

    Examples::

        >>> default_schedule("imagenet", "alexnet").lr
        0.01
    """
    if data == "coco":
        return Schedule(
            lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=36, milestones=[24, 30],
            gamma=0.1, gc_lambda=1.0, cls_weight=80.0, batch_size=256,
        )
    if data in ("imagenet", "synthetic"):
        return Schedule(
            lr=0.01 if arch == "alexnet" else 0.1, momentum=0.9, weight_decay=1e-4, epochs=90,
            milestones=[30, 60], gamma=0.1, gc_lambda=25.0, cls_weight=1.0, batch_size=256,
        )
    raise ValueError(f"data must be 'imagenet', 'coco' or 'synthetic', got {data!r}")


#: Fine-tuning length as a share of the from-scratch schedule's epochs (measured on the
#: quickstart's ``shapes`` benchmark: one GC epoch after 14; docs/results.md, "Fine-tuning and
#: partial GC").
FINETUNE_SHARE = 1 / 14
#: Fine-tuning lambda over the from-scratch one (measured there: 64 against 8).
FINETUNE_LAMBDA_FACTOR = 8.0


def finetune_schedule(data: str, arch: str) -> Schedule:
    """The fine-tuning schedule of a trained model with the GC loss (``recipes/train.py
    --weights``, ``--schedule finetune``).

    The from-scratch schedule of :func:`default_schedule` with :data:`FINETUNE_SHARE` of its
    epochs (ImageNet 6 of 90, COCO 3 of 36), its initial learning rate decayed by a cosine to
    0 over them (``torch.optim.lr_scheduler.CosineAnnealingLR``, stepped per epoch) instead of
    the milestones, and :data:`FINETUNE_LAMBDA_FACTOR` times its lambda (ImageNet 200, COCO 8);
    momentum, weight decay and the classification loss are the paper's.

    This is the rule of the best setting measured on the quickstart's ``shapes`` benchmark
    (one GC epoch after 14 plain ones, at the from-scratch peak lr, lambda 64 instead of 8:
    NQH 45% lower than the baseline's for 1.2x its training; a fifth of the lr moved NQH by 1
    point). The ImageNet and COCO values are that rule carried over, **not measured** there:
    watch the validation top-1 after the first epoch and lower ``--lr`` or ``--gc-lambda``
    if it drops.

    Args:
        data (str): ``"imagenet"``, ``"coco"`` or ``"synthetic"``.
        arch (str): the architecture (AlexNet's lower lr carries over).

    Returns:
        Schedule: with ``milestones=[]``.

    Examples::

        >>> s = finetune_schedule("imagenet", "resnet50")
        >>> s.lr, s.epochs, s.gc_lambda
        (0.1, 6, 200.0)
    """
    s = default_schedule(data, arch)
    s.epochs = max(1, round(s.epochs * FINETUNE_SHARE))
    s.milestones = []
    s.gc_lambda = s.gc_lambda * FINETUNE_LAMBDA_FACTOR
    return s


def sample_positive_class(targets: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One positive class per row of a multi-hot matrix, uniformly among the positives.

    This is the class whose Grad-CAM is regularised for a multi-label image (the authors pick
    one ground-truth category at random). The same draw as
    :func:`captum_consistency.data.sample_present_classes`, which ``--distractors dataset``
    uses: a row without any positive (an image without annotations) draws uniformly among all
    classes. The draw happens on the generator's device.

    Args:
        targets (Tensor): ``(N, C)`` multi-hot.
        generator (torch.Generator, optional): source of randomness.

    Returns:
        LongTensor ``(N,)`` on ``targets.device``.

    Examples::

        >>> targets = torch.tensor([[1, 0, 1], [0, 1, 0]])
        >>> sample_positive_class(targets)[1]
        tensor(1)
    """
    from captum_consistency.data._targets import sample_present_classes

    return sample_present_classes(targets, generator)


def _to_device(images: Tensor, targets: Tensor, device: torch.device, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    targets = targets.to(device, non_blocking=True)
    return images, targets


def _check_gradcam_targets(gradcam_targets: Tensor) -> Tensor:
    """The loader's regularised classes: integer class ids (a dtype check, no host sync)."""
    from captum_consistency.data._targets import check_gradcam_targets

    return check_gradcam_targets(gradcam_targets, where="the loader's gradcam_targets", values=False)


def _loader_brings_distractors(loader: Any) -> bool:
    from captum_consistency.data import DatasetWithDistractors

    return isinstance(getattr(loader, "dataset", None), DatasetWithDistractors)


def _regularised_classes(batch: TrainBatch, device: torch.device, multilabel: bool,
                         generator: Optional[torch.Generator]):
    """``(on the CPU, on the device)``: the loader's regularised classes, else one positive
    drawn per multi-label row, else the labels."""
    if batch.gradcam_targets is not None:
        gc_cpu = _check_gradcam_targets(batch.gradcam_targets)
    elif multilabel:
        gc_cpu = sample_positive_class(batch.targets, generator)
    else:
        gc_cpu = batch.targets
    return gc_cpu, gc_cpu.to(device, non_blocking=True)


def _gc_step(loss_fn, batch: TrainBatch, images: Tensor, targets: Tensor, device: torch.device,
             make_distractors, multilabel: bool, generator: Optional[torch.Generator]):
    """The GC loss of one batch: regularised classes, distractors, cells, then ``loss_fn``."""
    # Labels, distractor choice and cells stay on the CPU, where the loader made them: no
    # host-device synchronisation in the step, only asynchronous copies.
    gc_cpu, gc_targets = _regularised_classes(batch, device, multilabel, generator)
    if getattr(loss_fn, "composites", "per-image") == "shared":
        from captum_consistency.data.distractors import shared_composite_groups

        # The grouping runs on the CPU labels; only the images it leaves over need
        # distractors, so they are made (or copied) lazily, when some are left.
        groups, cells = shared_composite_groups(batch.targets, gc_cpu, generator)
        distractors = None
        if batch.distractors is not None:
            distractors = functools.partial(batch.distractors.to, device, non_blocking=True)
        elif make_distractors is not None:
            distractors = functools.partial(make_distractors, images, batch.targets, gc_cpu)
        return loss_fn(images, targets, distractors, cells=cells, gradcam_targets=gc_targets,
                       groups=groups)
    if batch.distractors is not None:
        distractors = batch.distractors.to(device, non_blocking=True)
    else:
        distractors = make_distractors(images, batch.targets, gc_cpu)
    cells = random_cells(images.shape[0], generator=generator)
    return loss_fn(images, targets, distractors, cells=cells, gradcam_targets=gc_targets)


def _explanation_step(loss_fn, batch: TrainBatch, images: Tensor, targets: Tensor,
                      device: torch.device, multilabel: bool, generator: Optional[torch.Generator]):
    """One step of an explanation-guided loss other than GC (CGC, Energy, L1, PPCE, RRR)."""
    _, gc_targets = _regularised_classes(batch, device, multilabel, generator)
    if loss_fn.needs_masks:
        if batch.masks is None:
            raise ValueError(
                f"{type(loss_fn).__name__} needs object masks, and the loader's batches have none: "
                "build the training set with masks (build_dataset(..., masks=True), "
                "captum_consistency.data.WithTrainingMasks)"
            )
        return loss_fn(images, targets, batch.masks.to(device, non_blocking=True), gradcam_targets=gc_targets)
    return loss_fn(images, targets, gradcam_targets=gc_targets)


def _raise_non_finite(epoch: int, steps: int, values: dict, first_bad: Tensor) -> None:
    first = int(first_bad)
    if first == 0 and all(math.isfinite(v) for v in values.values()):
        return
    raise FloatingPointError(
        f"non-finite training loss at epoch {epoch} (first non-finite loss at step "
        f"{first or steps}, detected at step {steps}): {values}; lower --lr or check the data "
        "(NaN or infinite pixels)"
    )


class _PartialStep:
    """A GC step on the first images of a batch and a plain step on the others."""

    def __init__(self, out, logits_rest: Tensor, cls_rest: Tensor, m: int, n: int) -> None:
        self.logits = torch.cat([out.logits, logits_rest])
        self.classification = (m * out.classification + (n - m) * cls_rest) / n
        self.consistency = out.consistency
        # out.loss is out.classification + lam * consistency (or the classification alone)
        self.loss = out.loss - out.classification + self.classification
        self.cells, self.groups, self.num_ungrouped = out.cells, out.groups, out.num_ungrouped


def _partial_gc_step(model: nn.Module, loss_fn, batch: TrainBatch, images: Tensor, targets: Tensor,
                     device: torch.device, make_distractors, multilabel: bool,
                     generator: Optional[torch.Generator], fraction: float, criterion):
    """``(output, images with a GC term)``: the GC loss on the first ``ceil(fraction * N)``
    images, a plain forward on the rest."""
    n = images.shape[0]
    m = n if fraction >= 1 else min(n, max(1, math.ceil(fraction * n)))
    if m == n:
        return _gc_step(loss_fn, batch, images, targets, device, make_distractors, multilabel,
                        generator), n
    part = TrainBatch(
        batch.images[:m], batch.targets[:m],
        None if batch.distractors is None else batch.distractors[:m],
        None if batch.gradcam_targets is None else batch.gradcam_targets[:m], batch.skipped,
    )
    out = _gc_step(loss_fn, part, images[:m], targets[:m], device, make_distractors,
                   multilabel, generator)
    logits_rest = model(images[m:])
    return _PartialStep(out, logits_rest, criterion(logits_rest, targets[m:]), m, n), m


def _step_values(out, targets: Tensor, lr: float, multilabel: bool,
                 shared: bool) -> Dict[str, float]:
    """The scalars of a logged step, read on the host."""
    values = {
        "loss/total": float(out.loss.detach()),
        "loss/classification": float(out.classification.detach()),
        "lr": lr,
    }
    if out.consistency is not None:
        values["loss/consistency"] = float(out.consistency.detach())
    if shared and out.consistency is not None:  # a plain step of partial GC has no composite
        values["train/ungrouped"] = float(out.num_ungrouped)
    if not multilabel:
        values["train/top1_batch"] = float((out.logits.argmax(1) == targets).float().mean())
    return values


class _PlainStep:
    """What a step without the GC loss reports, in the fields of the loss's output."""

    def __init__(self, logits: Tensor, loss: Tensor) -> None:
        self.logits, self.loss, self.classification, self.consistency = logits, loss, loss, None


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    epoch: int,
    criterion: Callable[[Tensor, Tensor], Tensor],
    loss_fn: Optional[Callable[..., Any]] = None,
    make_distractors: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    multilabel: bool = False,
    amp: bool = False,
    channels_last: bool = False,
    generator: Optional[torch.Generator] = None,
    writer: Any = None,
    global_step: int = 0,
    log_every: int = 20,
    progress: bool = True,
    num_classes: Optional[int] = None,
    min_batch_size: int = 1,
    lr_scheduler: Optional[Any] = None,
    gc_every: int = 1,
    gc_fraction: float = 1.0,
) -> Dict[str, Any]:
    """Trains ``model`` for one pass over ``loader``.

    A batch with fewer than ``min_batch_size`` images (``--skip-corrupt`` can shrink a batch,
    down to nothing when all its images are undecodable) is not trained on. Under torchrun the
    ranks vote on every step (:func:`~captum_consistency.engine.all_ranks_true`, a CPU
    all-reduce of one integer): when one rank cannot take the step, every rank skips it, so
    that no rank waits forever for the gradients of a backward pass another rank skipped.

    Args:
        model (torch.nn.Module): the model (possibly DDP-wrapped), in train mode afterwards.
        optimizer (torch.optim.Optimizer): stepped once per batch.
        loader (Iterable): yields ``(images (N, C, S, S), targets)``, the library's batches
            or ``(batch, distractors, gradcam_targets)`` (:func:`as_train_batch`); targets are
            class indices ``(N,)`` or multi-hot ``(N, num_classes)``.
        device (torch.device): where to compute.
        epoch (int): 0-based epoch, for the progress bar.
        criterion (Callable): classification loss, used when ``loss_fn`` is None.
        loss_fn (Callable, optional): a :class:`~captum_consistency.GradCamConsistencyLoss`
            over the same model, or another explanation-guided loss of
            :data:`~captum_consistency.losses.EXPLANATION_LOSSES` (the mask-guided ones read
            the batches' ``masks``, :class:`~captum_consistency.data.MaskedBatch`); ``None``
            trains the baseline (no composite forward at all).
            With ``composites="shared"`` the batch is grouped on the CPU
            (:func:`~captum_consistency.data.shared_composite_groups`, with ``generator``) and
            the groups are passed to the loss.
        make_distractors (Callable, optional): ``(images, targets, gradcam_targets) ->
            (N, 3, C, S, S)`` distractors whose labels exclude ``gradcam_targets``; required
            with a per-image ``loss_fn``. With shared composites it is called only for a
            batch that leaves images ungrouped (without it, those draw from the batch).
        multilabel (bool): multi-hot targets; the regularised class is drawn among the
            positives (:func:`sample_positive_class`) and F1 is reported instead of top-1.
        amp (bool): bf16 autocast.
        channels_last (bool): move images to channels-last memory format (CUDA).
        generator (torch.Generator, optional): CPU generator for cells and classes.
        writer (SummaryWriter, optional): TensorBoard writer (rank 0 only).
        global_step (int): number of optimiser steps before this epoch.
        log_every (int): TensorBoard / progress-bar interval in steps.
        progress (bool): show a tqdm bar (only on rank 0).
        num_classes (int, optional): number of classes; needed for multi-label F1 under
            torchrun (every rank must all-reduce tensors of the same size).
        min_batch_size (int): smallest batch to train on; 2 for a model whose batch norm
            sees ``1 x 1`` maps at this image size (one value per channel cannot be
            normalised), see :func:`~captum_consistency.engine.check_input_size`.
        lr_scheduler (torch.optim.lr_scheduler.LRScheduler, optional): a per-step schedule
            (e.g. warm-up then cosine), stepped after every optimizer step. An epoch-level
            schedule (the paper's ``MultiStepLR``) is stepped by the caller after the epoch.
        gc_every (int): partial GC over steps: the GC loss on the steps whose ``global_step``
            (counted from 0 over the whole run, so resumed runs keep the rhythm) is a multiple
            of ``gc_every``; the other steps are plain classification steps (the model on the
            images and ``criterion``, or the loss's own ``criterion`` when ``loss_fn`` has
            one): no composite, no double backward. 1 (the default): every step.
        gc_fraction (float): partial GC over the batch, in ``(0, 1]``: the GC loss on the first
            ``ceil(gc_fraction * N)`` images of each GC step (their composites, their
            distractors), a plain classification forward on the others; the classification
            term is the mean over all ``N`` images. 1 (the default): the whole batch.

    Raises:
        FloatingPointError: a non-finite loss (NaN or infinity: a non-finite pixel on an
            accelerator, where the loss does not check the pixels, or a diverging lr), on rank
            0 at the next logged step or at the epoch's end, naming the first non-finite step.
            The check costs no host-device synchronisation of its own: a device flag records
            the first such step, read where the logged values are read anyway.

    Returns:
        dict: epoch averages over all ranks: ``loss``, ``classification``, ``consistency``,
        ``top1`` (or ``f1_per_class``, ``f1_overall``, ``exact_match``), ``samples``,
        ``steps``, ``global_step``, ``skipped`` (undecodable images dropped) and
        ``skipped_steps`` (steps that no rank took because some rank's batch was smaller
        than ``min_batch_size``; counted once, not per rank); with shared composites also
        ``ungrouped``, the images of the epoch that got a composite of their own (also written
        to TensorBoard as ``train/ungrouped`` per logged step); with a mask-guided loss
        ``mask_skipped``, the images whose mask was all-false or all-true. With the GC loss also
        ``gc_steps`` (steps that ran the GC loss), ``gc_images`` (images that got a
        composite term) and ``composites`` (composites forwarded, each ``2S x 2S``: four
        images' pixels); these are this rank's counts (the cost of the epoch is
        ``images + 4 * composites`` images forwarded and backpropagated per rank).

    Examples::

        >>> model = build_model("resnet18", num_classes=10)
        >>> schedule = default_schedule("imagenet", "resnet18")
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr,
        ...                             momentum=schedule.momentum,
        ...                             weight_decay=schedule.weight_decay)
        >>> loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=schedule.gc_lambda)
        >>> stats = train_one_epoch(
        ...     model, optimizer, loader, torch.device("cpu"), epoch=0,
        ...     criterion=torch.nn.CrossEntropyLoss(), loss_fn=loss_fn,
        ...     make_distractors=lambda x, y, g: gather_distractors(x, y, g))
        >>> stats["top1"], stats["consistency"]
    """
    from captum_consistency.losses.guided import ExplanationLoss

    explanation = isinstance(loss_fn, ExplanationLoss)
    shared = getattr(loss_fn, "composites", "per-image") == "shared"
    if isinstance(gc_every, bool) or not isinstance(gc_every, int) or gc_every < 1:
        raise ValueError(f"gc_every must be an int >= 1, got {gc_every!r}")
    if not (isinstance(gc_fraction, (int, float)) and 0 < gc_fraction <= 1):
        raise ValueError(f"gc_fraction must be a number in (0, 1], got {gc_fraction!r}")
    plain_criterion = getattr(loss_fn, "criterion", None) or criterion
    if (loss_fn is not None and not shared and not explanation and make_distractors is None
            and not _loader_brings_distractors(loader)):
        raise ValueError("make_distractors is required when loss_fn (the GC loss) is given")
    if isinstance(min_batch_size, bool) or not isinstance(min_batch_size, int) or min_batch_size < 1:
        raise ValueError(f"min_batch_size must be an int >= 1, got {min_batch_size!r}")
    from tqdm.auto import tqdm

    model.train()
    meter = ClassificationMeter(device, num_classes, multilabel)
    main = is_main_process()
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", disable=not (progress and main),
               dynamic_ncols=True, leave=False)
    steps = skipped_steps = skipped = 0
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based step, 0: none yet
    vote = get_world_size() > 1
    ungrouped = 0  # shared composites: images that got a composite of their own
    masks_skipped = 0  # mask-guided losses: images whose mask is all-false or all-true
    gc_steps = gc_images = composites = 0
    for raw in bar:
        batch = as_train_batch(raw)
        skipped += batch.skipped
        usable = batch.images.shape[0] >= min_batch_size
        if vote:
            # DDP's backward is collective: a rank that skipped it alone would hang the others.
            usable = all_ranks_true(usable)
        if not usable:  # e.g. every image of a rank's batch was undecodable (--skip-corrupt)
            skipped_steps += 1
            continue
        images, targets = _to_device(batch.images, batch.targets, device, channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            if loss_fn is None or global_step % gc_every:
                # a plain step: the GC loss is not called, so no composite, no double backward
                logits = model(images)
                out = _PlainStep(logits, (criterion if loss_fn is None else plain_criterion)(logits, targets))
            elif explanation:
                out = _explanation_step(loss_fn, batch, images, targets, device, multilabel, generator)
                if loss_fn.needs_masks:  # summed on the device: no host sync per step
                    masks_skipped = masks_skipped + out.skipped.sum()
            else:
                out, n_gc = _partial_gc_step(model, loss_fn, batch, images, targets, device,
                                             make_distractors, multilabel, generator,
                                             gc_fraction, plain_criterion)
                gc_steps += 1
                gc_images += n_gc
                composites += int(getattr(out, "groups", torch.zeros(0, 4)).shape[0]) + int(
                    getattr(out, "num_ungrouped", n_gc))
                if shared:
                    ungrouped += out.num_ungrouped
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        bad = ~torch.isfinite(out.loss.detach())
        first_bad = torch.where(bad & (first_bad == 0), steps + 1, first_bad)  # no sync
        lr = optimizer.param_groups[0]["lr"]
        if lr_scheduler is not None:
            lr_scheduler.step()
        meter.update(out.logits, targets, out.loss, out.classification, out.consistency)
        steps += 1
        global_step += 1
        if main and (steps % log_every == 0 or steps == total):
            values = _step_values(out, targets, lr, multilabel, shared)
            _raise_non_finite(epoch, steps, values, first_bad)
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(key, value, global_step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()})
    bar.close()
    if main and steps:
        _raise_non_finite(epoch, steps, {}, first_bad)
    result = meter.result()
    if loss_fn is None:
        result.pop("consistency")
    result.update(steps=steps, skipped_steps=skipped_steps, global_step=global_step)
    result["skipped"] = int(all_reduce_sum(torch.tensor([skipped], device=device))[0])
    if shared:
        result["ungrouped"] = int(all_reduce_sum(torch.tensor([ungrouped], device=device))[0])
    if explanation and loss_fn.needs_masks:
        total = torch.as_tensor(masks_skipped, device=device).reshape(1).long()
        result["mask_skipped"] = int(all_reduce_sum(total)[0])
    if loss_fn is not None and not explanation:
        result.update(gc_steps=gc_steps, gc_images=gc_images, composites=composites)
    return result
