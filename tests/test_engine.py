"""Engine: model builders, atomic checkpoints, RNG states, samplers, F1, training loops."""

import os
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_consistency import GradCamConsistencyLoss
from captum_consistency.builders import build_model, gradcam_layer, gradcam_layer_name, unwrap_model
from captum_consistency.engine import (
    ScaledBCEWithLogitsLoss,
    ShardSampler,
    check_checkpoint_compatible,
    default_schedule,
    evaluate_classification,
    get_rng_state,
    load_checkpoint,
    load_model_weights,
    multilabel_f1,
    rank_seed,
    remove_stale_temporaries,
    sample_positive_class,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)

# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("arch", ["resnet18", "alexnet"])
def test_build_model_output_and_layer(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7).eval()
    size = 64 if arch == "resnet18" else 96
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    layer = gradcam_layer(model)
    assert layer is getattr(model, gradcam_layer_name(arch))
    # The layer's output is a spatial map (the Grad-CAM input), and a composite doubles it.
    out = {}
    handle = layer.register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    model(torch.randn(1, 3, 2 * size, 2 * size))
    handle.remove()
    assert out["a"].dim() == 4


def test_build_model_gmp_replaces_pooling_and_changes_output():
    torch.manual_seed(0)
    avg = build_model("resnet18", 5).eval()
    gmp = build_model("resnet18", 5, gmp=True).eval()
    gmp.load_state_dict(avg.state_dict())  # pooling has no parameters
    assert isinstance(gmp.avgpool, nn.AdaptiveMaxPool2d)
    assert isinstance(avg.avgpool, nn.AdaptiveAvgPool2d)
    x = torch.randn(2, 3, 64, 64)
    feats = {}
    h = gmp.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    logits = gmp(x)
    h.remove()
    expected = gmp.fc(feats["a"].amax(dim=(2, 3)))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, avg(x))


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        build_model("lenet", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 0)
    with pytest.raises(ValueError, match="gmp"):
        build_model("alexnet", 10, gmp=True)
    with pytest.raises(ValueError, match="Grad-CAM layer"):
        gradcam_layer(nn.Linear(2, 2))


def test_unwrap_model_through_dataparallel():
    net = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(net) is net


# ----------------------------------------------------------------------------- checkpoints


