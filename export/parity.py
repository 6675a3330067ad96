"""The export's parity gate: ONNX Runtime vs PyTorch on real images and texts.

References come from open_clip's own path: its eval transform (PIL -> float32 [3, H, W]) then
`model.encode_image`, and its tokenizer then `model.encode_text`, both L2-normalized, in float32.
The ONNX image tower gets the same pictures as uint8 [B, H, W, 3], cut by the same eval transform
up to (not including) `ToTensor`, so the gate also checks the in-graph /255 and mean/std.

Images: scikit-learn's `load_sample_images()` photographs (china.jpg, flower.jpg) and
`load_digits()` 8x8 handwritten digit scans (UCI), both shipped with the package.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Compose, ToTensor

from export import ExportError
from vitrine.manifest import TowerParity

log = logging.getLogger(__name__)

# min cosine(ONNX, PyTorch) per row the export must reach, by precision (Vitrine project requirement)
PARITY_THRESHOLDS: dict[str, float] = {"fp32": 0.99999, "fp16": 0.999}

PARITY_TEXTS: tuple[str, ...] = (
    "a photo of a cat",
    "A Red Flower in the GARDEN, close-up.",
    "a handwritten digit seven",
    "手写数字零",
    "一座中国古建筑的照片",
    "sunset over the sea 🌅🌊 with friends 👨‍👩‍👧",
    "AT&amp;T   logo\ton a\nwhite background",
    "it's a long caption " + "about many small things in a busy street market at night " * 12,
)


@functools.lru_cache(maxsize=1)
def _sklearn_pictures() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(sklearn photos uint8 [427, 640, 3], digit scans uint8 [N, 8, 8] scaled from 0..16 to 0..255)."""
    from sklearn.datasets import load_digits, load_sample_images

    photos = tuple(np.asarray(a, dtype=np.uint8) for a in load_sample_images().images)
    scans = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    return photos, scans


def sample_images(num_digits: int = 6) -> list[Image.Image]:
    """Real pictures for the gate: 2 sklearn photos (RGB 427x640) + `num_digits` digit scans (L 8x8)."""
    photos, scans = _sklearn_pictures()
    # 2-D uint8 arrays become mode "L" images, as a scanned gray picture would load.
    return [Image.fromarray(p) for p in photos] + [Image.fromarray(d) for d in scans[:num_digits]]


def split_eval_transform(
    transform: Compose,
) -> tuple[Callable[[Image.Image], Image.Image], Callable[[Any], torch.Tensor]]:
    """Split open_clip's eval Compose at ToTensor (open_clip's MaybeToTensor subclasses it).

    Returns:
        (PIL -> resized/cropped RGB PIL, PIL -> float32 [3, H, W] normalized tensor).

    Raises:
        ExportError: the transform has no ToTensor step.
    """
    steps = list(transform.transforms)
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if cut is None:
        raise ExportError(f"cannot find ToTensor in the eval transform {transform}")
    return Compose(steps[:cut]), Compose(steps[cut:])


def image_batch(images: Sequence[Image.Image], transform: Compose) -> tuple[np.ndarray, torch.Tensor]:
    """Prepare images both ways: (uint8 [B, H, W, 3] for ONNX, float32 [B, 3, H, W] open_clip input)."""
    geometric, to_tensor = split_eval_transform(transform)
    cropped = [geometric(img).convert("RGB") for img in images]
    pixels = np.stack([np.asarray(c, dtype=np.uint8) for c in cropped])
    reference_input = torch.stack([to_tensor(c) for c in cropped])
    return pixels, reference_input


@torch.no_grad()
def reference_image_embeddings(model: torch.nn.Module, reference_input: torch.Tensor) -> np.ndarray:
    """open_clip image embeddings, float32 [B, D], L2-normalized."""
    return F.normalize(model.encode_image(reference_input).float(), dim=-1).numpy()


@torch.no_grad()
def reference_text_embeddings(model: torch.nn.Module, token_ids: torch.Tensor) -> np.ndarray:
    """open_clip text embeddings, float32 [B, D], L2-normalized."""
    return F.normalize(model.encode_text(token_ids).float(), dim=-1).numpy()


def compare(tower: str, candidate: np.ndarray, reference: np.ndarray, threshold: float) -> TowerParity:
    """Measure agreement of two float [B, D] embedding batches and enforce the gate.

    min_cosine is the smallest row-wise cosine similarity; max_abs_diff the largest element-wise
    |candidate - reference|.

    Raises:
        ExportError: shapes differ, a value is not finite, or min_cosine < threshold.
    """
    if candidate.shape != reference.shape:
        raise ExportError(f"{tower} tower: ONNX output shape {candidate.shape} != PyTorch {reference.shape}")
    if not np.isfinite(candidate).all():
        raise ExportError(f"{tower} tower: ONNX output has NaN/inf values")
    a = candidate.astype(np.float64)
    b = reference.astype(np.float64)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    parity = TowerParity(
        batch_size=int(a.shape[0]),
        min_cosine=float(cosine.min()),
        max_abs_diff=float(np.abs(a - b).max()),
        threshold=float(threshold),
    )
    log.info("parity %s tower: batch %d, min cosine %.9f, max abs diff %.3g (threshold %g)",
             tower, parity.batch_size, parity.min_cosine, parity.max_abs_diff, threshold)
    if not parity.min_cosine >= threshold:
        raise ExportError(
            f"{tower} tower failed the parity gate: min cosine(ONNX, PyTorch) {parity.min_cosine:.9f} < "
            f"{threshold} (max abs diff {parity.max_abs_diff:.3g}); nothing was written"
        )
    return parity
