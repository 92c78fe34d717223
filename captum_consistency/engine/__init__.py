"""Training and evaluation engine of the recipes: loops, checkpoints, torchrun helpers.

The recipes in ``recipes/`` (``train.py``, ``evaluate.py``, ``robustness.py``) are thin
command-line front ends over these functions, in the style of torchvision's classification
references; they can be reused from Python.
"""

from captum_consistency.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    check_checkpoint_compatible,
    load_checkpoint,
    load_model_weights,
    load_pretrained_backbone,
    load_torchvision_weights,
    torchvision_weights_path,
    remove_stale_temporaries,
    save_checkpoint,
)
from captum_consistency.engine.cli import (
    add_data_arguments,
    architecture,
    check_input_size,
    non_negative_int,
    positive_int,
    end_of_checks,
    non_negative_float,
    positive_float,
    probability,
    run_cli,
    unit_fraction,
    writable_dir,
)
from captum_consistency.engine.distributed import (
    DistributedInfo,
    all_reduce_sum,
    all_ranks_true,
    barrier,
    cleanup_distributed,
    distributed_session,
    gather_rng_states,
    get_rank,
    get_rng_state,
    get_world_size,
    init_distributed,
    is_main_process,
    rank_seed,
    seed_everything,
    set_rng_state,
)
from captum_consistency.engine.samplers import ShardSampler
from captum_consistency.engine.batches import TrainBatch, as_train_batch
from captum_consistency.engine.classification import evaluate_classification
from captum_consistency.engine.training import (
    ScaledBCEWithLogitsLoss,
    Schedule,
    default_schedule,
    finetune_schedule,
    sample_positive_class,
    train_one_epoch,
)
from captum_consistency.engine.shapes_benchmark import (
    FigureInputs,
    cue_statistics,
    evaluate_on_shapes,
    figure_inputs,
)
from captum_consistency.engine.transfer import TRANSFER_METHODS, evaluate_transfer
from captum_consistency.engine.audit import AUDIT_KEYS, audit_model, gradcam_explainer
from captum_consistency.engine.evaluation import distractor_classes_ok
from captum_consistency.engine.monitor import (
    PANEL_TAGS,
    GradCamPanels,
    fixed_indices,
    validation_scalars,
)

# Kept importable from here (their home is captum_consistency.metrics); not listed below.
from captum_consistency.metrics import multilabel_f1  # noqa: F401

__all__ = [
    # training
    "train_one_epoch",
    "TrainBatch",
    "as_train_batch",
    "sample_positive_class",
    "ScaledBCEWithLogitsLoss",
    "Schedule",
    "default_schedule",
    "finetune_schedule",
    "evaluate_classification",
    # the recipes' command line
    "add_data_arguments",
    "check_input_size",
    "positive_int",
    "architecture",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "probability",
    "writable_dir",
    "run_cli",
    "end_of_checks",
    "unit_fraction",
    "evaluate_transfer",
    "TRANSFER_METHODS",
    # the audit: did the model change, or only its map?
    "audit_model",
    "gradcam_explainer",
    "AUDIT_KEYS",
    # the procedural shapes benchmark (recipes/quickstart.py)
    "evaluate_on_shapes",
    "figure_inputs",
    "FigureInputs",
    "cue_statistics",
    # checkpoints
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "check_checkpoint_compatible",
    "load_model_weights",
    "load_pretrained_backbone",
    "load_torchvision_weights",
    "torchvision_weights_path",
    "remove_stale_temporaries",
    # torchrun
    "DistributedInfo",
    "distributed_session",
    "init_distributed",
    "cleanup_distributed",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_reduce_sum",
    "all_ranks_true",
    "ShardSampler",
    "seed_everything",
    "rank_seed",
    "get_rng_state",
    "set_rng_state",
    "gather_rng_states",
    "distractor_classes_ok",
    "GradCamPanels",
    "PANEL_TAGS",
    "fixed_indices",
    "validation_scalars",
]
