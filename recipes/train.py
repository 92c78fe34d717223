"""Train a classifier with the Grad-CAM consistency (GC) loss, on one GPU or many (torchrun).

Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021. In the
style of torchvision's ``references/classification/train.py``::

    # ResNet-18 + GC on ImageNet, 4 GPUs x 64 images = the paper's batch of 256
    torchrun --nproc_per_node 4 recipes/train.py --data imagenet --data-root /data/imagenet \\
        --arch resnet18 --gc-lambda 25 --batch-size 64 --amp --output-dir runs/r18_gc
    # the baseline: --gc-lambda 0 (no composite is built or forwarded)
    # GMP + GC: add --gmp
    # the paper's exact scheme, one composite per image (about twice the step cost of the
    # default composites shared by four images): --composites per-image
    # COCO, initialised from the ImageNet model (the paper's protocol)
    torchrun --nproc_per_node 2 recipes/train.py --data coco --data-root /data/coco \\
        --arch resnet18 --init-from runs/r18_gc/checkpoint.pth --batch-size 128 --amp \\
        --output-dir runs/coco_r18_gc
    # continue a run that stopped (killed, pre-empted, out of time)
    torchrun --nproc_per_node 4 recipes/train.py ... --resume runs/r18_gc/checkpoint.pth
    # a small run on the CPU
    python recipes/train.py --data synthetic --arch resnet18 --image-size 64 --epochs 2 \\
        --batch-size 16 --device cpu --output-dir runs/tiny
    # another explanation-guided loss (docs/losses.md): CGC, self-supervised (labels only) ...
    torchrun --nproc_per_node 4 recipes/train.py --data imagenet --data-root /data/imagenet \\
        --loss cgc --output-dir runs/r18_cgc          # lambda 0.5, tau 0.5
    # ... or guided by masks: the shapes' exact masks, COCO's segmentations, or ImageNet's
    # training boxes (--train-boxes DIR of the training split's XMLs)
    python recipes/train.py --data synthetic --loss energy --output-dir runs/energy ...

Defaults are the paper's schedules (:func:`captum_consistency.engine.default_schedule`):

* ImageNet: SGD, momentum 0.9, weight decay 1e-4, lr 0.1 (AlexNet 0.01), divided by 10 every
  30 epochs (milestones 30, 60), 90 epochs, lambda 25, cross-entropy.
* COCO (the authors' multi-label script and README): classification loss
  ``80 * BCEWithLogits`` (``K * BCE`` with ``K`` the number of categories of the annotation
  file, i.e. the BCE summed over categories; ``--bce-weight`` overrides), lambda 1, SGD lr 0.01, momentum 0.9, weight decay 5e-4, 36 epochs,
  lr divided by 10 at epochs 24 and 30; start from an ImageNet model with ``--init-from``.
* ``synthetic`` uses the ImageNet schedule; override ``--epochs`` and ``--lr``.

``--batch-size`` is per process: the global batch is ``batch_size x world_size`` (256 in the
paper). Every epoch ends with an atomic ``checkpoint.pth`` in ``--output-dir`` (model,
optimizer, scheduler, epoch, arguments, every rank's RNG states): a run killed at any moment
loses at most the epoch in progress, and ``--resume`` continues from the last completed epoch.
TensorBoard scalars go to ``<output-dir>/tensorboard`` and one JSON line per epoch to
``<output-dir>/log.jsonl``. After every epoch, rank 0 also logs Grad-CAM panels of
``--log-images`` fixed validation images and of their 2x2 composites (tags ``gradcam/images``
and ``gradcam/composites``), and every rank scores its shard of a fixed validation subset of
``--log-subset`` images: NQH, and PG and CH where the validation set has boxes or masks
(tags ``val_subset/nqh``, ``val_subset/pg``, ``val_subset/ch``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from captum_consistency import GradCamConsistencyLoss
from captum_consistency.losses import EXPLANATION_LOSSES, MASK_LOSSES
from captum_consistency.builders import build_model, gradcam_layer
from captum_consistency.data import (
    DatasetDistractorSampler,
    DatasetWithDistractors,
    DistractorFallback,
    SizeGroupedBatchSampler,
    collate_with_distractors,
    gather_distractors,
)
from captum_consistency.engine import (
    GradCamPanels,
    ScaledBCEWithLogitsLoss,
    ShardSampler,
    check_checkpoint_compatible,
    default_schedule,
    finetune_schedule,
    distributed_session,
    evaluate_classification,
    gather_rng_states,
    load_checkpoint,
    load_model_weights,
    load_pretrained_backbone,
    load_torchvision_weights,
    rank_seed,
    remove_stale_temporaries,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    barrier,
    distractor_classes_ok,
    fixed_indices,
    validation_scalars,
)
from captum_consistency.engine.cli import (
    add_data_arguments,
    architecture,
    check_input_size,
    end_of_checks,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    recipe_parser,
    run_cli,
    unit_fraction,
    writable_dir,
)
from captum_consistency.engine.datasets import DEFAULT_SPLITS, build_dataset

CHECKPOINT_NAME = "checkpoint.pth"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = recipe_parser(
        "Train a classifier with the Grad-CAM consistency loss "
        "(Pillai & Pirsiavash, AAAI 2021); torchrun-ready.",
        add_help,
    )
    g = add_data_arguments(p, "train")
    g.add_argument("--no-val", action="store_true", help="skip the per-epoch validation accuracy")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", type=architecture, metavar="ARCH",
                   help="a torchvision model name (resnet18, convnext_tiny, ...) or timm:NAME, a "
                   "timm ResNet, ConvNeXt, EfficientNet or RegNet (pip install "
                   "'captum-consistency[timm]'; random initialisation)")
    g.add_argument("--gmp", action="store_true", help="global max pooling instead of average (ResNets)")
    init = g.add_mutually_exclusive_group()
    init.add_argument("--init-from", default=None,
                      help="initialise from these weights, all but the classifier (COCO from ImageNet)")
    init.add_argument("--weights", default=None, metavar="NAME",
                      help="initialise from torchvision's pretrained weights, by their enum name "
                      "(e.g. ResNet50_Weights.IMAGENET1K_V2; cached under $TORCH_HOME/hub/"
                      "checkpoints); a classifier of another size is re-initialised; implies "
                      "--schedule finetune")
    g.add_argument("--schedule", default=None, choices=("paper", "finetune"),
                   help="paper: the paper's from-scratch schedule of --data; finetune: 1/14 of "
                   "its epochs, a cosine from its lr, 8x its lambda "
                   "(captum_consistency.engine.finetune_schedule); default: finetune with "
                   "--weights, the resumed run's, else paper")

    g = p.add_argument_group("GC loss")
    g.add_argument("--gc-lambda", default=None, type=non_negative_float,
                   help="weight of the consistency term; 0 trains the baseline "
                   "(default: 25 ImageNet/synthetic, 1 COCO)")
    g.add_argument("--bce-weight", default=None, type=positive_float,
                   help="multi-label loss = W x BCEWithLogits (default: the number of categories, "
                   "80 for COCO, as the authors)")
    g.add_argument("--gc-gradcam", default="elementwise", choices=("elementwise", "standard"),
                   help="Grad-CAM variant inside the loss (the paper uses element-wise, Eq. 3)")
    g.add_argument("--distractors", default="batch", choices=("batch", "dataset"),
                   help="batch: other images of the batch (no extra decoding, data-set fallback); "
                   "dataset: three extra images decoded per sample, the authors' loader")
    g.add_argument("--gc-every", default=1, type=positive_int, metavar="K",
                   help="partial GC: the GC loss on every K-th step only, plain steps between "
                   "(no composite, no double backward)")
    g.add_argument("--gc-fraction", default=1.0, type=unit_fraction, metavar="P",
                   help="partial GC: the consistency term on a fraction P in (0, 1] of each "
                   "batch, a plain forward on the rest")
    g.add_argument("--composites", default="shared", choices=("per-image", "shared"),
                   help="per-image: one 2x2 composite per image (the paper's scheme); shared "
                   "(same NQH/CH/PG/top-1 within the seed spread on the quickstart): "
                   "one composite for four images of mutually exclusive classes, about half "
                   "the cost per step (images left ungrouped get a per-image composite, with "
                   "--distractors as above; their count is logged)")

    g = p.add_argument_group("other explanation-guided losses (docs/losses.md)")
    g.add_argument("--loss", default="gc", choices=tuple(EXPLANATION_LOSSES),
                   help="gc: the paper's loss (the options above); cgc: contrastive Grad-CAM "
                   "consistency (CVPR 2022); energy, l1, ppce, rrr, rrr-gradcam: guided by object "
                   "masks (synthetic: exact masks; coco: segmentations; imagenet: --train-boxes DIR of "
                   "the training split)")
    g.add_argument("--loss-lambda", default=None, type=non_negative_float,
                   help="weight of the explanation term of --loss other than gc (default: the "
                   "loss's, 0.5 for cgc, 1 for the others); --gc-lambda 0 still trains the baseline")
    g.add_argument("--loss-attribution", default=None,
                   help="differentiable attribution inside the loss: elementwise-gradcam, gradcam, "
                   "input-x-gradient, layer-gradient-x-activation (default: the loss's)")
    g.add_argument("--cgc-temperature", default=0.5, type=positive_float, help="CGC's tau (0.5)")
    g.add_argument("--cgc-classes", default="predicted", choices=("predicted", "label"),
                   help="class whose Grad-CAM CGC regularises (the official code: predicted)")
    g.add_argument("--cgc-gather-negatives", action="store_true",
                   help="CGC under torchrun: negatives from every process's batch (all_gather)")

    g = p.add_argument_group("optimisation (defaults: the paper's schedule of --data)")
    g.add_argument("--epochs", default=None, type=positive_int)
    g.add_argument("--lr", default=None, type=positive_float)
    g.add_argument("--momentum", default=None, type=non_negative_float)
    g.add_argument("--weight-decay", "--wd", default=None, type=non_negative_float)
    g.add_argument("--lr-milestones", default=None, type=positive_int, nargs="*",
                   help="epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", default=None, type=positive_float)
    g.add_argument("--batch-size", "-b", default=32, type=positive_int, help="images per process")
    g.add_argument("--image-size", default=224, type=positive_int, help="crop side S; composites are 2S x 2S")

    g = p.add_argument_group("running")
    g.add_argument("--workers", "-j", default=8, type=non_negative_int, help="data-loading workers per process")
    g.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    g.add_argument("--amp", action="store_true", help="bf16 autocast")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--output-dir", required=True, type=writable_dir, help="checkpoint.pth, log.jsonl, tensorboard/")
    g.add_argument("--resume", default=None, help="checkpoint to continue from")
    g.add_argument("--log-every", default=20, type=positive_int, help="TensorBoard/progress interval (steps)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")

    g = p.add_argument_group("TensorBoard (per epoch, on the validation set)")
    g.add_argument("--log-images", default=8, type=non_negative_int, metavar="N",
                   help="Grad-CAM panels of N fixed validation images and their 2x2 composites "
                   "(tags gradcam/images, gradcam/composites), drawn by rank 0; 0: none")
    g.add_argument("--log-subset", default=512, type=non_negative_int, metavar="N",
                   help="NQH, and PG and CH where the validation set has boxes or masks, of N "
                   "fixed validation images (tags val_subset/*; ImageNet boxes: --boxes); 0: none")
    return p


def _schedule_kind(args) -> str:
    """``--schedule``, else ``finetune`` with ``--weights``, else the resumed run's, else
    ``paper``: a resumed fine-tuning run continues its cosine, not the paper's steps."""
    if args.schedule is not None:
        return args.schedule
    if args.weights:
        return "finetune"
    if args.resume and os.path.isfile(args.resume):
        previous = load_checkpoint(args.resume, map_location="cpu").get("args") or {}
        if previous.get("schedule_kind") == "finetune":
            return "finetune"
    return "paper"


