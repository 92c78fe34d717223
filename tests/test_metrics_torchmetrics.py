"""The torchmetrics classes (PointingGame, StochasticPointingGame, ContentHeatmap,
NegativeQuadrantsHeatmap): equal to the functional metrics, to one process when two gloo
processes share the data, to TorchRay's pointing game and to 1 - Quantus' Focus; degenerate
maps and masks are counted as skipped."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

from captum_consistency.metrics import (
    ContentHeatmap,
    InterpretationMetrics,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
    content_heatmap,
    negative_quadrants_heatmap,
    pointing_game,
)
from tests.test_metrics import peaked_maps, random_masks

NUM_CLASSES = 3


def _data(rank: int):
    gen = torch.Generator().manual_seed(500 + rank)
    n, h, w = 6 + 3 * rank, 24, 24  # uneven shards
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    if rank == 1:
        saliency[0] = 0  # all-zero map
        saliency[1, 3, 3] = float("nan")  # a peer's NaN map
        masks[2] = False  # empty mask
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    composites = torch.rand(n, 2 * h, 2 * w, generator=gen)
    if rank == 1:
        composites[0] = 0
        composites[1, 0, 0] = float("nan")
    cells = torch.randint(0, 4, (n,), generator=gen)
    return saliency, masks, labels, composites, cells


def _metrics():
    return {
        "pg": PointingGame(NUM_CLASSES),
        "pg_micro": PointingGame(NUM_CLASSES, average="micro"),
        "spg": StochasticPointingGame(num_samples=50, num_runs=3, generator=torch.Generator(),
                                      return_std=True),
        "ch": ContentHeatmap(),
        "nqh": NegativeQuadrantsHeatmap(),
    }


def _update(metrics, rank: int) -> None:
    saliency, masks, labels, composites, cells = _data(rank)
    metrics["spg"].generator.manual_seed(1000 + rank)
    metrics["pg"].update(saliency, masks, labels)
    metrics["pg_micro"].update(saliency, masks, labels)
    metrics["spg"].update(saliency, masks)
    metrics["ch"].update(saliency, masks)
    metrics["nqh"].update(composites, cells)


def _results(metrics):
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out[name] = torch.stack(value) if isinstance(value, tuple) else value
        with metric.sync_context():  # the skipped count of every process (torchmetrics' sync)
            out[name + "_skipped"] = metric.skipped.clone()
    return out


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        metrics = _metrics()
        _update(metrics, rank)
        torch.save(_results(metrics), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _functional_reference():
    """The same numbers from the functional metrics, by hand."""
    pg, ch, nqh, labels = [], [], [], []
    accumulator = InterpretationMetrics(num_classes=NUM_CLASSES, num_samples=50, num_runs=3,
                                        generator=torch.Generator())
    for rank in range(2):
        saliency, masks, lab, composites, cells = _data(rank)
        # a map with NaN is skipped: zero it, the functional metrics skip all-zero maps
        for maps in (saliency, composites):
            maps.masked_fill_(torch.isnan(maps).flatten(1).any(1).view(-1, 1, 1), 0.0)
        pg.append(pointing_game(saliency, masks))
        ch.append(content_heatmap(saliency, masks))
        nqh.append(negative_quadrants_heatmap(composites, cells))
        labels.append(lab)
        # SPG draws all runs' points at once, in the order of the library's own accumulator
        # (InterpretationMetrics), so that both give the same SPG for a seeded generator
        accumulator.generator.manual_seed(1000 + rank)
        accumulator.update(saliency, masks, lab)
    pg, ch, nqh, labels = (torch.cat(v) for v in (pg, ch, nqh, labels))
    ok = ~torch.isnan(pg)
    per_class = [pg[ok & (labels == c)].double().mean() for c in range(NUM_CLASSES)]
    acc = accumulator.compute()
    return {
        "pg": torch.stack(per_class).mean(), "pg_micro": pg[ok].double().mean(),
        "spg": torch.tensor([acc["spg_mean"], acc["spg_std"]]),
        "ch": ch[ok].double().mean(), "nqh": nqh[~torch.isnan(nqh)].double().mean(),
        "pg_skipped": 3, "pg_micro_skipped": 3, "spg_skipped": 3, "ch_skipped": 3, "nqh_skipped": 2,
    }


def test_two_gloo_processes_equal_one_process_and_the_functional_metrics():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    single = _metrics()
    for rank in range(2):
        _update(single, rank)  # the same data and draws in one process
    expected = _results(single)
    reference = _functional_reference()
    for key, value in reference.items():
        torch.testing.assert_close(expected[key].double(), torch.as_tensor(value).double(), msg=key)
    for result in results:
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert 0 < float(expected["pg"]) < 1 and float(expected["pg"]) != float(expected["pg_micro"])


def test_states_are_sums_without_full_state_update():
    for metric in _metrics().values():
        assert isinstance(metric, Metric) and metric.full_state_update is False
        assert all(fx is not None and fx.__name__ == "dim_zero_sum" for fx in metric._reductions.values())
        assert "skipped" in metric._defaults


def test_torchmetrics_pg_equals_torchray_pointing_game():
    """Per-class hit rates and their mean against TorchRay's PointingGame, fed the same points."""
    from torchray.benchmark.pointing_game import PointingGame as TorchRayPointingGame

    gen = torch.Generator().manual_seed(0)
    n, h, w, classes = 48, 64, 80, 4
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    labels = torch.randint(0, classes, (n,), generator=gen)
    ours = PointingGame(classes, tolerance=15)
    for chunk in torch.arange(n).split(20):  # several batches
        ours.update(saliency[chunk], masks[chunk], labels[chunk])
    game = TorchRayPointingGame(num_classes=classes, tolerance=15)
    flat = saliency.view(n, -1).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchRay's meshgrid without indexing=
        for i in range(n):
            point = (int(flat[i] % w), int(flat[i] // w))
            game.aggregate(game.evaluate(masks[i], point), int(labels[i]))
    hits, misses = game.hits.clone(), game.misses.clone()
    theirs = (hits / (hits + misses)).double()
    assert 0 < int(hits.sum()) < n  # both outcomes are exercised
    torch.testing.assert_close(ours.per_class(), theirs)
    torch.testing.assert_close(ours.compute(), theirs.mean())


def test_quadrant_order_is_pinned_against_quantus_focus():
    """Cell k is row k // 2, column k % 2 (compose_grid's convention), and Quantus' Focus
    reads its one-hot custom_batch in the same order: a map whose mass is all in cell k has
    NQH 0 and Focus 1 with the cell k, and NQH 1 and Focus 0 with any other."""
    import quantus  # a test dependency: a missing peer must fail, not skip

    h = w = 8
    maps = torch.zeros(4, h, w)
    for k in range(4):
        r, c = k // 2, k % 2
        maps[k, r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2] = 1.0
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    focus = quantus.Focus(normalise=False, abs=False, disable_warnings=True)
    for shift in range(4):
        cells = (torch.arange(4) + shift) % 4
        nqh = NegativeQuadrantsHeatmap()
        nqh.update(maps, cells)
        theirs = focus(model=model, x_batch=np.zeros((4, 3, h, w), np.float32), y_batch=np.zeros(4, int),
                       a_batch=maps.unsqueeze(1).numpy(),
                       custom_batch=torch.nn.functional.one_hot(cells, 4).numpy(), batch_size=4)
        expected = 0.0 if shift == 0 else 1.0
        assert float(nqh.compute()) == expected
        np.testing.assert_allclose(np.asarray(theirs), 1.0 - expected)


def test_torchmetrics_nqh_equals_one_minus_quantus_focus():
    import quantus  # a test dependency: a missing peer must fail, not skip

    gen = torch.Generator().manual_seed(4)
    n, h, w = 12, 33, 35
    saliency = torch.rand(n, h, w, generator=gen) ** 3
    cells = torch.randint(0, 4, (n,), generator=gen)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    theirs = quantus.Focus(normalise=False, abs=False, disable_warnings=True)(
        model=model, x_batch=np.zeros((n, 3, h, w), np.float32), y_batch=np.zeros(n, int),
        a_batch=saliency.unsqueeze(1).numpy(), custom_batch=torch.nn.functional.one_hot(cells, 4).numpy(),
        batch_size=n,
    )
    nqh = NegativeQuadrantsHeatmap()
    nqh.update(saliency[:5], cells[:5])
    nqh.update(saliency[5:], cells[5:])
    np.testing.assert_allclose(float(nqh.compute()), float(np.mean(1 - np.asarray(theirs))), rtol=1e-6)


def test_degenerate_inputs_are_skipped_and_nothing_scored_is_nan():
    maps = torch.zeros(3, 8, 8)
    maps[1, 2, 2] = float("nan")
    maps[2, 4, 4] = float("inf")
    masks = torch.ones(3, 8, 8, dtype=torch.bool)
    for metric, args in ((PointingGame(), (maps, masks)), (ContentHeatmap(), (maps, masks)),
                         (StochasticPointingGame(num_runs=2), (maps, masks)),
                         (NegativeQuadrantsHeatmap(), (maps, torch.tensor([0, 1, 2])))):
        metric.update(*args)
        assert int(metric.skipped) == 3
        value = metric.compute()
        assert all(torch.isnan(v) for v in (value if isinstance(value, tuple) else (value,)))
    ok = torch.zeros(2, 8, 8)
    ok[:, 1, 1] = 1.0
    empty = torch.zeros(2, 8, 8, dtype=torch.bool)
    empty[0, 1, 1] = True
    pg = PointingGame()
    pg.update(ok, empty)  # the second mask is empty
    assert float(pg.compute()) == 1.0 and int(pg.skipped) == 1
    with pytest.raises(ValueError, match="non-negative"):
        ContentHeatmap().update(-torch.ones(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels are required"):
        PointingGame(2).update(ok, empty)
    with pytest.raises(ValueError, match="average must be 'macro' or 'micro'"):
        PointingGame(average="weighted")
