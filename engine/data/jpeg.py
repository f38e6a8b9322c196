"""Image decoding: one JPEG (or PNG) to uint8 ``(3, 32, 32)``, and whole JPEG trees."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..progress import progress as progress_bar
from .cache import Arrays
from .layout import IMAGE_SIZE, SPLITS, list_tree, one_line


def _jpeg_decoder() -> tuple[Callable | None, int]:
    """torchvision's C++ JPEG decoding op and its RGB mode code, or ``(None, 0)``.

    The op is called directly because its Python wrapper
    ``torchvision.io.decode_jpeg`` emits a DeprecationWarning on every call since
    torchvision 0.29 (60,000 per decode of CIFAR-10) and costs ~0.5 s per 60,000.
    """
    try:
        from torchvision.io import ImageReadMode  # loads the image extension

        return torch.ops.image.decode_jpeg, ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return None, 0


_DECODER: tuple[Callable | None, int] | None = None  # loaded on the first decode: importing
# torchvision costs ~3 s of CPU, which every `entk` process start would otherwise pay


def _decoder() -> tuple[Callable | None, int]:
    global _DECODER
    if _DECODER is None:
        _DECODER = _jpeg_decoder()
    return _DECODER


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one JPEG (or PNG) to uint8 ``(3, 32, 32)``; ``where`` names it in errors.

    torchvision's libjpeg-turbo op decodes the 60,000 JPEGs of the real CIFAR-10
    archive in 1.6 s against ~6 s for ``PIL.Image.open(...).convert("RGB")`` (2
    CPU cores), with bit-identical pixels. PIL is the fallback for anything the
    op rejects (PNG, odd JPEGs) and when torchvision's image extension is missing.
    """
    img = None
    decode, rgb = _decoder()
    if decode is not None and data[:2] == b"\xff\xd8":  # JPEG start-of-image marker
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode(buf, rgb, False).numpy()
        except RuntimeError:
            img = None
    if img is None:
        img = _decode_pil(data, where)
    if img.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        h, w = img.shape[1:]
        raise DataError(
            f"image {where} is {w}x{h} (width x height), expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return img


def _decode_pil(data: bytes, where: str) -> np.ndarray:
    """PIL decode to ``(3, H, W)`` uint8, any failure as a one-line DataError naming ``where``."""
    # Imported here: the GPU image may lack Pillow, and only decoding needs it.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>), not the file: drop it.
        reason = ("no image format recognised" if isinstance(e, UnidentifiedImageError)
                  else _BUFFER_REPR.sub("the data", one_line(e)))
        raise DataError(f"cannot decode image {where}: not a valid JPEG or PNG ({reason})") from e


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_rows(rows: dict[str, list[tuple[int, str, bytes | Path]]], show: bool | None,
                desc: str) -> Arrays:
    """Decode ``{split: [(label, where, bytes or file)]}`` into ``x_<split>``/``y_<split>``.

    ``x_<split>`` is uint8 ``(N, 3, 32, 32)``, ``y_<split>`` int64 ``(N,)``, in row order.
    """
    arrays: Arrays = {}
    total = sum(len(v) for v in rows.values())
    with progress_bar(total=total, desc=desc, unit="img", enabled=show) as bar:
        for split, items in rows.items():
            x = np.empty((len(items), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            for i, (_, where, data) in enumerate(items):
                x[i] = decode_image(data.read_bytes() if isinstance(data, Path) else data, where)
                bar.update()
            arrays[f"x_{split}"] = x
            arrays[f"y_{split}"] = np.array([label for label, *_ in items], dtype=np.int64)
    return arrays


def decode_tree(root: Path, show: bool | None) -> tuple[Arrays, dict]:
    """Decode a ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` tree (layout checked first)."""
    classes, files = list_tree(root)
    rows = {s: [(label, str(p), p) for label, p in files[s]] for s in SPLITS}
    return decode_rows(rows, show, f"decoding {root.name}"), {
        "classes": classes, "layout": "jpeg-dir"}
