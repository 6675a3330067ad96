"""The two training losses of the demo model, on L2-normalised embeddings.

- `_soft_clip_loss`: a class-aware soft contrastive loss: the CLIP loss (Radford et al. 2021,
  symmetric cross-entropy over cosine-similarity logits times a learned temperature) with the one-hot
  targets replaced by a uniform distribution over all pairs of the same digit, because two captions
  of the same digit are both right;
- `_soft_image_loss`: a supervised contrastive loss among the batch's images (Khosla et al. 2020),
  which makes image-to-image neighbours share the digit (weighted by `Recipe.image_loss_weight`).

The names stay private and the source text is part of the cache key (`export.demo.cache.cache_key`
hashes it with `inspect.getsource`): renaming or editing them, docstring included, retrains once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _soft_clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_labels: torch.Tensor,
    text_labels: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss with class-aware soft targets.

    image_emb float [B, D], text_emb float [M, D] (L2-normalised), labels int64 [B] / [M]; targets are
    uniform over same-label pairs (every image has at least one same-label caption, and vice versa).
    """
    logits = logit_scale * image_emb @ text_emb.T  # [B, M]
    same = (image_labels[:, None] == text_labels[None, :]).to(logits.dtype)
    i2t = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(same.T / same.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def _soft_image_loss(
    image_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Supervised contrastive loss among the images of a batch (Khosla et al. 2020, "SupCon").

    image_emb float [B, D] (L2-normalised), labels int64 [B]: each image's softmax over the other
    images should put uniform mass on those of the same digit; images without such a partner in
    the batch are skipped.
    """
    logits = logit_scale * image_emb @ image_emb.T
    eye = torch.eye(len(labels), dtype=torch.bool)
    logits = logits.masked_fill(eye, -math.inf)
    same = ((labels[:, None] == labels[None, :]) & ~eye).to(logits.dtype)
    count = same.sum(1)
    keep = count > 0
    log_p = F.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
    return -((same * log_p).sum(1)[keep] / count[keep]).mean()
