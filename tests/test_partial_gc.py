"""Partial GC (``train_one_epoch(gc_every=K)``, ``gc_fraction=p``): the steps without the
consistency term are plain steps (no composite, no double backward), the GC steps are the
loss's own, and the counts of the cost are right."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from captum_consistency import GradCamConsistencyLoss
from captum_consistency.data import gather_distractors
from captum_consistency.engine import training
from captum_consistency.models import SmallResNet


def _graph_names(tensor):
    """Names of every autograd node reachable from ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


def _second_order(names, plain):
    """The nodes of a loss graph that a classification step's graph (``plain``) lacks: the
    composite's forward and the differentiable gradient of the map (double backpropagation
    through the head at layer4: its Mm/Expand nodes, the normalisation and the L1)."""
    return set(names) - set(plain)


def _setup(composites="shared", n=32, steps=4):
    torch.manual_seed(0)
    model = SmallResNet(4, widths=(4, 8, 8, 8))
    images = torch.randn(n * steps, 3, 16, 16)
    labels = torch.arange(n * steps) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=n)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=8.0, composites=composites)
    return model, loader, optimizer, loss_fn


def _record_steps(monkeypatch):
    """Patches the step objects so that each step's loss graph is recorded in order."""
    steps = []
    plain_cls, gc_step = training._PlainStep, training._gc_step

    class Plain(plain_cls):
        def __init__(self, logits, loss):
            super().__init__(logits, loss)
            steps.append(("plain", _graph_names(loss)))

    def gc(*args, **kwargs):
        out = gc_step(*args, **kwargs)
        steps.append(("gc", _graph_names(out.loss)))
        return out

    monkeypatch.setattr(training, "_PlainStep", Plain)
    monkeypatch.setattr(training, "_gc_step", gc)
    return steps


def test_gc_every_plain_steps_have_no_second_order_nodes(monkeypatch, one_thread):
    model, loader, optimizer, loss_fn = _setup()
    images, labels = next(iter(loader))
    reference = _graph_names(torch.nn.CrossEntropyLoss()(model(images), labels))
    steps = _record_steps(monkeypatch)
    double = []  # the create_graph=True gradients taken (double backpropagation)
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        double.append(bool(kwargs.get("create_graph")))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    stats = training.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0,
                                     criterion=torch.nn.CrossEntropyLoss(), loss_fn=loss_fn,
                                     progress=False, gc_every=2, global_step=0)
    assert [kind for kind, _ in steps] == ["gc", "plain", "gc", "plain"]
    assert double == [True, True]  # one differentiable gradient per GC step, none otherwise
    gc_names = [names for kind, names in steps if kind == "gc"]
    plain_names = [names for kind, names in steps if kind == "plain"]
    assert all(_second_order(names, reference) for names in gc_names)  # the check can see them
    # a plain step's graph is exactly a classification step's: the model and the criterion
    assert all(names == reference for names in plain_names)
    assert stats["gc_steps"] == 2 and stats["gc_images"] == 64 and stats["steps"] == 4
    assert stats["composites"] == 16 + stats["ungrouped"]  # shared: N / 4 per grouped batch


def test_gc_every_counts_from_the_global_step(monkeypatch, one_thread):
    """A resumed epoch keeps the rhythm of the whole run: the GC steps are the multiples of K
    of the global step."""
    model, loader, optimizer, loss_fn = _setup()
    steps = _record_steps(monkeypatch)
    training.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 1,
                             criterion=torch.nn.CrossEntropyLoss(), loss_fn=loss_fn,
                             progress=False, gc_every=3, global_step=5)
    assert [kind for kind, _ in steps] == ["plain", "gc", "plain", "plain"]  # steps 5, 6, 7, 8


def test_gc_fraction_term_on_the_first_images_only(monkeypatch, one_thread):
    model, loader, optimizer, loss_fn = _setup(composites="per-image")
    seen = []
    forward = loss_fn.forward

    def spy(images, targets, *args, **kwargs):
        seen.append(images.shape[0])
        return forward(images, targets, *args, **kwargs)

    monkeypatch.setattr(loss_fn, "forward", spy)
    stats = training.train_one_epoch(
        model, optimizer, loader, torch.device("cpu"), 0, criterion=torch.nn.CrossEntropyLoss(),
        loss_fn=loss_fn, make_distractors=lambda x, y, g: gather_distractors(x, y, g),
        progress=False, gc_fraction=0.25)
    assert seen == [8, 8, 8, 8]
    assert stats["gc_images"] == 32 and stats["composites"] == 32 and stats["samples"] == 128


def test_gc_fraction_loss_is_the_mean_classification_plus_the_term(one_thread):
    """The combined loss of a partial-batch step: the classification term averaged over all N
    images, plus lambda times the consistency of the first ceil(pN) images."""
    model, loader, _, loss_fn = _setup(composites="per-image", n=8, steps=1)
    model.eval()  # batch norm on running statistics: the two forwards equal one
    images, labels = next(iter(loader))
    batch = training.as_train_batch((images, labels))
    distractors = torch.randn(2, 3, 3, 16, 16)  # any images: the term's value is compared
    out, m = training._partial_gc_step(
        model, loss_fn, batch, images, labels, torch.device("cpu"),
        lambda x, y, g: distractors, False, None, 0.25, torch.nn.CrossEntropyLoss())
    assert m == 2
    full = torch.nn.CrossEntropyLoss()(model(images), labels)
    torch.testing.assert_close(out.classification, full)
    part = loss_fn(images[:2], labels[:2], distractors, cells=out.cells)
    torch.testing.assert_close(out.loss, full + 8.0 * part.consistency)


@pytest.mark.parametrize("kwargs, message", [
    ({"gc_every": 0}, "gc_every must be an int >= 1"),
    ({"gc_every": 1.5}, "gc_every must be an int >= 1"),
    ({"gc_fraction": 0.0}, r"gc_fraction must be a number in \(0, 1\]"),
    ({"gc_fraction": 1.5}, r"gc_fraction must be a number in \(0, 1\]"),
])
def test_bad_partial_gc_arguments(kwargs, message):
    model, loader, optimizer, loss_fn = _setup()
    with pytest.raises(ValueError, match=message):
        training.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0,
                                 criterion=torch.nn.CrossEntropyLoss(), loss_fn=loss_fn,
                                 progress=False, **kwargs)