def _schedule(args):
    args.schedule_kind = _schedule_kind(args)
    if args.schedule_kind == "finetune":
        s = finetune_schedule(args.data, args.arch)
    else:
        s = default_schedule(args.data, args.arch)
    for name, attr in (("epochs", "epochs"), ("lr", "lr"), ("momentum", "momentum"),
                       ("weight_decay", "weight_decay"), ("lr_milestones", "milestones"),
                       ("lr_gamma", "gamma"), ("gc_lambda", "gc_lambda")):
        value = getattr(args, name)
        if value is not None:
            setattr(s, attr, list(value) if attr == "milestones" else value)
    if not (math.isfinite(s.gc_lambda) and s.gc_lambda >= 0):  # a Namespace built in Python
        raise ValueError(f"--gc-lambda must be a finite number >= 0, got {s.gc_lambda}")
    if not s.gamma > 0:
        raise ValueError(f"--lr-gamma must be > 0, got {s.gamma}")
    if s.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {s.epochs}")
    return s


def _synthetic_kwargs(args, split_length):
    return {
        "num_classes": args.synthetic_classes,
        "length": split_length,
        "seed": args.synthetic_seed,
        "cue_strength": args.synthetic_cue_strength,
    }


def _loss_description(args, loss_fn, schedule) -> str:
    if loss_fn is None:
        return "baseline (no explanation term)"
    if args.loss == "gc":
        return f"GC loss, lambda={schedule.gc_lambda}"
    return f"--loss {args.loss} ({loss_fn.attribution}), lambda={loss_fn.lam}"


