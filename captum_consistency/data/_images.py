"""Image files: the decoding every data set uses, and the policy for files that cannot be decoded.

:func:`load_rgb` decodes eagerly so that a broken file fails with its path;
``on_corrupt="error"`` (raise :class:`CorruptImageError`) or ``"skip"`` (warn, return ``None``,
counted by the collate functions) is the same policy for ImageNet and COCO.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Union

from PIL import Image

from captum_consistency._warnings import SkippedImageWarning

__all__ = ["CorruptImageError", "load_rgb"]

_CORRUPT_POLICIES = ("error", "skip")


class CorruptImageError(OSError):
    """An image file that exists but cannot be decoded (truncated, not an image, ...).

    A subclass of :class:`OSError` raised by :func:`load_rgb` (and so by
    :class:`~captum_consistency.data.ImageNetWithBoxes` with ``on_corrupt="error"``); its message names the file.

    Examples::

        >>> try:
        ...     img = load_rgb("val/n01440764/broken.JPEG")
        ... except CorruptImageError as e:
        ...     print(e)
        cannot decode image val/n01440764/broken.JPEG: UnidentifiedImageError: ...
    """


def load_rgb(path: Union[str, os.PathLike]) -> Image.Image:
    """Opens and fully decodes an image as RGB, or raises :class:`CorruptImageError` naming it.

    PIL opens files lazily; ``convert("RGB")`` forces the decode, so a truncated or garbled
    file fails here, with its path, rather than later inside a transform.

    Args:
        path (str or PathLike): the image file.

    Returns:
        PIL.Image.Image: the decoded image in RGB mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptImageError: the file cannot be decoded.

    Examples::

        >>> img = load_rgb("val/n01440764/ILSVRC2012_val_00000293.JPEG")
        >>> img.mode
        'RGB'
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


#: How to skip undecodable images, in the error that stops on one.
_SKIP_CORRUPT_HINT = (
    "pass on_corrupt='skip' (--skip-corrupt in the recipes) to skip and count undecodable images"
)


def _load_or_skip(loader: Callable[[str], Image.Image], path: str, on_corrupt: str) -> Optional[Image.Image]:
    """``loader(path)``; with ``on_corrupt="skip"`` an undecodable file warns and gives ``None``.

    With ``on_corrupt="error"`` the :class:`CorruptImageError` says how to skip such files.
    """
    try:
        return loader(path)
    except CorruptImageError as e:
        if on_corrupt == "skip":
            warnings.warn(
                f"skipping undecodable image (on_corrupt='skip'): {e}", SkippedImageWarning,
                stacklevel=3,
            )
            return None
        raise CorruptImageError(f"{e}; {_SKIP_CORRUPT_HINT}") from e
