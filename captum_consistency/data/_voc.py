"""PASCAL VOC / ILSVRC bounding-box XML files: :func:`parse_voc_xml`."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import List, NamedTuple, Optional, Tuple, Union

__all__ = ["VocObject", "parse_voc_xml"]


class VocObject(NamedTuple):
    """One ``<object>`` of a PASCAL VOC / ILSVRC XML file."""

    name: str
    box: Tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as stored
    difficult: bool


def parse_voc_xml(path: Union[str, os.PathLike]) -> Tuple[List[VocObject], Optional[Tuple[int, int]]]:
    """Parses a PASCAL VOC / ILSVRC bounding-box XML file with :mod:`xml.etree`.

    Args:
        path (str or PathLike): the XML file.

    Returns:
        ``(objects, size)``: the list of :class:`VocObject` (class name, ``(xmin, ymin, xmax,
        ymax)`` exactly as stored, ``difficult`` flag, 0 when absent) and the ``(H, W)`` from
        ``<size>``, or ``None`` when the file has no usable ``<size>``.

    Raises:
        ValueError: malformed XML, or an ``<object>`` without a name or a complete
            ``<bndbox>``; the message names the file.

    Examples::

        >>> objects, size = parse_voc_xml("boxes/val/ILSVRC2012_val_00000001.xml")
        >>> objects[0].name, objects[0].box, objects[0].difficult, size
        ('n01751748', (111.0, 108.0, 441.0, 193.0), False, (375, 500))
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"malformed bounding-box XML {path}: {e}") from e
    size = None
    size_el = root.find("size")
    if size_el is not None:
        try:
            w = int(float(size_el.findtext("width", "0")))
            h = int(float(size_el.findtext("height", "0")))
        except ValueError as e:
            raise ValueError(f"bounding-box XML {path}: non-numeric <size>: {e}") from e
        if h > 0 and w > 0:
            size = (h, w)
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise ValueError(f"bounding-box XML {path}: <object> #{k} lacks <name> or <bndbox>")
        try:
            coords = tuple(float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"bounding-box XML {path}: <object> #{k} has a missing or non-numeric "
                f"xmin/ymin/xmax/ymax"
            ) from e
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        objects.append(VocObject(name, coords, difficult))  # type: ignore[arg-type]
    return objects, size
