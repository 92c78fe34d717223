r"""Pieces of the CPU quickstart (``recipes/quickstart.py``): a small ResNet, the Table-1 report
and the Figure-2 panel.

* :class:`SmallResNet` -- a torchvision :class:`~torchvision.models.ResNet` (``BasicBlock``,
  ``layer1`` .. ``layer4``, ``avgpool``, ``fc``) with a CIFAR-style stem (one 3x3 convolution of
  stride 1, no max pooling: total stride 8) and configurable widths, so that ``layer4`` keeps a
  usable Grad-CAM resolution (4x4 at 32 px, 8x8 at 64 px) and one training step costs a few
  milliseconds on a CPU. :func:`~captum_consistency.to_global_max_pool` turns it into the
  paper's GMP model, and every tool that expects a ResNet (``model.layer4``) works unchanged.
* :func:`summarize_seeds` -- mean and spread (sample standard deviation) over seeds.
* :func:`table1_markdown` -- a Markdown table in the form of the paper's Table 1 (Pillai &
  Pirsiavash, AAAI 2021), with the spread over seeds and the cue-conflicting accuracy.
* :func:`gradcam_panel` -- a Figure-2-style grid: the same test images and their element-wise
  Grad-CAM overlays (:func:`pytorch_grad_cam.utils.image.show_cam_on_image`) for every variant.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = [
    "SmallResNet",
    "summarize_seeds",
    "table1_markdown",
    "lambda_sweep_plot",
    "panel_size",
    "gradcam_panel",
]


class SmallResNet(ResNet):
    r"""A narrow torchvision ResNet with a CIFAR-style stem, for small images on a CPU.

    It is :class:`torchvision.models.ResNet` itself (same ``forward``, ``BasicBlock`` stages
    ``layer1`` .. ``layer4`` of strides 1, 2, 2, 2, global average pooling ``avgpool`` and the
    linear ``fc``) with two changes that torchvision's constructor does not expose:

    * the stem is ``conv1`` = 3x3 convolution, stride 1 (no 7x7 stride-2 convolution and no max
      pooling), as for CIFAR: the total stride is 8 instead of 32, so a ``S x S`` image gives a
      ``S/8 x S/8`` map at ``layer4`` (4x4 at 32 px) instead of a 1x1 one;
    * the stage widths are ``widths`` instead of 64, 128, 256, 512 (the cost of a step scales
      with the square of the width).

    Args:
        num_classes (int): size of the classifier's output, at least 2.
        widths (sequence of 4 int): channels of ``layer1`` .. ``layer4``. Default
            ``(16, 32, 64, 128)``.
        layers (sequence of 4 int): ``BasicBlock`` s per stage. Default ``(1, 1, 1, 1)``
            (a ResNet-10).

    Attributes:
        stride (int): total stride of ``layer4`` (8).

    Examples::

        >>> model = SmallResNet(num_classes=4)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 4])
        >>> to_global_max_pool(model).avgpool        # the paper's GMP variant
        AdaptiveMaxPool2d(output_size=1)
    """

    stride: int = 8

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        widths, layers = tuple(widths), tuple(layers)
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
        if len(layers) != 4 or any(not isinstance(b, int) or b < 1 for b in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers!r}")
        # torchvision's ResNet.__init__ hard-codes the stem and the widths; build the same
        # attributes with its own _make_layer so that the module *is* a torchvision ResNet.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def summarize_seeds(per_seed: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Mean and spread over seeds of every numeric entry (nested dicts, e.g. FGSM, too).

    Args:
        per_seed (sequence of dict): one result dict per seed; numeric values (``None`` for
            a value that could not be computed) and dicts of numeric values.

    Returns:
        dict: the same keys with the mean over the seeds that have a value, and ``spread``:
        the same keys with the sample standard deviation (``ddof = 1``; 0 for one seed),
        ``num_seeds`` and ``per_seed`` (the input).

    Examples::

        >>> s = summarize_seeds([{"top1": 0.5}, {"top1": 0.7}])
        >>> round(s["top1"], 3), round(s["spread"]["top1"], 3), s["num_seeds"]
        (0.6, 0.141, 2)
    """

    def reduce(values: List[object]) -> Tuple[object, object]:
        if values and all(isinstance(v, Mapping) for v in values):
            keys = list(values[0].keys())
            pairs = {k: reduce([v.get(k) for v in values]) for k in keys}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(float(v))]
        if not nums:
            return None, None
        arr = np.asarray(nums, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    per_seed = [dict(r) for r in per_seed]
    out: Dict[str, object] = {}
    spread: Dict[str, object] = {}
    keys: List[str] = []
    for r in per_seed:
        keys += [k for k in r if k not in keys]
    for key in keys:
        values = [r.get(key) for r in per_seed]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, (str, bool)) for v in present):
            continue  # labels and flags are not averaged (a metric None everywhere stays None)
        out[key], spread[key] = reduce(values)
    out["spread"] = spread
    out["num_seeds"] = len(per_seed)
    out["per_seed"] = per_seed
    return out