def test_save_checkpoint_roundtrip_weights_only(tmp_path):
    path = str(tmp_path / "run" / "checkpoint.pth")
    torch.manual_seed(1)
    state = {"model": nn.Linear(3, 2).state_dict(), "arch": "resnet18", "epoch": 4,
             "args": {"lr": 0.1, "milestones": [30, 60]}, "rng": [get_rng_state()]}
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and loaded["args"]["milestones"] == [30, 60]
    torch.testing.assert_close(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["format"] == 1
    assert os.listdir(tmp_path / "run") == ["checkpoint.pth"]  # no temporary left


def test_save_checkpoint_killed_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "arch": "resnet18", "epoch": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # the process is interrupted in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "arch": "resnet18", "epoch": 2}, path)
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_remove_stale_temporaries(tmp_path):
    path = tmp_path / "checkpoint.pth"
    (tmp_path / ".tmp-checkpoint.pth.abc").write_bytes(b"x")
    (tmp_path / "other.pth").write_bytes(b"x")
    assert remove_stale_temporaries(str(path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["other.pth"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_checkpoint(str(garbage))
    plain = tmp_path / "plain.pth"
    torch.save(nn.Linear(2, 2).state_dict(), plain)  # a bare state dict, not ours
    with pytest.raises(ValueError, match="not a captum-consistency checkpoint"):
        load_checkpoint(str(plain))


def test_checkpoint_compatibility_errors():
    ckpt = {"arch": "resnet50", "num_classes": 10, "gmp": False, "classes": list("abcdefghij")}
    with pytest.raises(ValueError, match=r"ck\.pth.*'resnet50'.*'resnet18'"):
        check_checkpoint_compatible(ckpt, "ck.pth", arch="resnet18")
    with pytest.raises(ValueError, match="gmp=False"):
        check_checkpoint_compatible(ckpt, "ck.pth", gmp=True)
    with pytest.raises(ValueError, match="10 classes, but the data has 5"):
        check_checkpoint_compatible(ckpt, "ck.pth", num_classes=5)
    with pytest.raises(ValueError, match="class names"):
        check_checkpoint_compatible(ckpt, "ck.pth", num_classes=10, classes=list("jihgfedcba"))
    check_checkpoint_compatible(ckpt, "ck.pth", arch="resnet50", num_classes=10, gmp=False,
                                classes=list("abcdefghij"))


def test_load_checkpoint_truncated_file_names_it_and_says_truncated(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": nn.Linear(64, 64).state_dict(), "arch": "resnet18"}, str(path))
    data = path.read_bytes()
    for keep in (len(data) // 2, 0):  # an interrupted copy; an empty file ("EOFError: ")
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=r"checkpoint\.pth .*truncated or corrupt") as info:
            load_checkpoint(str(path))
        assert not str(info.value).rstrip().endswith(": ")


def test_load_model_weights_from_other_architecture_names_both_briefly():
    r18 = build_model("resnet18", 4)
    r50 = build_model("resnet50", 4)
    with pytest.raises(ValueError, match="other.pth holds resnet50 weights, but resnet18 was asked for") as info:
        load_model_weights(r18, r50.state_dict(), "other.pth", arch="resnet18")
    assert len(str(info.value)) < 500  # not PyTorch's list of every mismatched tensor
    assert info.value.__suppress_context__
    with pytest.raises(ValueError, match="holds weights of another architecture, but ResNet was"):
        load_model_weights(r18, {"w": torch.zeros(1)}, "other.pth")


def test_load_model_from_checkpoint_names_the_file_for_bad_arch(tmp_path):
    from captum_consistency.engine.datasets import load_model_from_checkpoint

    r50 = build_model("resnet50", 4).state_dict()
    mislabelled = tmp_path / "mislabelled.pth"
    save_checkpoint({"model": r50, "arch": "resnet18", "num_classes": 4}, str(mislabelled))
    with pytest.raises(ValueError, match="mislabelled.pth holds resnet50 weights, but resnet18"):
        load_model_from_checkpoint(str(mislabelled), torch.device("cpu"))
    unknown = tmp_path / "unknown.pth"
    save_checkpoint({"model": {}, "arch": "lenet5", "num_classes": 4}, str(unknown))
    with pytest.raises(ValueError, match=r"unknown\.pth records the architecture 'lenet5'"):
        load_model_from_checkpoint(str(unknown), torch.device("cpu"))


# ----------------------------------------------------------------------------- RNG / seeds


def test_rng_state_roundtrip_through_file(tmp_path):
    seed_everything(3)
    state = get_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    save_checkpoint({"model": {}, "arch": "x", "rng": [state]}, str(tmp_path / "c.pth"))
    random.random(), np.random.rand(), torch.rand(5)  # move all generators on
    set_rng_state(load_checkpoint(str(tmp_path / "c.pth"))["rng"][0])
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_seeds_differ_per_rank_and_salt_and_are_reproducible():
    seeds = {rank_seed(0, r, e) for r in range(4) for e in range(4)}
    assert len(seeds) == 16
    assert rank_seed(7, 1, 2) == rank_seed(7, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)
    seed_everything(0, rank=0)
    a = torch.rand(4)
    seed_everything(0, rank=1)
    b = torch.rand(4)
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("n,world", [(0, 2), (7, 1), (7, 3), (10, 4)])
def test_shard_sampler_partitions_without_padding(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(n, world, world)


# ----------------------------------------------------------------------------- schedules, F1


def test_default_schedules_follow_the_paper():
    inet = default_schedule("imagenet", "resnet18")
    assert (inet.lr, inet.momentum, inet.weight_decay, inet.gc_lambda) == (0.1, 0.9, 1e-4, 25.0)
    assert inet.milestones == [30, 60] and inet.epochs == 90 and inet.cls_weight == 1.0
    assert default_schedule("imagenet", "alexnet").lr == 0.01
    coco = default_schedule("coco", "resnet18")
    assert (coco.gc_lambda, coco.cls_weight, coco.milestones) == (1.0, 80.0, [24, 30])
    with pytest.raises(ValueError, match="data"):
        default_schedule("cifar", "resnet18")


def test_scaled_bce_is_sum_over_classes_for_weight_k():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 8), (torch.rand(5, 8) > 0.5).float()
    got = ScaledBCEWithLogitsLoss(8.0)(logits, targets)
    ref = nn.BCEWithLogitsLoss(reduction="sum")(logits, targets) / 5
    torch.testing.assert_close(got, ref)


def test_multilabel_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 6)) < 0.3
    pred = rng.random((200, 6)) < 0.35
    pred[:, 5] = False  # a class never predicted: F1 0, as the authors count it
    t, p = torch.from_numpy(truth), torch.from_numpy(pred)
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)
    per_class, overall = multilabel_f1(tp, fp, fn)
    ref_per_class = f1_score(truth, pred, average=None, zero_division=0)
    np.testing.assert_allclose(per_class.numpy(), ref_per_class, rtol=1e-12)
    assert overall == pytest.approx(f1_score(truth, pred, average="micro", zero_division=0))


def test_sample_positive_class_picks_positives_uniformly():
    g = torch.Generator().manual_seed(0)
    targets = torch.zeros(3000, 5)
    targets[:, 1] = targets[:, 3] = 1
    targets[-1000:] = 0  # images without any label: any class
    picks = sample_positive_class(targets, g)
    assert picks.dtype == torch.long and picks.shape == (3000,)
    assert set(picks[:2000].tolist()) == {1, 3}
    frac = (picks[:2000] == 1).float().mean().item()
    assert 0.45 < frac < 0.55
    assert set(picks[2000:].tolist()) == set(range(5))
    with pytest.raises(ValueError, match="multi-hot"):
        sample_positive_class(torch.zeros(4))


# ----------------------------------------------------------------------------- loops


class _TinyResNetLike(nn.Module):
    """A small ResNet-shaped classifier (``layer4`` then global pooling) to keep loops fast."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer4(self.stem(x))).flatten(1))


class _ShapeLog(nn.Module):
    """Wraps a model and records the spatial size of every input it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.inner(x)


def _tiny_loader(n=16, classes=4, size=32, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x += y.view(-1, 1, 1, 1).float() * 0.5  # learnable signal
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _in_batch_distractors(images, targets, gc_targets):
    # Test double: the next images in the batch whose label differs (rolled), exact and simple.
    n = images.shape[0]
    idx = []
    for i in range(n):
        others = [j for j in range(n) if targets[j] != gc_targets[i]]
        idx.append((others * 3)[:3])
    return images[torch.tensor(idx)]


def test_train_one_epoch_baseline_never_builds_composites():
    torch.manual_seed(0)
    model = _ShapeLog(_TinyResNetLike(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, opt, _tiny_loader(), torch.device("cpu"), 0,
                            criterion=nn.CrossEntropyLoss(), progress=False)
    assert set(model.sizes) == {(32, 32)}  # no 2S x 2S composite forward
    assert stats["steps"] == 2 and stats["samples"] == 16 and "consistency" not in stats
    assert 0.0 <= stats["top1"] <= 1.0 and stats["loss"] > 0


def test_train_one_epoch_gc_matches_manual_steps():
    torch.manual_seed(0)
    ref = _TinyResNetLike(4)
    ours = _TinyResNetLike(4)
    ours.load_state_dict(ref.state_dict())
    logged = _ShapeLog(ours)
    loader = _tiny_loader()
    device = torch.device("cpu")

    # Manual reference: the same GC steps written out by hand, same cells.
    g = torch.Generator().manual_seed(5)
    ref_loss = GradCamConsistencyLoss(ref, ref.layer4, lam=25.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    ref_parts = []
    for x, y in loader:
        cells = torch.randint(0, 4, (x.shape[0],), generator=g)
        out = ref_loss(x, y, _in_batch_distractors(x, y, y), cells=cells)
        ref_opt.zero_grad()
        out.loss.backward()
        ref_opt.step()
        ref_parts.append((out.classification.item(), out.consistency.item()))

    opt = torch.optim.SGD(logged.parameters(), lr=0.01, momentum=0.9)
    loss_fn = GradCamConsistencyLoss(logged, ours.layer4, lam=25.0)
    stats = train_one_epoch(logged, opt, loader, device, 0, criterion=nn.CrossEntropyLoss(),
                            loss_fn=loss_fn, make_distractors=_in_batch_distractors,
                            generator=torch.Generator().manual_seed(5), progress=False)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q)
    assert (64, 64) in logged.sizes and (32, 32) in logged.sizes  # composites are 2S x 2S
    mean_cls = sum(c for c, _ in ref_parts) / len(ref_parts)
    mean_gc = sum(c for _, c in ref_parts) / len(ref_parts)
    assert stats["classification"] == pytest.approx(mean_cls, rel=1e-5)
    assert stats["consistency"] == pytest.approx(mean_gc, rel=1e-5)
    assert stats["loss"] == pytest.approx(mean_cls + 25.0 * mean_gc, rel=1e-5)


def test_train_one_epoch_skips_batches_below_min_batch_size():
    # Batches that --skip-corrupt shrank: 8 images, 1 (batch norm cannot train on one image
    # with 1x1 maps), 0 (all undecodable), 7. The short ones are skipped and counted.
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(k, 3, 32, 32, generator=g), torch.arange(k) % 4) for k in (8, 1, 0, 7)]
    model = _TinyResNetLike(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, opt, batches, torch.device("cpu"), 0,
                            criterion=nn.CrossEntropyLoss(), progress=False, min_batch_size=2)
    assert stats["steps"] == 2 and stats["skipped_steps"] == 2 and stats["samples"] == 15
    with pytest.raises(ValueError, match="min_batch_size"):
        train_one_epoch(model, opt, batches, torch.device("cpu"), 0,
                        criterion=nn.CrossEntropyLoss(), progress=False, min_batch_size=0)


def test_all_ranks_true_outside_a_process_group_is_the_local_vote():
    from captum_consistency.engine import all_ranks_true

    assert all_ranks_true(True) is True and all_ranks_true(False) is False


def test_train_one_epoch_refuses_bool_gradcam_targets():
    from captum_consistency.engine import TrainBatch

    model = _TinyResNetLike(4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    z = torch.randn(4, 3, 3, 32, 32)
    loader = [TrainBatch(x, y, z, torch.tensor([True, False, True, False]))]
    with pytest.raises(TypeError, match="gradcam_targets must be an integer tensor .*bool"):
        train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                        torch.device("cpu"), 0, criterion=nn.CrossEntropyLoss(),
                        loss_fn=GradCamConsistencyLoss(model, model.layer4),
                        make_distractors=_in_batch_distractors, progress=False)


def test_train_one_epoch_requires_distractors_with_gc_loss():
    model = _TinyResNetLike(4)
    loss_fn = GradCamConsistencyLoss(model, model.layer4)
    with pytest.raises(ValueError, match="make_distractors"):
        train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), _tiny_loader(),
                        torch.device("cpu"), 0, criterion=nn.CrossEntropyLoss(), loss_fn=loss_fn)


