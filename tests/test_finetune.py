"""Fine-tuning with GC: torchvision's pretrained weights by their enum name
(``load_torchvision_weights``, ``recipes/train.py --weights``), read from a ``TORCH_HOME``
cache without the network; the fine-tuning schedule and its resume; the partial-GC options."""

import json
import urllib.error

import pytest
import torch
import torchvision

from captum_consistency.builders import build_model
from captum_consistency.engine import (
    finetune_schedule,
    load_checkpoint,
    load_torchvision_weights,
    torchvision_weights_path,
)
from tests._recipes import load_recipe, run_recipe

train = load_recipe("train")

ARCH, NAME = "mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A TORCH_HOME holding NAME's file (random weights of the architecture, saved under the
    file name of the enum's URL), and a network that fails if anything tries to download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in the tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    path = torchvision_weights_path(torchvision.models.get_weight(NAME))
    assert path == str(tmp_path / "torch-home" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    torch.manual_seed(123)
    state = build_model(ARCH, num_classes=1000).state_dict()
    import os

    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    return path, state


def test_weights_come_from_the_torch_home_cache(offline_cache):
    _, state = offline_cache
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=1000)
    assert not torch.equal(model.state_dict()["features.0.0.weight"], state["features.0.0.weight"])
    assert load_torchvision_weights(model, NAME, ARCH) == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_a_classifier_of_another_size_is_reinitialised(offline_cache):
    _, state = offline_cache
    model = build_model(ARCH, num_classes=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    left = load_torchvision_weights(model, NAME, ARCH)
    assert left == ["classifier.3.bias", "classifier.3.weight"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, fresh[key] if key in left else state[key], rtol=0, atol=0)


def test_offline_without_the_file_says_where_to_put_it(tmp_path, monkeypatch, offline_cache):
    path, _ = offline_cache
    import os

    os.remove(path)
    with pytest.raises(RuntimeError, match="offline.*put it at " + path.replace(".", r"\.")):
        load_torchvision_weights(build_model(ARCH, num_classes=5), NAME, ARCH)


def test_unknown_weights_list_the_valid_names():
    with pytest.raises(ValueError, match="not torchvision weights of resnet50: use one of "
                                         "ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2"):
        load_torchvision_weights(build_model("resnet50", 10), "ResNet50_Weights.IMAGENET1K_V3", "resnet50")
    with pytest.raises(ValueError, match="use one of ResNet18_Weights.IMAGENET1K_V1"):
        load_torchvision_weights(build_model("resnet18", 10), NAME, "resnet18")  # another arch's


def test_finetune_schedule_is_a_share_of_the_epochs_at_a_larger_lambda():
    s = finetune_schedule("imagenet", "resnet50")
    assert (s.lr, s.epochs, s.milestones, s.gc_lambda) == (0.1, 6, [], 200.0)
    c = finetune_schedule("coco", "resnet18")
    assert (c.lr, c.epochs, c.gc_lambda, c.cls_weight) == (0.01, 3, 8.0, 80.0)
    assert finetune_schedule("imagenet", "alexnet").lr == 0.01


@pytest.mark.parametrize("argv, message", [
    (["--weights", NAME, "--init-from", "x.pth"], "not allowed with argument"),
    (["--gc-every", "0"], "argument --gc-every: must be >= 1"),
    (["--gc-fraction", "0"], r"argument --gc-fraction: must be in \(0, 1\]"),
    (["--gc-fraction", "1.5"], r"argument --gc-fraction: must be in \(0, 1\]"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.get_args_parser().parse_args(["--data", "synthetic", "--output-dir", "x", *argv])
    assert err.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_train_with_weights_then_resume_continues_the_finetune_schedule(offline_cache, tmp_path,
                                                                        capsys, one_thread):
    _, state = offline_cache
    out = tmp_path / "run"
    common = ["--data", "synthetic", "--arch", ARCH, "--image-size", "64", "--batch-size", "8",
              "--device", "cpu", "--workers", "0", "--synthetic-train-length", "16",
              "--synthetic-val-length", "8", "--no-progress", "--output-dir", out,
              "--gc-every", "2"]
    run_recipe(train, common + ["--weights", NAME, "--epochs", "1"])
    log = capsys.readouterr().out
    assert sum("classifier re-initialised" in line for line in log.splitlines()) == 1
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["args"]["schedule_kind"] == "finetune"
    assert "T_max" in ckpt["scheduler"]  # the cosine, not the paper's MultiStepLR
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["lr"] == pytest.approx(0.1)  # finetune_schedule("synthetic"): the paper's lr
    assert record["train"]["gc_steps"] == 1 and record["train"]["steps"] == 2
    # resumed without --weights: the checkpoint's fine-tuning schedule goes on
    run_recipe(train, common + ["--resume", out / "checkpoint.pth", "--epochs", "2"])
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["epoch"] == 2 and ckpt["args"]["schedule_kind"] == "finetune"
    assert "T_max" in ckpt["scheduler"]