def _log(msg: str, main: bool) -> None:
    if main:
        print(msg, flush=True)


def _check_loss_args(args) -> None:
    """Refuses, before anything runs, a --loss the data cannot feed (argparse's exit status 2)."""
    loss = getattr(args, "loss", "gc")
    if loss in MASK_LOSSES and args.data == "imagenet" and args.train_boxes is None:
        get_args_parser().error(
            f"--loss {loss} needs object masks: on --data imagenet pass --train-boxes DIR (the "
            "training split's bounding-box XMLs), or use --data coco / synthetic, or a loss "
            "without masks (gc, cgc)"
        )
    if loss == "gc" and args.loss_attribution not in (None, "elementwise-gradcam", "gradcam"):
        get_args_parser().error(
            f"--loss gc computes Grad-CAM on composites: --loss-attribution must be "
            f"elementwise-gradcam or gradcam, got {args.loss_attribution}"
        )
    if loss == "cgc" and args.batch_size < 2 and not args.cgc_gather_negatives:
        get_args_parser().error("--loss cgc needs --batch-size >= 2: the other images are the negatives")


def _validation_monitor(args, info, val, val_split):
    """What the per-epoch TensorBoard logging needs (panels, subset loaders), or None."""
    if not (args.log_images or args.log_subset):
        return None
    if val is None:
        _log("--no-val: no Grad-CAM panels or validation scalars are logged", info.is_main)
        return None
    n = len(val.dataset)
    monitor = {"val": val, "panels": None, "crop": None, "whole": None}
    if args.log_images and info.is_main:
        if args.log_images > n:
            _log(f"--log-images {args.log_images} is larger than the validation set ({n} "
                 f"images): logging {n}", True)
        monitor["panels"] = GradCamPanels(
            val.dataset, val.classes, val.mean, val.std, min(args.log_images, n),
            collate_fn=val.collate_fn, seed=args.seed)
    if not args.log_subset:
        return monitor
    if args.log_subset > n:
        _log(f"--log-subset {args.log_subset} is larger than the validation set ({n} images): "
             f"scoring {n}", info.is_main)
    subset = fixed_indices(n, args.log_subset)
    monitor["crop"] = DataLoader(
        Subset(val.dataset, subset), batch_size=args.batch_size, collate_fn=val.collate_fn,
        sampler=ShardSampler(len(subset), info.rank, info.world_size), num_workers=args.workers)
    monitor["fallback"] = DistractorFallback(val.dataset, DatasetDistractorSampler(
        val.targets, seed=rank_seed(args.seed, 0, 6), rank=info.rank, num_classes=val.num_classes))
    monitor["distractor_ok"] = distractor_classes_ok(val.targets, val.num_classes)
    if args.data == "imagenet" and not args.boxes:
        _log("the validation set has no boxes (ImageNet without --boxes): the per-epoch PG and "
             "CH are left out, NQH is logged", info.is_main)
        return monitor
    whole = build_dataset(
        args.data, val_split, "whole", args.image_size, data_root=args.data_root,
        boxes=args.boxes, ann_file=args.val_ann_file, classes=val.classes,
        skip_corrupt=args.skip_corrupt, skip_missing_boxes=args.skip_missing_boxes,
        synthetic=_synthetic_kwargs(args, args.synthetic_val_length),
        allow_empty=args.allow_empty_classes)
    subset = fixed_indices(len(whole.dataset), args.log_subset)
    if args.data == "synthetic":
        monitor["whole"] = DataLoader(
            Subset(whole.dataset, subset), batch_size=args.batch_size, num_workers=args.workers,
            sampler=ShardSampler(len(subset), info.rank, info.world_size))
    else:
        sizes = whole.dataset.original_sizes()
        sampler = SizeGroupedBatchSampler([sizes[i] for i in subset], args.batch_size,
                                          short_side=None, num_replicas=info.world_size,
                                          rank=info.rank)
        monitor["whole"] = DataLoader(Subset(whole.dataset, subset), batch_sampler=sampler,
                                      num_workers=args.workers, collate_fn=whole.collate_fn)
    return monitor