def test_train_one_epoch_multilabel_uses_positive_classes_and_f1():
    torch.manual_seed(0)
    model = _TinyResNetLike(3)
    x = torch.randn(8, 3, 32, 32)
    y = torch.zeros(8, 3)
    y[torch.arange(8), torch.arange(8) % 3] = 1
    y[0, 2] = 1
    seen = []

    def distractors(images, targets, gc_targets):
        seen.append((targets.clone(), gc_targets.clone()))
        return images.unsqueeze(1).expand(-1, 3, -1, -1, -1).flip(0)

    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0,
                                     criterion=ScaledBCEWithLogitsLoss(3.0))
    stats = train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01),
                            DataLoader(TensorDataset(x, y), batch_size=4), torch.device("cpu"), 0,
                            criterion=ScaledBCEWithLogitsLoss(3.0), loss_fn=loss_fn,
                            make_distractors=distractors, multilabel=True, num_classes=3,
                            generator=torch.Generator().manual_seed(0), progress=False)
    for targets, gc in seen:
        assert bool(targets[torch.arange(len(gc)), gc].all())  # always a positive class
    assert {"f1_per_class", "f1_overall", "exact_match"} <= set(stats) and "top1" not in stats


def test_train_one_epoch_writes_tensorboard_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _TinyResNetLike(4)
    writer = SummaryWriter(str(tmp_path))
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
    stats = train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), _tiny_loader(),
                            torch.device("cpu"), 0, criterion=nn.CrossEntropyLoss(),
                            loss_fn=loss_fn, make_distractors=_in_batch_distractors, writer=writer,
                            global_step=10, log_every=1, progress=False)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/classification", "loss/consistency", "lr", "train/top1_batch"} <= tags
    assert [e.step for e in acc.Scalars("loss/total")] == [11, 12]
    assert stats["global_step"] == 12


