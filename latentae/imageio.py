"""Reading images: decoding any common file to 8-bit RGB (and the uint8 resize).

Image *sources* (folders, WebDataset shards, ``pipe:`` commands) live in
``latentae.sources``; their names are re-exported here, so ``from latentae.imageio
import iter_source`` keeps working. Everything here is generic: training
(``latentae.data``) and dataset encoding both build on it. Errors follow one rule: a
bad *sample* raises :class:`BadImage` from the decoder and is skipped (counted, named)
by whoever reads; a bad *source* (missing path, no images at all) raises
``FileNotFoundError`` / ``ValueError`` at start-up.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Re-exported: the source-reading half of the data layer (see latentae.sources).
from latentae.sources import (  # noqa: F401
    IMAGE_EXTENSIONS,
    RawSample,
    ShardPos,
    can_seek,
    check_source,
    expand_shards,
    folder_key,
    has_image_extension,
    is_shard_source,
    iter_shard,
    iter_source,
    list_images,
    split_for_worker,
    walk_images,
)

# Image.MAX_IMAGE_PIXELS is deliberately left at PIL's default (~89 Mpx warns, 2x that
# raises DecompressionBombError): a training set has no business holding gigapixel
# images, and a decompression bomb must not take a worker's memory down.
# ImageFile.LOAD_TRUNCATED_IMAGES also stays False, so ``load()`` raises on a cut file.


class BadImage(Exception):
    """One sample that cannot be used: ``name`` (file path or shard key) and ``reason``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


# ----------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PNG / TIFF). PIL's convert("L") clips values > 255 instead
        # of rescaling, which turns almost every 16-bit image white. Rescale the full
        # 16-bit range to 8 bits (v * 255 / 65535, rounded). 32-bit "I" files are
        # treated the same way (clipped to the 16-bit range): no common photo format
        # stores wider integers.
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "F":
        raise BadImage(name, "32-bit float images are not supported (unknown value range)")
    if mode in ("P", "PA") or (mode in ("L", "RGB") and "transparency" in img.info):
        # Palette / tRNS images may mark a colour as transparent: go through RGBA
        # only then, so opaque ones convert directly.
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Composite transparency on WHITE: the colour under a fully transparent pixel
        # is undefined (often black, often garbage), so dropping alpha would teach the
        # autoencoder junk borders and dark halos. White is how such images (logos,
        # cut-outs, stickers) are shown on the web and what the usual SD training sets
        # did, so reconstructions match what people see.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs itself), YCbCr, LAB, HSV, ...
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(name, f"cannot convert mode {img.mode} to RGB: {e}") from e


def decode_image(data: bytes | str | Path, name: str, *, min_side: int | None = None) -> Image.Image:
    """Decode a file's bytes (or a path) into a fully loaded 8-bit RGB image.

    EXIF orientation is applied, so the result is what a viewer shows. ``min_side``
    lets JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as the shorter
    side stays >= ``min_side``: a 4000 px photo resized to 256 decodes 8x faster.

    Raises :class:`BadImage` for empty, truncated, corrupt or non-image data.
    """
    return decode_image_and_size(data, name, min_side=min_side)[0]


def decode_image_and_size(
    data: bytes | str | Path, name: str, *, min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, plus the image's full (width, height) after EXIF rotation,
    which differs from the returned image's size when a reduced JPEG draft was decoded.
    One parse of the header serves both (reading the size apart costs a second one)."""
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise BadImage(name, f"cannot read file: {e.strerror or e}") from e
    if len(data) == 0:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning (89-178 Mpx) is not an error; keep it quiet in
            # workers, the image is used. Above that PIL raises and we skip the sample.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            full = img.size
            if min_side is not None and img.format == "JPEG":
                # draft() keeps both sides >= the request, so the shorter side >= min_side.
                img.draft(None, (min_side, min_side))
            img.load()  # forces the full decode: truncated data raises here
            if img.width < 1 or img.height < 1:
                raise BadImage(name, f"image has no pixels ({img.width}x{img.height})")
            if img.getexif().get(_ORIENTATION, 1) in _TRANSPOSING:
                full = (full[1], full[0])
            img = ImageOps.exif_transpose(img)  # no-op without an orientation tag
            return _to_rgb(img, name), full
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage(name, "not an image file (PIL cannot identify it)") from e
    except Image.DecompressionBombError as e:
        raise BadImage(name, f"too many pixels: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
        # PIL reports truncation/corruption through a zoo of exception types, and
        # broken EXIF through more. All mean "this sample is unusable".
        reason = str(e) or type(e).__name__
        raise BadImage(name, f"corrupt or truncated image: {reason}") from e


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> our own uint8 tensor [3, H, W] (a channels-last view of one copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``size``, aspect ratio kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def resize_uint8(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, h, w] = ``size``: antialiased bicubic (a = -0.5, PIL's kernel
    and pixel centres). torch vectorises it on uint8: 0.44 ms for a 512x320 -> 410x256
    photo on one core vs PIL's 1.4 ms, and the resize was ~40% of a loader's CPU per image.
    Within +-2 of PIL's 8-bit result, the same error against a float resize (tested).
    DataLoader workers run torch on one thread."""
    if tuple(chw.shape[1:]) == tuple(size):
        return chw
    return torch.nn.functional.interpolate(chw[None], size=size, mode="bicubic", antialias=True)[0]


_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height


def image_size(data: bytes | str | Path, name: str) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF rotation; raises BadImage."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            w, h = img.size
            orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception as e:  # noqa: BLE001 - any header failure means "not usable"
        raise BadImage(name, f"cannot read image header: {e}") from e
    return (h, w) if orientation in _TRANSPOSING else (w, h)