def _log_validation(monitor, model, writer, epoch, device, args, channels_last, main_proc):
    """Panels (rank 0) and the subset's scalars (every rank) of one epoch; returns the scalars.

    Runs on a fork of torch's random state: the loaders it iterates draw their seeds from the
    global generator, and logging must not change what is trained."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _log_validation_now(monitor, model, writer, epoch, device, args, channels_last,
                                   main_proc)


def _log_validation_now(monitor, model, writer, epoch, device, args, channels_last, main_proc):
    if monitor["panels"] is not None:
        monitor["panels"].log(writer, model, epoch, device)
    if monitor["crop"] is None:
        return None
    val = monitor["val"]
    scalars = validation_scalars(
        model, monitor["crop"], device, val.num_classes, whole_loader=monitor["whole"],
        multilabel=val.multilabel, fallback=monitor["fallback"],
        distractor_ok=monitor["distractor_ok"], seed=args.seed,
        tolerance=15.0 * args.image_size / 224 if args.data == "synthetic" else 15.0,
        amp=args.amp, channels_last=channels_last)
    if main_proc:
        for name, value in scalars.items():
            writer.add_scalar(f"val_subset/{name}", value, epoch)
    return scalars


def _gc_attribution(args) -> str:
    """GC's Grad-CAM: --loss-attribution when given, else --gc-gradcam."""
    if args.loss_attribution is not None:
        return args.loss_attribution
    return "elementwise-gradcam" if args.gc_gradcam == "elementwise" else "gradcam"