def test_train_one_epoch_steps_a_per_step_lr_scheduler():
    model = _TinyResNetLike(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    stats = train_one_epoch(model, optimizer, _tiny_loader(), torch.device("cpu"), 0,
                            criterion=nn.CrossEntropyLoss(), lr_scheduler=per_step, progress=False)
    assert stats["steps"] == 2 and per_step.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)


def test_classification_meter_named_sums():
    from captum_consistency.metrics import ClassificationMeter

    meter = ClassificationMeter(torch.device("cpu"))
    meter.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]),
                 loss=torch.tensor(1.0), classification=torch.tensor(0.5))
    meter.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), loss=torch.tensor(4.0))
    assert float(meter.correct) == 2 and float(meter.count) == 3 and float(meter.loss) == 6.0
    assert meter.result() == {"loss": 2.0, "classification": 1 / 3, "consistency": 0.0,
                              "samples": 3, "top1": 2 / 3}
    multi = ClassificationMeter(torch.device("cpu"), num_classes=2, multilabel=True)
    multi.update(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1, 0], [0, 1]]))
    assert multi.true_pos.tolist() == [1, 1] and multi.false_pos.tolist() == [1, 0]
    assert multi.result()["exact_match"] == 0.5


def test_distributed_session_cleans_up_when_the_block_raises(monkeypatch):
    from captum_consistency.engine import distributed_session

    calls = []
    monkeypatch.setattr("captum_consistency.engine.distributed.cleanup_distributed",
                        lambda: calls.append("cleanup"))
    with pytest.raises(RuntimeError, match="boom"):
        with distributed_session("cpu") as info:
            assert info.world_size == 1 and not info.distributed
            raise RuntimeError("boom")
    assert calls == ["cleanup"]


