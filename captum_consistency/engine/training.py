"""Training and classification-evaluation loops (single process or DistributedDataParallel).

One GC training step (Pillai & Pirsiavash, AAAI 2021, Eq. 5) is: draw one regularised class
per image (the label, or for multi-label data one of the positive labels), three distractors
whose labels exclude it (:func:`captum_consistency.data.gather_distractors` takes them from the
batch itself, on the device), a random cell per image, and call
:class:`captum_consistency.GradCamConsistencyLoss`, which builds the ``2S x 2S`` composites,
runs the model on the images and on the composites and returns the classification and
consistency terms. With ``loss_fn=None`` (``--gc-lambda 0``) the step is a plain
classification step: no composite is built or forwarded.

Everything per step stays on the device: running sums are tensors, read on the host only every
``log_every`` steps and at the end of the epoch (one all-reduce under torchrun).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.composition import random_cells
from captum_consistency.engine.distributed import (
    all_ranks_true,
    all_reduce_sum,
    get_world_size,
    is_main_process,
)

__all__ = [
    "TrainBatch",
    "as_train_batch",
    "Schedule",
    "default_schedule",
    "ScaledBCEWithLogitsLoss",
    "build_optimizer",
    "build_scheduler",
    "sample_positive_class",
    "multilabel_f1",
    "autocast",
    "train_one_epoch",
    "evaluate_classification",
]


class TrainBatch(NamedTuple):
    """A training batch as :func:`train_one_epoch` consumes it.

    Attributes:
        images: ``(N, C, S, S)``.
        targets: ``(N,)`` class ids or ``(N, K)`` multi-hot.
        distractors: ``(N, 3, C, S, S)`` decoded by the loader (``--distractors dataset``), or
            ``None`` to take them from the batch.
        gradcam_targets: ``(N,)`` regularised classes chosen by the loader, or ``None``.
        skipped: images of this batch dropped because they could not be decoded.

    Examples::

        >>> batch = TrainBatch(torch.rand(8, 3, 64, 64), torch.randint(0, 10, (8,)))
        >>> batch.distractors is None  # train_one_epoch takes them from the batch
        True
    """

    images: Tensor
    targets: Tensor
    distractors: Optional[Tensor] = None
    gradcam_targets: Optional[Tensor] = None
    skipped: int = 0


def as_train_batch(batch: Any) -> TrainBatch:
    """Normalises what the library's loaders yield into a :class:`TrainBatch`.

    Accepts ``(images, targets)`` tuples (default collate), the library's batches
    (:class:`~captum_consistency.data.ImageBatch`, :class:`~captum_consistency.data.CocoBatch`:
    ``.images``, ``.targets``, ``.skipped``) and the ``(batch, distractors, gradcam_targets)``
    triples of :func:`~captum_consistency.data.collate_with_distractors`.

    Args:
        batch (Any): what a training ``DataLoader`` yields (see above), or a
            :class:`TrainBatch` (returned unchanged).

    Returns:
        TrainBatch: with ``targets`` as a tensor and ``skipped`` counted.

    Examples::

        >>> b = as_train_batch((torch.rand(4, 3, 32, 32), [0, 1, 2, 3]))
        >>> b.targets, b.skipped
        (tensor([0, 1, 2, 3]), 0)
    """
    if isinstance(batch, TrainBatch):
        return batch
    distractors = gradcam_targets = None
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 3
        and isinstance(batch[1], Tensor)
        and batch[1].dim() == 5
    ):
        batch, distractors, gradcam_targets = batch
    images = getattr(batch, "images", None)
    if images is not None:
        targets, skipped = batch.targets, int(getattr(batch, "skipped", 0))
    else:
        images, targets, skipped = batch[0], batch[1], 0
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    return TrainBatch(images, targets, distractors, gradcam_targets, skipped)


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
        >>> scheduler = build_scheduler(build_optimizer(model, schedule), schedule)
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


# The loss lives with the other losses; imported here so that engine.training keeps exporting it.
from captum_consistency.losses.classification import ScaledBCEWithLogitsLoss  # noqa: E402


def build_optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.SGD:
    """SGD with the schedule's lr, momentum and weight decay on all parameters.

    Args:
        model (torch.nn.Module): the model (possibly DDP-wrapped).
        schedule (Schedule): the hyper-parameters, e.g. :func:`default_schedule`.

    Returns:
        torch.optim.SGD: the optimizer.

    Examples::

        >>> optimizer = build_optimizer(model, default_schedule("imagenet", "resnet50"))
        >>> optimizer.defaults["lr"], optimizer.defaults["weight_decay"]
        (0.1, 0.0001)
    """
    return torch.optim.SGD(
        model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
        weight_decay=schedule.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule):
    """``MultiStepLR`` over epochs (ImageNet's "/10 every 30 epochs" is milestones 30, 60).

    Step it once per epoch.

    Args:
        optimizer (torch.optim.Optimizer): from :func:`build_optimizer`.
        schedule (Schedule): its ``milestones`` and ``gamma`` are used.

    Returns:
        torch.optim.lr_scheduler.MultiStepLR: the scheduler.

    Examples::

        >>> schedule = default_schedule("imagenet", "resnet18")
        >>> scheduler = build_scheduler(build_optimizer(model, schedule), schedule)
        >>> for epoch in range(schedule.epochs):
        ...     train_one_epoch(...)
        ...     scheduler.step()
    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(schedule.milestones), gamma=schedule.gamma
    )


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


