"""Interpretation metrics of the paper (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3).

Functional metrics score a batch of saliency maps, one value per sample:
[`pointing_game`][captum_consistency.metrics.pointing_game],
[`stochastic_pointing_game`][captum_consistency.metrics.stochastic_pointing_game],
[`content_heatmap`][captum_consistency.metrics.content_heatmap] and
[`negative_quadrants_heatmap`][captum_consistency.metrics.negative_quadrants_heatmap].
[`InterpretationMetrics`][captum_consistency.metrics.InterpretationMetrics] aggregates them over a
dataset as the paper does (per-class PG, SPG mean and std over 5 runs, per-image CH and NQH),
across batches and ``torch.distributed`` processes.
[`boxes_to_mask`][captum_consistency.metrics.boxes_to_mask] and
[`resize_saliency`][captum_consistency.metrics.resize_saliency] prepare the inputs.
The same four metrics as ``torchmetrics.Metric`` classes, states summed across processes:
[`PointingGame`][captum_consistency.metrics.PointingGame],
[`StochasticPointingGame`][captum_consistency.metrics.StochasticPointingGame],
[`ContentHeatmap`][captum_consistency.metrics.ContentHeatmap] and
[`NegativeQuadrantsHeatmap`][captum_consistency.metrics.NegativeQuadrantsHeatmap].
[`multilabel_f1`][captum_consistency.metrics.multilabel_f1] and
[`ClassificationMeter`][captum_consistency.metrics.ClassificationMeter] score the classifier
itself (top-1, multi-label F1) in the training and evaluation loops.

The audit's measures do not trust any map: on 2x2 composites,
[`cell_ablation_share`][captum_consistency.metrics.cell_ablation_share] (the counterfactual twin
of NQH) and [`own_cell_removed`][captum_consistency.metrics.own_cell_removed] read the model's
outputs with cells replaced; [`deletion_curves`][captum_consistency.metrics.deletion_curves] and
[`road_score`][captum_consistency.metrics.road_score] test whether a map is faithful;
[`cascading_randomization`][captum_consistency.metrics.cascading_randomization] is Adebayo et
al.'s sanity check.
"""

from captum_consistency.metrics._accumulator import InterpretationMetrics
from captum_consistency.metrics.ablation import (
    ABLATION_BASELINES,
    CellAblation,
    OwnCellRemoved,
    cell_ablation_share,
    cell_replacement,
    own_cell_removed,
)
from captum_consistency.metrics.faithfulness import (
    DeletionCurves,
    deletion_curves,
    random_maps,
    road_score,
)
from captum_consistency.metrics.randomization import (
    RandomizationStep,
    cascading_randomization,
    spearman_correlation,
)
from captum_consistency.metrics._classification import ClassificationMeter, multilabel_f1
from captum_consistency.metrics.heatmaps import content_heatmap, negative_quadrants_heatmap
from captum_consistency.metrics.pointing import pointing_game, stochastic_pointing_game
from captum_consistency.metrics._preprocess import boxes_to_mask, resize_saliency
from captum_consistency.metrics._torchmetrics import (
    ContentHeatmap,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
)

__all__ = [
    "pointing_game",
    "stochastic_pointing_game",
    "content_heatmap",
    "negative_quadrants_heatmap",
    "boxes_to_mask",
    "resize_saliency",
    "InterpretationMetrics",
    "multilabel_f1",
    "ClassificationMeter",
    # the audit: model-level, faithfulness and sanity measures
    "cell_ablation_share",
    "own_cell_removed",
    "cell_replacement",
    "ABLATION_BASELINES",
    "CellAblation",
    "OwnCellRemoved",
    "deletion_curves",
    "DeletionCurves",
    "road_score",
    "random_maps",
    "cascading_randomization",
    "RandomizationStep",
    "spearman_correlation",
    "PointingGame",
    "StochasticPointingGame",
    "ContentHeatmap",
    "NegativeQuadrantsHeatmap",
]
