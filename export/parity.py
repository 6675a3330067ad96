"""The export's parity gate: ONNX Runtime vs PyTorch on real images and texts.

References come from open_clip's own path: its eval transform (PIL -> float32 [3, H, W]) then
`model.encode_image`, and its tokenizer then `model.encode_text`, both L2-normalized, in float32.
The ONNX image tower gets the same pictures as uint8 [B, H, W, 3], cut by the same eval transform
up to (not including) `ToTensor`, so the gate also checks the in-graph /255 and mean/std.

Images: scikit-learn's `load_sample_images()` photographs (china.jpg, flower.jpg) and
`load_digits()` 8x8 handwritten digit scans (UCI), both shipped with the package.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
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
# int8: ONNX Runtime dynamic quantization (export.quantize) measured 0.9935-0.9999 on the demo and ViT-B-32
# towers with no precision@10 loss on the demo's held-out digits; 0.99 leaves room for other models.
PARITY_THRESHOLDS: dict[str, float] = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
#: The parity report written next to manifest.json (Triton ignores plain files at the repository root).
PARITY_REPORT_FILE = "parity_report.json"
RETRIEVAL_K = 10

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


@dataclasses.dataclass(frozen=True)
class HeldoutSet:
    """A labelled text -> image retrieval set the model never trained on.

    Attributes:
        name: what it is, e.g. "demo held-out digits (397 images x 300 queries)".
        images: the items, PIL images (any size; each side prepares them for its tower).
        item_labels: int64 [N], the class of each image.
        texts: the text queries.
        query_labels: int64 [Q], the class each query asks for.
    """

    name: str
    images: list[Image.Image]
    item_labels: np.ndarray
    texts: list[str]
    query_labels: np.ndarray


def heldout_set(model_name: str) -> HeldoutSet | None:
    """The held-out evaluation set for `model_name`, or None when the model has none.

    Only the demo model ('vitrine-digits-tiny') has one: the held-out split of scikit-learn's digits
    (`export.demo.data`, never trained on), rendered as the demo serves them, against every training and
    evaluation caption template (`export.demo.captions`) for each digit 0-9 (30 templates x 10 = 300 queries).
    """
    from export.demo import MODEL_NAME  # noqa: PLC0415
    from export.demo.captions import EVALUATION_TEMPLATES, TRAINING_TEMPLATES  # noqa: PLC0415
    from export.demo.data import load_split, render_item  # noqa: PLC0415

    if model_name != MODEL_NAME:
        return None
    items = load_split("heldout")
    templates = list(TRAINING_TEMPLATES) + list(EVALUATION_TEMPLATES)
    texts = [t.format(digit) for t in templates for digit in range(10)]
    return HeldoutSet(
        name=f"demo held-out digits ({len(items)} images x {len(texts)} text queries)",
        images=[render_item(item) for item in items],
        item_labels=np.array([item.label for item in items], dtype=np.int64),
        texts=texts,
        query_labels=np.array([digit for _ in templates for digit in range(10)], dtype=np.int64),
    )


@dataclasses.dataclass(frozen=True)
class RetrievalParity:
    """Text -> image retrieval of a candidate export against a float32 reference on a held-out set.

    Attributes:
        dataset: `HeldoutSet.name`.
        k: cut-off (10).
        num_queries, num_items: set size.
        recall_at_k: mean over queries of |top-k(candidate) & top-k(reference)| / k, the reference's top-k
            taken as the relevant set (1.0 = same neighbours).
        reference_precision_at_k: mean fraction of the reference's top-k with the query's label.
        precision_at_k: the same for the candidate.
        precision_loss: reference_precision_at_k - precision_at_k (positive = the candidate is worse).
    """

    dataset: str
    k: int
    num_queries: int
    num_items: int
    recall_at_k: float
    reference_precision_at_k: float
    precision_at_k: float
    precision_loss: float


def _top_k(text: np.ndarray, image: np.ndarray, k: int) -> np.ndarray:
    scores = text.astype(np.float64) @ image.astype(np.float64).T  # [Q, N] cosine (rows are unit vectors)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def retrieval_parity(
    heldout: HeldoutSet,
    candidate_text: np.ndarray,
    candidate_image: np.ndarray,
    reference_text: np.ndarray,
    reference_image: np.ndarray,
    k: int = RETRIEVAL_K,
) -> RetrievalParity:
    """Compare top-k text -> image retrieval of two embedding sets on `heldout`.

    Args:
        heldout: the set (labels and sizes).
        candidate_text, reference_text: float [Q, D] L2-normalized query embeddings.
        candidate_image, reference_image: float [N, D] L2-normalized item embeddings.
        k: cut-off.

    Raises:
        ValueError: shapes do not match the set, or k is not in 1..N.
    """
    q, n = len(heldout.texts), len(heldout.images)
    checks = (("candidate_text", candidate_text, q), ("reference_text", reference_text, q),
              ("candidate_image", candidate_image, n), ("reference_image", reference_image, n))
    for label, array, rows in checks:
        if array.ndim != 2 or array.shape[0] != rows:
            raise ValueError(f"{label} must be [{rows}, D], got {array.shape}")
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    top_c = _top_k(candidate_text, candidate_image, k)
    top_r = _top_k(reference_text, reference_image, k)
    recall = float(np.mean([len(set(c) & set(r)) / k for c, r in zip(top_c.tolist(), top_r.tolist())]))
    wanted = heldout.query_labels[:, None]
    p_ref = float((heldout.item_labels[top_r] == wanted).mean())
    p_cand = float((heldout.item_labels[top_c] == wanted).mean())
    return RetrievalParity(heldout.name, k, q, n, recall, p_ref, p_cand, p_ref - p_cand)


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """What the parity gate measured for one export (`<repository>/parity_report.json`).

    Attributes:
        precision: the export's precision ('fp32', 'fp16', 'int8').
        quantization: `QuantizationSettings.describe()` for int8 exports, else "".
        towers: per tower ('image', 'text'): the `TowerParity` fields (vs float32 PyTorch).
        retrieval: text -> image retrieval of the exported ONNX towers vs float32 PyTorch on the model's
            held-out set, or None when the model has none.
    """

    precision: str
    quantization: str
    towers: dict[str, dict[str, float]]
    retrieval: RetrievalParity | None

    def write(self, repository: Path) -> Path:
        """Write `<repository>/parity_report.json`; returns its path."""
        path = Path(repository) / PARITY_REPORT_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, repository: Path | str) -> "ParityReport | None":
        """Read `<repository>/parity_report.json`; None when the repository has none (older exports).

        Raises:
            ValueError: the file is not a parity report.
        """
        path = Path(repository) / PARITY_REPORT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            retrieval = RetrievalParity(**data["retrieval"]) if data.get("retrieval") else None
            return cls(data["precision"], data.get("quantization", ""), data["towers"], retrieval)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a parity report: {exc}") from exc

    def summary_lines(self) -> list[str]:
        """Human-readable lines: per-tower cosine / abs diff, then retrieval recall@k and precision@k loss."""
        lines = [f"parity {tower}: min cosine {p['min_cosine']:.7f}, max abs diff {p['max_abs_diff']:.2e} "
                 f"(threshold {p['threshold']:g})" for tower, p in self.towers.items()]
        r = self.retrieval
        if r is not None:
            lines.append(f"retrieval on {r.dataset}: recall@{r.k} vs fp32 PyTorch {r.recall_at_k:.4f}, "
                         f"precision@{r.k} {r.precision_at_k:.4f} (fp32 {r.reference_precision_at_k:.4f}, "
                         f"loss {r.precision_loss:+.4f})")
        return lines