def test_evaluate_classification_top1_exact():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    x = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([1, 0, 0, 0])  # 2 of 4 right
    res = evaluate_classification(model, DataLoader(TensorDataset(x, y), batch_size=3),
                                  torch.device("cpu"))
    assert res == {"top1": 0.5, "samples": 4, "skipped": 0}
    assert model.training  # mode restored


# ----------------------------------------------------------------------------- evaluation


def test_saliency_explainer_matches_captum_for_every_pair():
    from captum.attr import LayerGradCam

    from captum_consistency.attr import LayerElementwiseGradCam
    from captum_consistency.engine.evaluation import SaliencyExplainer

    torch.manual_seed(0)
    model = build_model("resnet18", 5, gmp=True).eval()  # GMP: the two Grad-CAMs differ
    x = torch.randn(3, 3, 64, 80)
    # image 0 explained for 2 classes, image 1 for 1, image 2 for 3 (multi-label rounds)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    classes = torch.tensor([1, 4, 0, 2, 3, 1])
    for method, ref_cls in (("gradcam", LayerGradCam), ("elementwise-gradcam", LayerElementwiseGradCam)):
        got = SaliencyExplainer(model, method)(x, index, classes)
        ref = ref_cls(model, model.layer4).attribute(x[index], target=classes, relu_attributions=True)
        assert got.shape == ref.shape == (6, 1, 2, 3)
        # rtol 1e-4: LayerElementwiseGradCam runs eval models channels-last on the CPU.
        torch.testing.assert_close(got, ref.detach(), rtol=1e-4, atol=1e-6)
    g = SaliencyExplainer(model, "gradcam")(x, index, classes)
    e = SaliencyExplainer(model, "elementwise-gradcam")(x, index, classes)
    assert not torch.allclose(g, e)
    with pytest.raises(ValueError, match="unknown attribution 'lime'"):
        SaliencyExplainer(model, "lime")