def _pct(value: Optional[float], spread: Optional[float] = None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    text = f"{100.0 * value:.{digits}f}"
    if spread is not None:
        text += f" ± {100.0 * spread:.{digits}f}"
    return text


def table1_markdown(
    summaries: Mapping[str, Mapping[str, object]], model: str = "ResNet", cue: bool = True
) -> str:
    """Markdown table in the form of the paper's Table 1, with the spread over seeds.

    Columns: top-1 accuracy, PG, SPG (mean over seeds of the 5-run mean, ``±`` the spread over
    seeds; the paper's within-run SPG std is its own column), CH, NQH (lower is better), with
    ``cue=True`` top-1 on cue-consistent and cue-conflicting test images, their gap and the
    Grad-CAM mass on the context cue, then the share of all-zero maps (left out of PG, SPG, CH
    and NQH). All in percent, ``mean ± spread``.

    Args:
        summaries (mapping): variant name -> :func:`summarize_seeds` output with the keys
            ``top1``, ``pg``, ``spg_mean``, ``spg_std``, ``ch``, ``nqh`` (and optionally
            ``top1_consistent``, ``top1_conflicting``, ``cue_gap``, ``cue_mass``, ``zero_maps``).
        model (str): the model's name, for the first column.
        cue (bool): include the context-cue columns (data sets with a cue).

    Returns:
        str: the table (header, separator, one row per variant), newline-terminated.

    Examples::

        >>> print(table1_markdown({"Baseline": summarize_seeds([metrics_seed0, metrics_seed1])}))
    """
    columns = [("Top-1 Acc (%)", "top1"), ("PG", "pg"), ("SPG", "spg_mean"),
               ("SPG run std", None), ("CH (%)", "ch"), ("NQH (%)", "nqh")]
    if cue:
        columns += [("Top-1 cue-consistent (%)", "top1_consistent"),
                    ("Top-1 cue-conflicting (%)", "top1_conflicting"), ("Gap (points)", "cue_gap"),
                    ("Cue mass (%)", "cue_mass")]
    columns += [("Zero maps (%)", "zero_maps")]
    head = "| Model | " + " | ".join(title for title, _ in columns) + " | Seeds |"
    sep = "|" + "|".join("---" for _ in range(len(columns) + 2)) + "|"
    rows = [head, sep]
    for name, s in summaries.items():
        spread = s.get("spread", {}) or {}
        cells = [_pct(s.get(key), spread.get(key)) if key else _pct(s.get("spg_std"), digits=2)
                 for _, key in columns]
        rows.append(f"| {model} {name} | " + " | ".join(cells) + f" | {s.get('num_seeds', 1)} |")
    return "\n".join(rows) + "\n"


def lambda_sweep_plot(points: Sequence[Mapping[str, object]], path: str, title: str = "") -> str:
    """Draws NQH, CH and top-1 against the GC weight ``lambda`` and saves it as a PNG.

    ``lambda`` is drawn on a symmetric-log axis, so that ``lambda = 0`` (the baseline) sits
    beside the positive values. Missing metrics (``None``: e.g. every map all zero) are gaps.

    Args:
        points (sequence of dict): one per ``lambda``, with the keys ``lam``, ``nqh``, ``ch``
            and ``top1`` (fractions in [0, 1] or ``None``).
        path (str): output PNG file.
        title (str): figure title.

    Returns:
        str: ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: float(p["lam"]))
    lams = [float(p["lam"]) for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for key, label, style in (("nqh", "NQH (lower is better)", "o-"), ("ch", "CH", "s-"),
                              ("top1", "top-1", "^-")):
        values = [100.0 * p[key] if p.get(key) is not None else float("nan") for p in points]
        ax.plot(lams, values, style, label=label)
    positive = [v for v in lams if v > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    ax.set_xticks(lams)
    ax.set_xticklabels([f"{v:g}" for v in lams])
    ax.set_xlabel("GC weight lambda (0 = baseline)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def panel_size(num_images: int, num_variants: int, tile: int, header: int = 24,
               pad: int = 4) -> Tuple[int, int]:
    """``(width, height)`` in pixels of :func:`gradcam_panel`'s image.

    Args:
        num_images (int): rows.
        num_variants (int): overlay columns (the input image is one more column).
        tile (int): side of one tile.
        header (int): height of the column titles.
        pad (int): gap between tiles and around the grid.

    Returns:
        tuple of int: ``(width, height)``.
    """
    cols = num_variants + 1
    return pad + cols * (tile + pad), header + pad + num_images * (tile + pad)


def gradcam_panel(
    images: np.ndarray,
    maps: Mapping[str, Tensor],
    titles: Optional[Sequence[str]] = None,
    tile: int = 128,
    object_boxes: Optional[Tensor] = None,
    cue_boxes: Optional[Tensor] = None,
    header: int = 24,
    pad: int = 4,
):
    """Figure-2-style grid: each row one image, then its Grad-CAM overlay for each variant.

    Each overlay is :func:`pytorch_grad_cam.utils.image.show_cam_on_image` of the image and
    the map, bilinearly resized to the tile and scaled to ``[0, 1]`` by its maximum (as
    pytorch-grad-cam displays maps). The first column shows the image with the object's box
    (green) and the context cue's box (red), when given. An all-zero map is labelled as such
    (it would otherwise look like a uniformly cold map).

    Args:
        images (numpy.ndarray): ``(N, H, W, 3)`` float32 RGB in ``[0, 1]``.
        maps (mapping): column title -> ``(N, 1, h, w)`` or ``(N, h, w)`` non-negative maps.
        titles (sequence of str, optional): a caption per row, drawn on the input tile.
        tile (int): side of a tile in pixels (images are enlarged with nearest neighbours).
        object_boxes (Tensor, optional): ``(N, 4)`` ``(x1, y1, x2, y2)`` inclusive object
            boxes in image pixels, drawn in green.
        cue_boxes (Tensor, optional): ``(N, 4)`` boxes of the context cues, drawn in red.
        header (int): height of the column titles.
        pad (int): gap between tiles.

    Returns:
        PIL.Image.Image: RGB image of size :func:`panel_size` ``(N, len(maps), tile)``.
    """
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    from pytorch_grad_cam.utils.image import show_cam_on_image

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    width, height = panel_size(n, len(maps), tile, header, pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    scale_x, scale_y = tile / w, tile / h
    big = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(tile, tile),
                        mode="nearest").permute(0, 2, 3, 1).numpy()
    columns = ["input"] + list(maps.keys())
    for c, name in enumerate(columns):
        draw.text((pad + c * (tile + pad) + 2, 4), name, fill=(0, 0, 0))
    for c, (name, m) in enumerate(maps.items(), start=1):
        m = m.detach().float().cpu()
        if m.dim() == 3:
            m = m.unsqueeze(1)
        if m.shape[0] != n:
            raise ValueError(f"maps[{name!r}] has {m.shape[0]} maps for {n} images")
        m = F.interpolate(m.clamp(min=0), size=(tile, tile), mode="bilinear", align_corners=False)
        peak = m.flatten(1).amax(1)
        m = m[:, 0] / peak.clamp(min=1e-12)[:, None, None]
        for i in range(n):
            overlay = show_cam_on_image(big[i], m[i].numpy(), use_rgb=True)
            x0, y0 = pad + c * (tile + pad), header + pad + i * (tile + pad)
            canvas.paste(Image.fromarray(overlay), (x0, y0))
            if peak[i] <= 0:  # the class's map is zero everywhere after the ReLU
                draw.text((x0 + 3, y0 + 3), "all-zero map", fill=(255, 255, 255))
    for i in range(n):
        x0, y0 = pad, header + pad + i * (tile + pad)
        canvas.paste(Image.fromarray((big[i] * 255 + 0.5).astype(np.uint8)), (x0, y0))
        for boxes, color in ((object_boxes, (0, 200, 0)), (cue_boxes, (230, 0, 0))):
            if boxes is not None:
                bx1, by1, bx2, by2 = [float(v) for v in boxes[i]]
                draw.rectangle([x0 + bx1 * scale_x, y0 + by1 * scale_y,
                                x0 + (bx2 + 1) * scale_x - 1, y0 + (by2 + 1) * scale_y - 1],
                               outline=color, width=2)
        if titles is not None:
            draw.text((x0 + 3, y0 + tile - 13), str(titles[i]), fill=(255, 255, 255))
    return canvas
