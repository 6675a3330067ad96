"""Retrieval quality of the demo model in PyTorch: precision@k on a split (`evaluate`).

Text queries: every training and evaluation template for every digit, ranked against all images of
the split by cosine similarity; image queries: every image of the split against all the others.
`ensure_checkpoint` records the held-out result next to the checkpoint; the tests require >= 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from export.demo.captions import EVALUATION_TEMPLATES, TRAINING_TEMPLATES
from export.demo.data import Split, load_split
from export.demo.model import _preprocess_split, _torch_threads

PRECISION_K = 10


def _precision_at_k(
    scores: torch.Tensor, query_labels: torch.Tensor, item_labels: torch.Tensor, k: int
) -> torch.Tensor:
    """float [Q]: fraction of the top-k items (by score, float [Q, N]) whose label equals the query's."""
    top = scores.topk(k, dim=1).indices  # [Q, k]
    return (item_labels[top] == query_labels[:, None]).float().mean(1)


@torch.no_grad()
def evaluate(
    model: open_clip.CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor],
    split: Split = "heldout",
    *,
    k: int = PRECISION_K,
    num_threads: int = 2,
) -> dict[str, Any]:
    """precision@k retrieval on `split`, in PyTorch.

    Text queries: every training and evaluation template for every digit, ranked against all images
    of the split by cosine similarity. Image queries: every image of the split against all the
    others (the query itself excluded). precision@k = (# of the top k with the query's label) / k.

    Returns:
        {"split", "k", "num_items",
         "text_queries": [{"query", "template", "language", "kind": "training"|"evaluation", "label",
                           "precision"}, ...],
         "templates": [{"template", "language", "kind", "mean_precision", "min_precision"}, ...],
         "image_to_image": {"num_queries", "mean_precision", "min_precision"},
         "summary": {"training_templates_mean", "evaluation_templates_mean",
                     "evaluation_templates_min", "image_to_image_mean"}}
        where "evaluation_templates_min" is the smallest per-template mean over the evaluation phrasings.

    Raises:
        ValueError: unknown split, or k >= number of items in the split.
    """
    items = load_split(split)
    if not 0 < k < len(items):
        raise ValueError(f"k must be in 1..{len(items) - 1} for split {split!r}, got {k}")
    was_training = model.training
    model.eval()
    with _torch_threads(num_threads):
        pixels, item_labels = _preprocess_split(preprocess, split)
        image_emb = torch.cat([model.encode_image(chunk, normalize=True) for chunk in pixels.split(256)])

        templates = [(t, "training") for t in TRAINING_TEMPLATES]
        templates += [(t, "evaluation") for t in EVALUATION_TEMPLATES]
        queries = [(t, kind, label) for t, kind in templates for label in range(10)]
        tokens = tokenizer([t.format(label) for t, _, label in queries])
        text_emb = torch.cat([model.encode_text(chunk, normalize=True) for chunk in tokens.split(256)])
        query_labels = torch.tensor([label for _, _, label in queries])
        text_precision = _precision_at_k(text_emb @ image_emb.T, query_labels, item_labels, k)

        similarity = image_emb @ image_emb.T
        similarity.fill_diagonal_(-math.inf)  # a query never retrieves itself
        image_precision = _precision_at_k(similarity, item_labels, item_labels, k)
    model.train(was_training)

    text_queries = [
        {
            "query": t.format(label),
            "template": t.text,
            "language": t.language,
            "kind": kind,
            "label": label,
            "precision": float(p),
        }
        for (t, kind, label), p in zip(queries, text_precision.tolist())
    ]
    per_template: list[dict[str, Any]] = []
    for t, kind in templates:
        values = [
            q["precision"] for q in text_queries if q["template"] == t.text and q["language"] == t.language
        ]
        per_template.append(
            {
                "template": t.text,
                "language": t.language,
                "kind": kind,
                "mean_precision": float(np.mean(values)),
                "min_precision": float(np.min(values)),
            }
        )
    eval_means = [v["mean_precision"] for v in per_template if v["kind"] == "evaluation"]
    train_means = [v["mean_precision"] for v in per_template if v["kind"] == "training"]
    return {
        "split": split,
        "k": k,
        "num_items": len(items),
        "text_queries": text_queries,
        "templates": per_template,
        "image_to_image": {
            "num_queries": len(items),
            "mean_precision": float(image_precision.mean()),
            "min_precision": float(image_precision.min()),
        },
        "summary": {
            "training_templates_mean": float(np.mean(train_means)),
            "evaluation_templates_mean": float(np.mean(eval_means)),
            "evaluation_templates_min": float(np.min(eval_means)),
            "image_to_image_mean": float(image_precision.mean()),
        },
    }
