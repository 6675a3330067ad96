"""Image decoding with limits, and open_clip's eval transform up to (not including) ToTensor/Normalize.

The image tower's ONNX graph takes uint8 [B, H, W, 3] RGB pixels and does /255 and mean/std itself
(`vitrine.manifest.ImageTower`); this module produces those pixels with Pillow and numpy only, identical
(uint8 for uint8) to what open_clip 3.3.0's `image_transform(size, is_train=False, ...)` feeds ToTensor.

Parity notes (open_clip 3.3.0, `open_clip/transform.py`; torchvision 0.29 `transforms/functional.py`):

* EXIF orientation: open_clip does not apply it (no `ImageOps.exif_transpose` anywhere in its pipeline),
  so by default neither do we; pass `exif_transpose=True` to opt in (embeddings then differ from open_clip's
  for rotated camera photos).
* Mode conversion: `decode_image` converts to RGB with `image.convert('RGB')`, open_clip's
  `_convert_to_rgb` / `MaybeConvertMode`, right after decoding — as open_clip's training loaders do
  (webdataset `decode("pilrgb")`). open_clip's eval transform itself converts *after* resize/crop; for RGB
  and L inputs the order does not change a single pixel, for P/1 (Pillow resizes them with NEAREST), RGBA/LA
  (premultiplied-alpha resize) or CMYK (padding 0 is white in CMYK) the result equals
  `preprocess(img.convert('RGB'))`, not `preprocess(img)` (which differs by up to ~3.8 after Normalize on the
  test images). 16-bit grayscale ('I;16') is clipped at 255 by Pillow's convert, exactly as open_clip.
* Resize/crop: the same Pillow `Image.resize(size, resample)` call torchvision makes for PIL images, with
  torchvision's size rounding (`int()` for the long side of `Resize(int)`, `round()` in `ResizeKeepRatio`)
  and crop offsets (`int(round((H - h) / 2.0))`); padding (images smaller than the crop) is 0 (black).
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval_service.errors import ImageRejectedError
from vitrine.image_ids import image_id_of
from vitrine.manifest import ImageTower

#: Formats Pillow may open (names of `PIL.Image.OPEN`). Excludes formats whose plugins shell out
#: (EPS -> Ghostscript) or are rarely legitimate uploads. 'JPEG' also opens MPO (multi-picture JPEG from
#: phone cameras) files.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

_MIME = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


#: Pillow's DecompressionBombError message ("Image size (400000000 pixels) exceeds limit of ...").
_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before an image is decoded.

    Attributes:
        max_bytes: largest encoded size accepted, bytes.
        max_pixels: largest width * height accepted, pixels (read from the file header, before decoding).
        min_side: smallest accepted width or height, pixels.
        formats: Pillow format names accepted (see `DEFAULT_FORMATS`).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 1
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"ImageLimits values must be >= 1, got {self}")
        if not self.formats:
            raise ValueError("ImageLimits.formats must name at least one Pillow format")
        Image.init()
        unknown = [f for f in self.formats if f.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"ImageLimits.formats: Pillow cannot open {unknown}; known: {sorted(Image.OPEN)}"
            )


def decode_image(data: bytes, limits: ImageLimits, *, exif_transpose: bool = False) -> Image.Image:
    """Decode an encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF) into a loaded RGB PIL image.

    Order of checks: byte size, then the header's width * height and shorter side (Pillow's `Image.open`
    only reads the header), then the full decode, so a decompression bomb is refused without allocating
    its pixels. Multi-frame files (GIF, APNG, TIFF) give their first frame, as Pillow and open_clip do.
    The configured `limits.max_pixels` decides, not Pillow's own guard (`Image.MAX_IMAGE_PIXELS`: Pillow
    refuses headers above twice that, ~179 MP, inside `Image.open`; see `_open_header`): the message names
    the image's pixel count and the configured limit, and a limit above Pillow's is honoured.

    Args:
        data: the encoded file.
        limits: size limits and accepted formats.
        exif_transpose: apply the EXIF orientation tag (`ImageOps.exif_transpose`). Off by default for
            parity with open_clip, which ignores it.

    Returns:
        A loaded PIL image of mode 'RGB' (converted with `image.convert('RGB')`, as open_clip does).

    Raises:
        ImageRejectedError: reason 'empty', 'too_many_bytes', 'undecodable' (unknown or excluded format,
            corrupt or truncated data), 'too_many_pixels' (width * height above `limits.max_pixels`; the
            message gives both numbers), 'too_small' or 'unsupported_mode'.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageRejectedError("empty", "the image is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageRejectedError(
            "too_many_bytes", f"{size} bytes is more than the limit of {limits.max_bytes}"
        )
    try:
        image = _open_header(data, limits.formats)
    except Image.DecompressionBombError as exc:  # not even the format's plugin would read the header
        match = _PILLOW_BOMB_PIXELS.search(str(exc))
        pixels = f"{match.group(1)} pixels" if match else "more pixels than Pillow's own guard allows"
        raise ImageRejectedError(
            "too_many_pixels",
            f"the image header declares {pixels}, more than the limit of {limits.max_pixels}",
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejectedError(
            "undecodable", f"not a recognised image; accepted formats: {', '.join(limits.formats)}"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow plugins raise all of these
        raise ImageRejectedError("undecodable", f"cannot read the image header: {exc}") from exc
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageRejectedError(
                "too_many_pixels",
                f"{width}x{height} = {width * height} pixels is more than the limit of {limits.max_pixels}",
            )
        if min(width, height) < limits.min_side:
            raise ImageRejectedError(
                "too_small", f"{width}x{height} has a side shorter than {limits.min_side} pixels"
            )
        try:
            image.load()
        except Image.DecompressionBombError as exc:  # a frame of a GIF / TIFF / WebP larger than the header
            raise ImageRejectedError(
                "too_many_pixels", f"{width}x{height}: a frame is larger than the header says ({exc}); the "
                                   f"limit is {limits.max_pixels} pixels"
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            # OSError covers 'image file is truncated' and zlib/decoder errors.
            raise ImageRejectedError(
                "undecodable", f"{image.format} data is corrupt or truncated: {exc}"
            ) from exc
        if exif_transpose:
            transposed = ImageOps.exif_transpose(image)
            image = transposed if transposed is not None else image
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageRejectedError(
                "unsupported_mode", f"cannot convert mode {image.mode} to RGB: {exc}"
            ) from exc


def _open_header(data: bytes, formats: Sequence[str] | None) -> Image.Image:
    """`Image.open(data, formats)` (reads the header only), but leaving the pixel limit to the caller.

    `formats` None: every registered format, as `Image.open(data)`.

    Pillow's `Image.open` raises DecompressionBombError for a header above 2 * `Image.MAX_IMAGE_PIXELS`
    (178,956,970 pixels by default) before the caller sees the size, so its own message (and threshold) would
    replace the configured limit. Then the header is read again by the first accepting format's plugin
    factory, from the registry `Image.register_open` fills (`Image.OPEN`), which is what `Image.open` calls
    minus that check; the caller compares the size with its limit before decoding anything. The process-wide
    `Image.MAX_IMAGE_PIXELS` is left alone (other Pillow users keep Pillow's guard).

    Raises:
        What `Image.open` raises (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError);
        DecompressionBombError when the plugin itself refuses (e.g. a GIF whose first frame is larger than
        its logical screen, checked while the header is read).
    """
    try:
        return Image.open(io.BytesIO(data), formats=None if formats is None else list(formats))
    except Image.DecompressionBombError as bomb:
        prefix = bytes(data[:16])  # what Image.open hands each plugin's `accept`
        for name in Image.ID if formats is None else formats:
            factory, accept = Image.OPEN[name.upper()]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like it, but" warning
                continue
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: Image.open goes on
                continue
        raise bomb


def image_format(data: bytes) -> str:
    """Return the MIME type of an encoded image from the format Pillow detects in its header.

    Args:
        data: the encoded file (only the header is read).

    Returns:
        e.g. 'image/jpeg', 'image/png'; 'application/octet-stream' when Pillow does not recognise it or the
        format has no registered MIME type.
    """
    try:
        with _open_header(data, None) as image:
            fmt = image.format or ""
            return _MIME.get(fmt) or Image.MIME.get(fmt) or "application/octet-stream"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return "application/octet-stream"


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)` output (h, w): shorter side -> size, longer side `int(size * long / short)`.

    Source: torchvision.transforms.functional._compute_resized_output_size (max_size=None).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def _keep_ratio_size(height: int, width: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """open_clip `ResizeKeepRatio.get_params` (no random scale/aspect): output (h, w).

    ratio = max(h/th, w/tw) * longest + min(h/th, w/tw) * (1 - longest); each side `round(side / ratio)`.
    """
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(height * 1.0 / ratio), round(width * 1.0 / ratio)


def _resize(image: Image.Image, hw: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """torchvision `F.resize` on a PIL image: unchanged when already that size, else `resize((w, h))`."""
    if (image.height, image.width) == hw:
        return image
    return image.resize((hw[1], hw[0]), resample)


def _center_crop_or_pad(pixels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """torchvision `center_crop` / open_clip `center_crop_or_pad` (fill 0) on uint8 [H, W, 3]."""
    crop_h, crop_w = hw
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        pad_right = (crop_w - width + 1) // 2 if crop_w > width else 0
        pad_bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        height, width = pixels.shape[:2]
        if (height, width) == (crop_h, crop_w):
            return pixels
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return pixels[top : top + crop_h, left : left + crop_w]


def to_model_input(image: Image.Image, spec: ImageTower, *, max_pixels: int | None = None) -> np.ndarray:
    """Apply open_clip's eval resize + crop for `spec` and return the pixels the image tower takes.

    resize_mode (open_clip 3.3.0 `image_transform(..., is_train=False)`):
        'shortest': square size -> torchvision `Resize(size)` (shorter side to size) + `CenterCrop`;
                    non-square size -> `ResizeKeepRatio(size)` (always BICUBIC, open_clip ignores
                    `interpolation` there) + `CenterCrop`.
        'longest':  `ResizeKeepRatio(size, longest=1)` (longer side fits) + `CenterCropOrPad(fill=0)`.
        'squash':   `Resize((h, w))`, aspect ratio not kept.
    `interpolation` 'bicubic' / 'bilinear' are Pillow's BICUBIC / BILINEAR, as in open_clip; 'nearest'
    (not an open_clip option) is Pillow's NEAREST.

    Args:
        image: a PIL image; converted with `convert('RGB')` first when it is not RGB.
        spec: the manifest's image tower (`size` is (height, width)).
        max_pixels: refuse (before resizing) an image whose resized, not yet cropped size exceeds this many
            pixels; None = no limit. `preprocess_batch` passes `ImageLimits.max_pixels`.

    Returns:
        uint8 [H, W, 3] RGB with (H, W) == spec.size, C-contiguous.

    Raises:
        ImageRejectedError: reason 'too_many_pixels' when the resized size exceeds `max_pixels`.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    target = (int(spec.size[0]), int(spec.size[1]))
    resample = _RESAMPLE[spec.interpolation]
    height, width = image.height, image.width
    if spec.resize_mode == "squash":
        hw = target
    elif spec.resize_mode == "longest":
        hw = _keep_ratio_size(height, width, target, 1.0)
    elif target[0] == target[1]:
        hw = _shortest_edge_size(height, width, target[0])
    else:
        hw, resample = _keep_ratio_size(height, width, target, 0.0), Image.Resampling.BICUBIC
    if max_pixels is not None and hw[0] * hw[1] > max_pixels:
        # An extreme aspect ratio (e.g. 1 x 2,000,000, a few KB as PNG) resized shortest-edge-first would need
        # gigabytes before the crop: refuse it like a decompression bomb (found by tests/test_fuzz.py).
        raise ImageRejectedError(
            "too_many_pixels", f"{width}x{height} would be resized to {hw[1]}x{hw[0]} = {hw[0] * hw[1]} pixels "
                               f"before cropping (extreme aspect ratio); the limit is {max_pixels}")
    image = _resize(image, hw, resample)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    pixels = _center_crop_or_pad(pixels, target)
    return np.ascontiguousarray(pixels)


def preprocess_batch(
    datas: Sequence[bytes], spec: ImageTower, limits: ImageLimits, *, exif_transpose: bool = False
) -> list[np.ndarray | ImageRejectedError]:
    """Decode and transform each encoded image; a bad image does not fail the others.

    Args:
        datas: encoded image files.
        spec: the image tower the pixels are for.
        limits: see `decode_image`.
        exif_transpose: see `decode_image`.

    Returns:
        One entry per input, in order: uint8 [H, W, 3] (H, W = spec.size), or the ImageRejectedError that
        refused it. Stack the arrays with `np.stack` for a uint8 [B, H, W, 3] batch.
    """
    out: list[np.ndarray | ImageRejectedError] = []
    for data in datas:
        try:
            image = decode_image(data, limits, exif_transpose=exif_transpose)
            out.append(to_model_input(image, spec, max_pixels=limits.max_pixels))
        except ImageRejectedError as exc:
            out.append(exc)
    return out


class ImageDecoder:
    """Decode + preprocess for the use cases: `preprocess_batch` for one image tower and limits, in a thread pool.

    Args:
        spec: the manifest's image tower (size, resize mode, interpolation).
        limits: byte / pixel / side limits applied before and during decoding.
        executor: where decoding runs (CPU-bound; Pillow releases the GIL while decoding).
    """

    def __init__(self, spec: ImageTower, limits: ImageLimits, executor: Executor) -> None:
        self.spec = spec
        self.limits = limits
        self.executor = executor

    def decode_now(self, contents: Sequence[bytes]) -> list[np.ndarray | ImageRejectedError]:
        """`preprocess_batch` in the calling thread: uint8 [H, W, 3] per image, or the error that refused it."""
        return preprocess_batch(contents, self.spec, self.limits)

    async def decode(self, contents: Sequence[bytes]) -> list[np.ndarray | ImageRejectedError]:
        """`decode_now` in the executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.decode_now, list(contents))

    async def sha256_all(self, contents: Sequence[bytes]) -> list[str]:
        """The image id (sha256 hex, `vitrine.image_ids`) of each encoded image, computed in the executor."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: [image_id_of(c) for c in contents])