def _imagenet_whole_loader(fx, batch_size, **kw):
    from captum_consistency.data import SizeGroupedBatchSampler
    from captum_consistency.engine.datasets import build_dataset

    whole = build_dataset("imagenet", "val", "whole", 32, data_root=fx.root, boxes=fx.boxes_dirs["val"], **kw)
    sampler = SizeGroupedBatchSampler(whole.dataset.original_sizes(), batch_size, short_side=None)
    return whole, DataLoader(whole.dataset, batch_sampler=sampler, collate_fn=whole.collate_fn)


def test_batched_evaluation_equals_batch_size_one(tmp_path):
    from tests._fixtures_data import make_imagenet_folder

    from captum_consistency.engine.evaluation import evaluate_interpretations

    fx = make_imagenet_folder(tmp_path / "inet", num_classes=3, images_per_class=4, splits=("val",))
    torch.manual_seed(0)
    model = build_model("resnet18", 3, gmp=True).eval()
    results = []
    for bs in (1, 8):
        whole, loader = _imagenet_whole_loader(fx, bs)
        if bs == 8:
            assert max(len(b) for b in loader.batch_sampler) > 1  # really batched
        results.append(evaluate_interpretations(
            model, "elementwise-gradcam", loader, None, torch.device("cpu"), num_classes=3,
            spg_generator=torch.Generator().manual_seed(0), progress=False))
    one, many = results
    assert one["num_images"] == many["num_images"] == 12
    assert one["pg"] == many["pg"]
    assert one["ch"] == pytest.approx(many["ch"], abs=1e-6)
    assert one["pg_per_class"] == many["pg_per_class"]


def test_whole_image_pairs_masks_and_difficult_skip(tmp_path):
    from tests._fixtures_data import make_imagenet_folder, write_voc_xml

    from captum_consistency.engine.evaluation import whole_image_pairs

    fx = make_imagenet_folder(tmp_path / "inet", num_classes=2, images_per_class=2, splits=("val",))
    # Make the first image's boxes all difficult: the authors skip such images.
    stem = os.path.splitext(os.path.basename(fx.files["val"][0]))[0]
    h, w = fx.sizes[stem]
    write_voc_xml(os.path.join(fx.boxes_dirs["val"], stem + ".xml"), stem, (h, w),
                  [(fx.classes[0], (3, 4, 10, 12), True)])
    whole, loader = _imagenet_whole_loader(fx, 1)
    seen, skipped = [], 0
    for batch in loader:
        pairs = whole_image_pairs(batch, torch.device("cpu"))
        skipped += pairs.skipped
        if pairs.image_index.numel():
            i = int(batch.indices[0])
            s = os.path.splitext(os.path.basename(whole.dataset.samples[i][0]))[0]
            expected = torch.zeros(fx.sizes[s], dtype=torch.bool)
            for x1, y1, x2, y2, _ in fx.boxes[s]:  # read as VOC 1-based corners, as TorchRay
                expected[max(y1 - 1, 0) : y2, max(x1 - 1, 0) : x2] = True
            assert torch.equal(pairs.masks[0], expected)
            assert pairs.size == fx.sizes[s] and int(pairs.classes[0]) == fx.labels["val"][i]
            seen.append(s)
    assert skipped == 1 and stem not in seen and len(seen) == 3
