r"""Figures of the recipes: the Grad-CAM panel of the paper's Figure 2 and the lambda sweep.

* :func:`gradcam_panel` -- a Figure-2-style grid: the same test images and their element-wise
  Grad-CAM overlays (:func:`pytorch_grad_cam.utils.image.show_cam_on_image`) for every variant;
  :func:`panel_size` is its size in pixels.
* :func:`lambda_sweep_plot` -- NQH, CH and top-1 against the GC weight ``lambda``.
* :func:`cost_plot` -- NQH against the training cost, one point per setting.

matplotlib, Pillow and pytorch-grad-cam are imported when a figure is drawn.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["gradcam_panel", "panel_size", "lambda_sweep_plot", "cost_plot"]


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
    return _save(fig, ax, path, title)


def _save(fig, ax, path: str, title: str, legend_size: int = 8) -> str:
    """Grid, legend and title, then the PNG; closes the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=legend_size)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_plot(settings: Mapping[str, Mapping[str, object]], path: str, baseline: str = "baseline",
              title: str = "", nqh_ratio: Optional[float] = None,
              max_cost: Optional[float] = None, cost_key: str = "rel_time") -> str:
    """Draws NQH against the training cost relative to the baseline's, one point per setting.

    Each setting is a point with error bars (its ``spread`` over seeds); the baseline's NQH is
    a horizontal line, and a target (NQH at most ``nqh_ratio`` times the baseline's, cost at
    most ``max_cost``) two dotted lines.

    Args:
        settings (dict): key -> dict with ``name``, ``nqh`` (fraction), ``cost_key`` (cost over
            the baseline's training) and optionally ``spread`` (the same keys, over seeds).
        path (str): output PNG file.
        baseline (str): the key of the baseline in ``settings``.
        title (str): figure title.
        nqh_ratio (float, optional): the target's NQH as a share of the baseline's.
        max_cost (float, optional): the target's largest relative cost.
        cost_key (str): the cost to draw (``"rel_time"``: seconds; ``"rel_images"``: images).

    Returns:
        str: ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = float(settings[baseline]["nqh"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.axhline(100 * base, color="grey", ls="--", label="baseline NQH")
    if nqh_ratio is not None:
        ax.axhline(100 * nqh_ratio * base, color="green", ls=":",
                   label=f"target NQH ({100 * (1 - nqh_ratio):.0f}% lower)")
    if max_cost is not None:
        ax.axvline(max_cost, color="green", ls="-.", label=f"target cost ({max_cost:g}x)")
    for key, s in settings.items():
        if key == baseline or s.get(cost_key) is None or s.get("nqh") is None:
            continue
        sd = s.get("spread") or {}
        x, y = float(s[cost_key]), 100 * float(s["nqh"])
        ax.errorbar(x, y, xerr=sd.get(cost_key) or 0, yerr=100 * (sd.get("nqh") or 0),
                    fmt="o", capsize=3)
        ax.annotate(str(s["name"]), (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("total training cost / baseline's training ("
                  + ("seconds" if cost_key == "rel_time" else "images") + ")")
    ax.set_ylabel("NQH (%), lower is better")
    ax.set_ylim(bottom=0)
    return _save(fig, ax, path, title, legend_size=7)


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
