"""The randomness of a training step: image augmentation and caption sampling.

- `_random_affine`: a small random rotation, zoom and shift of each pre-processed image, paper
  colour filling the border (the only image augmentation; inputs are otherwise exactly the serving
  path's `data.render_digit` -> open_clip eval transform);
- `_sample_tokens`: per template pool (all training templates, or English and Chinese), one caption
  per image drawn by `captions.sample_caption` (a random training template, often with random filler
  around it), tokenized.

The names stay private and the source text is part of the cache key (`export.demo.cache.cache_key`
hashes it with `inspect.getsource`): renaming or editing them, docstring included, retrains once.
"""

from __future__ import annotations

import math
import random

import open_clip
import torch
import torch.nn.functional as F

from export.demo.captions import Template, sample_caption
from export.demo.recipe import Recipe


def _random_affine(
    batch: torch.Tensor, paper: torch.Tensor, recipe: "Recipe", generator: torch.Generator
) -> torch.Tensor:
    """Randomly rotate, scale and shift each image of float [B, 3, H, W] (bilinear), filling with the
    paper colour `paper` float [3]: rotation uniform in +-`max_rotation_deg`, scale in
    1 +- `max_scale_delta`, shift uniform in +-`max_shift_px` input pixels per axis."""
    b, c, h, w = batch.shape
    u = torch.rand(b, 4, generator=generator) * 2 - 1  # uniform [-1, 1)
    angle = u[:, 0] * math.radians(recipe.max_rotation_deg)
    scale = 1 + u[:, 1] * recipe.max_scale_delta
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of s px is 2 s / size
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[:, 2] * recipe.max_shift_px * 2 / w], dim=1),
            torch.stack([sin, cos, u[:, 3] * recipe.max_shift_px * 2 / h], dim=1),
        ],
        dim=1,
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    fill = paper.view(1, c, 1, 1)
    moved = F.grid_sample(batch - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + fill


def _sample_tokens(
    labels: torch.Tensor,
    pools: list[tuple[Template, ...]],
    tokenizer: open_clip.tokenizer.SimpleTokenizer,
    rng: random.Random,
    recipe: "Recipe",
) -> list[torch.Tensor]:
    """Per template pool, int64 [B, context_length]: one sampled caption per label; a caption that
    would not fit the context length is used without filler."""
    limit = tokenizer.context_length - 2  # room for <sot> and <eot>
    out = []
    for pool in pools:
        captions = []
        for label in labels.tolist():
            caption = sample_caption(
                label, pool, rng, filler_probability=recipe.filler_probability, max_filler=recipe.max_filler
            )
            if len(tokenizer.encode(caption)) > limit:
                caption = sample_caption(label, pool, rng, filler_probability=0.0)
            captions.append(caption)
        out.append(tokenizer(captions))
    return out