def multilabel_f1(tp: Tensor, fp: Tensor, fn: Tensor) -> Tuple[Tensor, float]:
    """Per-class and overall F1 (in [0, 1]) from per-class counts, as the authors compute them.

    Per class: precision ``tp / (tp + fp)`` and recall ``tp / (tp + fn)``, F1 their harmonic
    mean, 0 for a class without true positives; the per-class F1 of the paper's Table 2 is the
    mean of these. The overall F1 uses the counts summed over classes.

    Args:
        tp (Tensor): ``(C,)`` true positives per class.
        fp (Tensor): ``(C,)`` false positives per class.
        fn (Tensor): ``(C,)`` false negatives per class.

    Returns:
        ``(f1 per class (C,), f1_overall)``.

    Examples::

        >>> f1, overall = multilabel_f1(torch.tensor([2, 0]), torch.tensor([0, 1]),
        ...                             torch.tensor([2, 1]))
        >>> f1, overall
        (tensor([0.6667, 0.0000], dtype=torch.float64), 0.5)
    """
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    denom_p = (tp + fp).clamp_min(1)
    denom_r = (tp + fn).clamp_min(1)
    precision, recall = tp / denom_p, tp / denom_r
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    tps, fps, fns = tp.sum(), fp.sum(), fn.sum()
    f1_overall = float(2 * tps / (2 * tps + fps + fns)) if tps > 0 else 0.0
    return f1, f1_overall


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a null context.

    Args:
        device (torch.device): the device whose type selects the autocast backend.
        enabled (bool): ``--amp``.

    Returns:
        A context manager: ``torch.autocast(device.type, dtype=torch.bfloat16)`` or
        :func:`contextlib.nullcontext`.

    Examples::

        >>> with autocast(torch.device("cuda"), enabled=True):
        ...     logits = model(images)
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(images: Tensor, targets: Tensor, device: torch.device, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    targets = targets.to(device, non_blocking=True)
    return images, targets


class _Meter:
    """Device-side running sums; read with one host sync (and one all-reduce) at the end."""

    def __init__(self, device: torch.device, num_classes: Optional[int], multilabel: bool):
        self.device = device
        self.multilabel = multilabel
        # loss, classification, consistency (sums weighted by batch size), correct, count
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.counts = (
            torch.zeros(3, num_classes, dtype=torch.float64, device=device)
            if multilabel and num_classes
            else None
        )

    def update(self, logits: Tensor, targets: Tensor, losses: Sequence[Optional[Tensor]]):
        n = logits.shape[0]
        logits = logits.detach()
        for i, value in enumerate(losses):
            if value is not None:
                self.sums[i] += value.detach().double() * n
        self.sums[4] += n
        if self.multilabel:
            pred = logits > 0
            truth = targets > 0.5
            if self.counts is None:
                self.counts = torch.zeros(3, logits.shape[1], dtype=torch.float64, device=self.device)
            self.counts[0] += (pred & truth).sum(0)
            self.counts[1] += (pred & ~truth).sum(0)
            self.counts[2] += (~pred & truth).sum(0)
            self.sums[3] += (pred == truth).all(dim=1).sum()  # exact-match count
        else:
            self.sums[3] += (logits.argmax(dim=1) == targets).sum()

    def result(self, reduce: bool = True) -> Dict[str, Any]:
        sums = self.sums.clone()
        counts = self.counts.clone() if self.counts is not None else None
        if reduce:
            all_reduce_sum(sums)
            if counts is not None:
                all_reduce_sum(counts)
        n = max(float(sums[4]), 1.0)
        out: Dict[str, Any] = {
            "loss": float(sums[0]) / n,
            "classification": float(sums[1]) / n,
            "consistency": float(sums[2]) / n,
            "samples": int(sums[4]),
        }
        if self.multilabel and counts is not None:
            f1, f1_overall = multilabel_f1(counts[0], counts[1], counts[2])
            out["f1_per_class"] = float(f1.mean())
            out["f1_overall"] = f1_overall
            out["exact_match"] = float(sums[3]) / n
        else:
            out["top1"] = float(sums[3]) / n
        return out


def _check_gradcam_targets(gradcam_targets: Tensor) -> Tensor:
    """The loader's regularised classes: integer class ids (a dtype check, no host sync)."""
    from captum_consistency.data._targets import check_gradcam_targets

    return check_gradcam_targets(gradcam_targets, where="the loader's gradcam_targets", values=False)


def _loader_brings_distractors(loader: Any) -> bool:
    from captum_consistency.data import DatasetWithDistractors

    return isinstance(getattr(loader, "dataset", None), DatasetWithDistractors)


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
            over the same model; ``None`` trains the baseline (no composite forward at all).
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

    Returns:
        dict: epoch averages over all ranks: ``loss``, ``classification``, ``consistency``,
        ``top1`` (or ``f1_per_class``, ``f1_overall``, ``exact_match``), ``samples``,
        ``steps``, ``global_step``, ``skipped`` (undecodable images dropped) and
        ``skipped_steps`` (steps that no rank took because some rank's batch was smaller
        than ``min_batch_size``; counted once, not per rank); with shared composites also
        ``ungrouped``, the images of the epoch that got a composite of their own (also written
        to TensorBoard as ``train/ungrouped`` per logged step).

    Examples::

        >>> model = build_model("resnet18", num_classes=10)
        >>> schedule = default_schedule("imagenet", "resnet18")
        >>> optimizer = build_optimizer(model, schedule)
        >>> loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=schedule.gc_lambda)
        >>> stats = train_one_epoch(
        ...     model, optimizer, loader, torch.device("cpu"), epoch=0,
        ...     criterion=torch.nn.CrossEntropyLoss(), loss_fn=loss_fn,
        ...     make_distractors=lambda x, y, g: gather_distractors(x, y, g))
        >>> stats["top1"], stats["consistency"]
    """
    shared = getattr(loss_fn, "composites", "per-image") == "shared"
    if shared:
        from captum_consistency.data.distractors import shared_composite_groups
    elif loss_fn is not None and make_distractors is None and not _loader_brings_distractors(loader):
        raise ValueError("make_distractors is required when loss_fn (the GC loss) is given")
    if isinstance(min_batch_size, bool) or not isinstance(min_batch_size, int) or min_batch_size < 1:
        raise ValueError(f"min_batch_size must be an int >= 1, got {min_batch_size!r}")
    from tqdm.auto import tqdm

    model.train()
    meter = _Meter(device, num_classes, multilabel)
    main = is_main_process()
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", disable=not (progress and main),
               dynamic_ncols=True, leave=False)
    steps = skipped_steps = 0
    skipped = 0
    vote = get_world_size() > 1
    ungrouped = 0  # shared composites: images that got a composite of their own
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
        n = images.shape[0]
        with autocast(device, amp):
            if loss_fn is None:
                logits = model(images)
                classification = criterion(logits, targets)
                loss, consistency = classification, None
            else:
                # Labels, distractor choice and cells stay on the CPU, where the loader made
                # them: no host-device synchronisation in the step, only async copies.
                if batch.gradcam_targets is not None:
                    gc_cpu = _check_gradcam_targets(batch.gradcam_targets)
                elif multilabel:
                    gc_cpu = sample_positive_class(batch.targets, generator)
                else:
                    gc_cpu = batch.targets
                gc_targets = gc_cpu.to(device, non_blocking=True)
                if shared:
                    # The grouping runs on the CPU labels; only the images it leaves over need
                    # distractors, so they are made (or copied) lazily, when some are left.
                    groups, cells = shared_composite_groups(batch.targets, gc_cpu, generator)
                    distractors = None
                    if batch.distractors is not None:
                        distractors = functools.partial(batch.distractors.to, device, non_blocking=True)
                    elif make_distractors is not None:
                        distractors = functools.partial(make_distractors, images, batch.targets, gc_cpu)
                    out = loss_fn(images, targets, distractors, cells=cells, gradcam_targets=gc_targets,
                                  groups=groups)
                    ungrouped += out.num_ungrouped
                else:
                    if batch.distractors is not None:
                        distractors = batch.distractors.to(device, non_blocking=True)
                    else:
                        distractors = make_distractors(images, batch.targets, gc_cpu)
                    cells = random_cells(n, generator=generator)
                    out = loss_fn(images, targets, distractors, cells=cells, gradcam_targets=gc_targets)
                logits, loss = out.logits, out.loss
                classification, consistency = out.classification, out.consistency
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.update(logits, targets, (loss, classification, consistency))
        steps += 1
        global_step += 1
        if main and (steps % log_every == 0 or steps == total):
            values = {
                "loss/total": float(loss.detach()),
                "loss/classification": float(classification.detach()),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if consistency is not None:
                values["loss/consistency"] = float(consistency.detach())
            if shared:
                values["train/ungrouped"] = float(out.num_ungrouped)
            if not multilabel:
                values["train/top1_batch"] = float((logits.argmax(1) == targets).float().mean())
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(
                    f"non-finite training loss at epoch {epoch}, step {steps}: {values}; lower "
                    "--lr or check the data"
                )
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(key, value, global_step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()})
    bar.close()
    result = meter.result()
    if loss_fn is None:
        result.pop("consistency")
    result["steps"] = steps
    result["skipped_steps"] = skipped_steps
    result["global_step"] = global_step
    result["skipped"] = int(all_reduce_sum(torch.tensor([skipped], device=device))[0])
    if shared:
        result["ungrouped"] = int(all_reduce_sum(torch.tensor([ungrouped], device=device))[0])
    return result


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    multilabel: bool = False,
    amp: bool = False,
    channels_last: bool = False,
    num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Top-1 accuracy, or per-class and overall F1 for multi-hot targets, over all ranks.

    Use a sampler that gives each sample to exactly one rank
    (:class:`~captum_consistency.engine.ShardSampler`): the sums are all-reduced. Pass
    ``num_classes`` for multi-label data under torchrun.

    Args:
        model (torch.nn.Module): the classifier (put in eval mode, its mode restored after).
        loader (Iterable): batches as for :func:`train_one_epoch` (:func:`as_train_batch`).
        device (torch.device): where to compute.
        multilabel (bool): multi-hot targets: F1 (logit > 0 is a positive) instead of top-1.
        amp (bool): bf16 autocast.
        channels_last (bool): channels-last memory format for the images.
        num_classes (int, optional): number of classes, for multi-label F1 under torchrun.

    Returns:
        dict: ``top1`` (or ``f1_per_class``, ``f1_overall``, ``exact_match``) in [0, 1], and
        ``samples``.

    Examples::

        >>> val = DataLoader(val_set, batch_size=64, sampler=ShardSampler(len(val_set), rank, world))
        >>> evaluate_classification(model, val, torch.device("cuda"))["top1"]
    """

    was_training = model.training
    model.eval()
    meter = _Meter(device, num_classes, multilabel)
    skipped = 0
    for raw in loader:
        batch = as_train_batch(raw)
        skipped += batch.skipped
        if batch.images.shape[0] == 0:
            continue
        images, targets = _to_device(batch.images, batch.targets, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        meter.update(logits.float(), targets, ())
    model.train(was_training)
    result = meter.result()
    for key in ("loss", "classification", "consistency"):
        result.pop(key)
    result["skipped"] = int(all_reduce_sum(torch.tensor([skipped], device=device))[0])
    return result
