"""retrieval_service.usecases.preprocess against open_clip 3.3.0's own eval transform, on real images.

Real photographs (scikit-learn's two sample photos), real handwritten digit scans (load_digits) and the
file formats people upload (JPEG, PNG with alpha, palette GIF, grayscale, CMYK JPEG, 16-bit PNG).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from retrieval_service.errors import ImageRejectedError
from retrieval_service.usecases.preprocess import (
    ImageLimits,
    decode_image,
    image_format,
    preprocess_batch,
    to_model_input,
)
from vitrine.manifest import ImageTower

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _real_images() -> dict[str, bytes]:
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 427x640 RGB photos
    digits = load_digits().images  # 8x8 scans, values 0..16
    digit = Image.fromarray((digits[0] * (255 / 16)).astype(np.uint8), "L")
    alpha = Image.linear_gradient("L").rotate(90).resize(flower.size)
    photo16 = (np.asarray(flower.convert("L"), dtype=np.uint16) * 257)  # 16-bit grayscale scan
    return {
        "china_jpeg": encode(china, "JPEG", quality=90),
        "flower_png": encode(flower, "PNG"),
        "portrait_crop_png": encode(china.crop((150, 0, 420, 427)), "PNG"),  # 270x427, taller than wide
        "flower_rgba_png": encode(Image.merge("RGBA", (*flower.split(), alpha)), "PNG"),
        "china_palette_gif": encode(china.quantize(64), "GIF"),
        "flower_gray_png": encode(flower.convert("L"), "PNG"),
        "china_cmyk_jpeg": encode(china.convert("CMYK"), "JPEG", quality=92),
        "flower_16bit_png": encode(Image.fromarray(photo16), "PNG"),
        "digit_8x8_png": encode(digit, "PNG"),
        "digit_upscaled_png": encode(digit.resize((96, 96), Image.Resampling.NEAREST), "PNG"),
        "digits_strip_png": encode(  # 10 scans side by side, 8x80 upscaled to 40x400: very wide
            Image.fromarray(np.hstack([(d * (255 / 16)).astype(np.uint8) for d in digits[:10]]), "L")
            .resize((400, 40), Image.Resampling.BICUBIC), "PNG"),
    }


IMAGES = _real_images()
SIZES = [(224, 224), (32, 32), (32, 48), (48, 32)]


def _spec(size: tuple[int, int], resize_mode: str) -> ImageTower:
    return ImageTower(triton_model="image", size=size, resize_mode=resize_mode, interpolation="bicubic",
                      mean=MEAN, std=STD)


def _normalize(pixels: np.ndarray) -> torch.Tensor:
    """What the ONNX graph does: uint8 [H, W, 3] -> /255 -> (x - mean) / std, float32 [3, H, W]."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_matches_open_clip_eval_transform(name, size, resize_mode):
    data = IMAGES[name]
    reference = image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode,
                                interpolation="bicubic")
    expected = reference(Image.open(io.BytesIO(data)).convert("RGB"))
    (pixels,) = preprocess_batch([data], _spec(size, resize_mode), LIMITS)
    assert isinstance(pixels, np.ndarray), pixels
    assert pixels.dtype == np.uint8 and pixels.shape == (*size, 3) and pixels.flags.c_contiguous
    assert torch.max(torch.abs(_normalize(pixels) - expected)).item() <= 1e-6
    # identical uint8: undo Normalize/ToTensor on open_clip's tensor
    undone = (expected * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    np.testing.assert_array_equal(undone.round().to(torch.uint8).permute(1, 2, 0).numpy(), pixels)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["china_jpeg", "portrait_crop_png", "digits_strip_png"])
def test_matches_open_clip_with_bilinear_interpolation(name, size, resize_mode):
    """Including open_clip's quirk: 'shortest' to a non-square size always resizes BICUBIC."""
    data = IMAGES[name]
    reference = image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode,
                                interpolation="bilinear")
    expected = reference(Image.open(io.BytesIO(data)).convert("RGB"))
    spec = ImageTower(triton_model="image", size=size, resize_mode=resize_mode, interpolation="bilinear",
                      mean=MEAN, std=STD)
    pixels = to_model_input(decode_image(data, LIMITS), spec)
    assert torch.max(torch.abs(_normalize(pixels) - expected)).item() <= 1e-6


@pytest.mark.parametrize("name", ["china_jpeg", "flower_gray_png", "digit_upscaled_png"])
def test_rgb_and_gray_inputs_match_open_clip_on_the_unconverted_image(name):
    """For RGB and L files the convert-first order changes nothing: same as preprocess(Image.open(f))."""
    data = IMAGES[name]
    reference = image_transform(224, is_train=False, mean=MEAN, std=STD)
    expected = reference(Image.open(io.BytesIO(data)))
    pixels = to_model_input(decode_image(data, LIMITS), _spec((224, 224), "shortest"))
    assert torch.max(torch.abs(_normalize(pixels) - expected)).item() <= 1e-6


def test_decode_converts_every_mode_to_rgb():
    for name, data in IMAGES.items():
        image = decode_image(data, LIMITS)
        assert image.mode == "RGB", name
        assert image.size == Image.open(io.BytesIO(data)).size