def _explanation_loss(args, ddp_model, model, criterion):
    """The --loss other than gc, built from its options (None: the baseline, --gc-lambda 0)."""
    cls = EXPLANATION_LOSSES[args.loss]
    kwargs = {"criterion": criterion}
    if args.loss_lambda is not None:
        kwargs["lam"] = args.loss_lambda
    if args.loss_attribution is not None:
        kwargs["attribution"] = args.loss_attribution
    if args.loss == "cgc":
        kwargs.update(temperature=args.cgc_temperature, classes=args.cgc_classes,
                      gather_negatives=args.cgc_gather_negatives)
    return cls(ddp_model, gradcam_layer(model), **kwargs)


def main(args) -> dict:
    """Runs the training; returns the last epoch's record (also on every rank)."""
    _check_loss_args(args)
    with distributed_session(args.device) as info:
        return _main(args, info)


def _main(args, info) -> dict:
    main_proc = info.is_main
    device = info.device
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.gmp and args.arch == "alexnet":
        raise ValueError("--gmp needs a ResNet: AlexNet has no global average pooling")
    schedule = _schedule(args)
    # Before any data is read: a size the architecture (or, with GC, the composite's Grad-CAM
    # map) cannot take fails here, not mid-epoch.
    min_batch_size = check_input_size(args.arch, args.image_size, args.batch_size, gmp=args.gmp,
                                      gc=schedule.gc_lambda > 0)
    if args.resume is None and os.path.exists(ckpt_path):
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume {ckpt_path} to continue that run, or choose "
            "another --output-dir (refusing to overwrite a checkpoint)"
        )
    seed_everything(args.seed, info.rank)
    if main_proc:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temporaries(ckpt_path)

    # ------------------------------------------------------------------ data
    train_split, val_split = DEFAULT_SPLITS[args.data]
    train_split = args.train_split or train_split
    val_split = args.val_split or val_split
    train = build_dataset(
        args.data, train_split, "train", args.image_size, data_root=args.data_root,
        ann_file=args.ann_file, skip_corrupt=args.skip_corrupt,
        synthetic=_synthetic_kwargs(args, args.synthetic_train_length),
        allow_empty=args.allow_empty_classes, boxes=args.train_boxes, masks=args.loss in MASK_LOSSES,
    )
    num_classes = train.num_classes
    if num_classes < 2:
        raise ValueError(f"the training data has {num_classes} class(es); need at least 2")
    val = None
    if not args.no_val:
        val = build_dataset(
            args.data, val_split, "crop", args.image_size, data_root=args.data_root,
            ann_file=args.val_ann_file, classes=train.classes, skip_corrupt=args.skip_corrupt,
            synthetic=_synthetic_kwargs(args, args.synthetic_val_length),
            allow_empty=args.allow_empty_classes,
        )

    train_set, collate = train.dataset, train.collate_fn
    ds_sampler = None
    if schedule.gc_lambda > 0 and args.loss == "gc":
        ds_sampler = DatasetDistractorSampler(
            train.targets, seed=rank_seed(args.seed, 0, 2), rank=info.rank, num_classes=num_classes
        )
        if args.distractors == "dataset":
            train_set = DatasetWithDistractors(train.dataset, ds_sampler)
            collate = functools.partial(collate_with_distractors, collate_fn=train.collate_fn)
    train_sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed,
        drop_last=True,
    )
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=train_sampler, num_workers=args.workers,
        collate_fn=collate, pin_memory=pin, drop_last=True,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one batch of {args.batch_size} per "
            f"process ({info.world_size} processes); lower --batch-size"
        )
    val_loader = None
    if val is not None:
        val_loader = DataLoader(
            val.dataset, batch_size=args.batch_size,
            sampler=ShardSampler(len(val.dataset), info.rank, info.world_size),
            num_workers=args.workers, collate_fn=val.collate_fn, pin_memory=pin,
        )

    monitor = _validation_monitor(args, info, val, val_split)

    # ------------------------------------------------------------------ model
    model = build_model(args.arch, num_classes, gmp=args.gmp)
    if args.init_from and args.resume is None:
        left = load_pretrained_backbone(model, args.init_from)
        _log(f"initialised from {args.init_from} (kept at init: {left or 'none'})", main_proc)
    if args.weights and args.resume is None:
        left = load_torchvision_weights(model, args.weights, args.arch)
        _log(f"initialised from torchvision's {args.weights}"
             + (f"; classifier re-initialised for {num_classes} classes ({', '.join(left)})"
                if left else ""), main_proc)
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
    if args.schedule_kind == "finetune":  # stepped per epoch, like MultiStepLR
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                         gamma=schedule.gamma)

    start_epoch, global_step, rng_states = 0, 0, None
    if args.resume:
        ckpt = load_checkpoint(args.resume, map_location="cpu")
        check_checkpoint_compatible(
            ckpt, args.resume, arch=args.arch, num_classes=num_classes, gmp=args.gmp,
            classes=train.classes,
        )
        trained_with = (ckpt.get("args") or {}).get("loss") or "gc"
        if trained_with != args.loss:
            raise ValueError(f"checkpoint {args.resume} was trained with --loss {trained_with}, not {args.loss}")
        if ckpt.get("data") not in (None, args.data):
            raise ValueError(
                f"checkpoint {args.resume} was trained on --data {ckpt['data']}, not {args.data}"
            )
        load_model_weights(model, ckpt["model"], args.resume, arch=args.arch)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt.get("global_step", 0))
        rng_states = ckpt.get("rng")
        _log(f"resumed from {args.resume}: {start_epoch} epoch(s) done", main_proc)

    ddp_model = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )

    if train.multilabel:
        bce_weight = float(num_classes) if args.bce_weight is None else args.bce_weight
        criterion: nn.Module = ScaledBCEWithLogitsLoss(bce_weight)
    else:
        criterion = nn.CrossEntropyLoss()
    loss_fn = None
    if schedule.gc_lambda > 0 and args.loss != "gc":
        loss_fn = _explanation_loss(args, ddp_model, model, criterion)
    elif schedule.gc_lambda > 0:
        loss_fn = GradCamConsistencyLoss(
            ddp_model, gradcam_layer(model), lam=schedule.gc_lambda, criterion=criterion,
            elementwise=_gc_attribution(args) == "elementwise-gradcam", composites=args.composites,
        )

    fallback = None
    if ds_sampler is not None and args.distractors == "batch":
        fallback = DistractorFallback(train.dataset, ds_sampler)

    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"), purge_step=global_step)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    if rng_states is not None:
        if len(rng_states) == info.world_size:
            set_rng_state(rng_states[info.rank])
        else:
            _log(f"the checkpoint holds RNG states of {len(rng_states)} process(es), this run has "
                 f"{info.world_size}: reseeding", main_proc)
            seed_everything(rank_seed(args.seed, start_epoch), info.rank)

    _log(f"training {args.arch}{' + GMP' if args.gmp else ''} on {args.data} "
         f"({len(train_set)} images, {num_classes} classes), "
         f"{_loss_description(args, loss_fn, schedule)}, "
         f"{info.world_size} process(es) x {args.batch_size}, epochs {start_epoch}..{schedule.epochs}",
         main_proc)
    record: dict = {"epoch": start_epoch}
    end_of_checks()  # from here on errors are failures of the run, not usage errors
    for epoch in range(start_epoch, schedule.epochs):
        t0 = time.time()
        train_sampler.set_epoch(epoch)
        if ds_sampler is not None:
            ds_sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(rank_seed(args.seed, info.rank, epoch, 1))

        def make_distractors(images, targets, gc_targets, _g=generator):
            return gather_distractors(images, targets, gc_targets, generator=_g, fallback=fallback)

        stats = train_one_epoch(
            ddp_model, optimizer, train_loader, device, epoch, criterion=criterion,
            loss_fn=loss_fn, make_distractors=make_distractors, multilabel=train.multilabel,
            amp=args.amp, channels_last=channels_last, generator=generator, writer=writer,
            global_step=global_step, log_every=args.log_every,
            progress=not args.no_progress, num_classes=num_classes,
            min_batch_size=min_batch_size, gc_every=args.gc_every, gc_fraction=args.gc_fraction,
        )
        global_step = stats["global_step"]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_stats = None
        if val_loader is not None:
            val_stats = evaluate_classification(
                model, val_loader, device, multilabel=val.multilabel, amp=args.amp,
                channels_last=channels_last, num_classes=num_classes,
            )
        subset_stats, log_time = None, 0.0
        if monitor is not None:
            t_log = time.time()
            subset_stats = _log_validation(monitor, model, writer, epoch + 1, device, args,
                                           channels_last, main_proc)
            log_time = round(time.time() - t_log, 3)
        record = {"epoch": epoch + 1, "lr": lr, "train": stats, "val": val_stats,
                  "time_s": round(time.time() - t0, 3)}
        if monitor is not None:
            record["val_subset"] = subset_stats
            record["log_time_s"] = log_time
        if fallback is not None:
            record["fallback_distractors"] = fallback.num_loaded
        rng = gather_rng_states()  # collective: every rank takes part
        if main_proc:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "arch": args.arch,
                    "gmp": bool(args.gmp),
                    "num_classes": num_classes,
                    "classes": list(train.classes),
                    "multilabel": train.multilabel,
                    "data": args.data,
                    "image_size": args.image_size,
                    "args": vars(args),
                    "rng": rng,
                    "metrics": {"train": stats, "val": val_stats},
                },
                ckpt_path,
            )
            for key in ("loss", "classification", "consistency", "top1", "f1_per_class", "f1_overall",
                        "ungrouped", "mask_skipped"):
                if key in stats:
                    writer.add_scalar(f"epoch/train_{key}", stats[key], epoch + 1)
            for key, value in (val_stats or {}).items():
                if key not in ("samples", "skipped"):
                    writer.add_scalar(f"epoch/val_{key}", value, epoch + 1)
            writer.add_scalar("epoch/lr", lr, epoch + 1)
            writer.flush()
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        barrier()
    if writer is not None:
        writer.close()
    _log(f"done: {ckpt_path}", main_proc)
    return record


def cli(argv=None) -> dict:
    """The command line: every check before training ends as a usage error (status 2)."""
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    cli()