def test_non_rgb_input_to_model_input_is_converted():
    gray = Image.open(io.BytesIO(IMAGES["flower_gray_png"]))
    assert gray.mode == "L"
    spec = _spec((32, 32), "shortest")
    np.testing.assert_array_equal(to_model_input(gray, spec), to_model_input(gray.convert("RGB"), spec))


# --- rejections ------------------------------------------------------------------------------------------


def _reason(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageRejectedError) as info:
        decode_image(data, limits)
    return info.value.reason


def _png_with_size(width: int, height: int) -> bytes:
    """A real 8x8 grayscale PNG whose IHDR claims width x height (CRC recomputed, pixel data unchanged)."""
    png = bytearray(encode(Image.new("L", (8, 8), 128), "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


def test_rejects_empty_random_and_excluded_formats():
    assert _reason(b"") == "empty"
    assert _reason(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()) == "undecodable"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert _reason(eps) == "undecodable"  # EPS is excluded: Pillow would run Ghostscript
    tga = encode(Image.fromarray(load_sample_images().images[0]), "TGA")
    assert _reason(tga) == "undecodable"  # a valid image, but not an accepted format
    assert isinstance(decode_image(tga, ImageLimits(formats=("TGA",))), Image.Image)


@pytest.mark.parametrize("name", ["china_jpeg", "flower_png"])
def test_rejects_truncated_files(name):
    data = IMAGES[name]
    assert _reason(data[: len(data) // 2]) == "undecodable"
    assert _reason(data[:40]) == "undecodable"


def test_rejects_too_many_bytes_before_decoding():
    data = IMAGES["flower_png"]
    assert _reason(data, ImageLimits(max_bytes=len(data) - 1)) == "too_many_bytes"
    assert isinstance(decode_image(data, ImageLimits(max_bytes=len(data))), Image.Image)


def test_rejects_huge_header_without_decoding():
    # 100000 x 100000 = 1e10 pixels: Pillow's own DecompressionBombError (> 2 * MAX_IMAGE_PIXELS).
    assert _reason(_png_with_size(100_000, 100_000)) == "too_many_pixels"
    # 9000 x 9000 = 81e6: below Pillow's bomb threshold, above our limit. Had the pixels been decoded, the
    # 8x8 payload would have failed as 'undecodable' (truncated): the header check came first.
    bomb = _png_with_size(9000, 9000)
    assert _reason(bomb, ImageLimits(max_pixels=40_000_000)) == "too_many_pixels"
    assert _reason(bomb, ImageLimits(max_pixels=90_000_000)) == "undecodable"


def test_rejects_a_real_compressed_bomb():
    # A genuine 8000x8000 bilevel PNG (64e6 pixels, 192 MB as RGB) that compresses to a few kB.
    bomb = encode(Image.new("1", (8000, 8000), 1), "PNG", optimize=True)
    assert len(bomb) < 100_000
    assert _reason(bomb, ImageLimits(max_pixels=40_000_000)) == "too_many_pixels"


def test_rejects_too_small():
    digit = IMAGES["digit_8x8_png"]
    assert _reason(digit, ImageLimits(min_side=9)) == "too_small"
    assert decode_image(digit, ImageLimits(min_side=8)).size == (8, 8)


def test_preprocess_batch_keeps_order_and_isolates_bad_images():
    spec = _spec((32, 32), "shortest")
    datas = [IMAGES["china_jpeg"], b"", b"not an image", IMAGES["digit_8x8_png"]]
    out = preprocess_batch(datas, spec, LIMITS)
    kinds = ["ndarray", "ImageRejectedError", "ImageRejectedError", "ndarray"]
    assert [type(o).__name__ for o in out] == kinds
    assert [o.reason for o in out[1:3]] == ["empty", "undecodable"]
    assert isinstance(out[1], ValueError)  # InvalidInputError is a ValueError
    assert np.stack([out[0], out[3]]).shape == (2, 32, 32, 3)


def test_exif_orientation_is_ignored_by_default_like_open_clip():
    china = Image.fromarray(load_sample_images().images[0])  # 640 wide, 427 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = encode(china, "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMITS).size == (640, 427)
    assert decode_image(data, LIMITS, exif_transpose=True).size == (427, 640)


def test_image_format():
    assert image_format(IMAGES["china_jpeg"]) == "image/jpeg"
    assert image_format(IMAGES["flower_png"]) == "image/png"
    assert image_format(IMAGES["china_palette_gif"]) == "image/gif"
    assert image_format(encode(Image.new("RGB", (4, 4)), "WEBP")) == "image/webp"
    assert image_format(b"garbage") == "application/octet-stream"
    assert image_format(b"") == "application/octet-stream"


def test_limits_are_validated():
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="NOPE"):
        ImageLimits(formats=("PNG", "NOPE"))


def test_serving_modules_do_not_import_torch():
    code = (
        "import sys, retrieval_service.usecases.preprocess, retrieval_service.adapters.milvus.store, "
        "retrieval_service.adapters.blob_store, retrieval_service.errors\n"
        "bad = [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]\n"
        "print(bad)\nsys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
