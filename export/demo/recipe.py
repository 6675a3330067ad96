"""The training recipe of the demo model: `Recipe` (hyperparameters) and `DEFAULT_RECIPE`.

Every field is an ingredient of `export.demo.cache.cache_key`, so changing a default retrains the
demo model once. This module imports neither torch nor open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters of the demo model (all part of the cache key).

    Attributes:
        epochs: passes over the 1,400 training digits.
        batch_size: images per step (the last, smaller batch of an epoch is kept).
        lr: AdamW peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: linear warm-up steps from lr/100 to lr, then cosine decay to 0.
        captions_per_image: 1: one caption per image per step, drawn from all training templates;
            2: one English and one Chinese caption per image per step.
        filler_probability: chance of random filler before, and independently after, a caption
            (`captions.sample_caption`).
        max_filler: most filler words / characters on each side.
        max_shift_px: largest random shift, in pixels of the 32 px model input, per axis.
        max_rotation_deg: largest random rotation, degrees.
        max_scale_delta: random zoom factor in [1 - max_scale_delta, 1 + max_scale_delta].
        ema_decay: decay of the exponential moving average of the weights that is kept as the result
            (0 keeps the last iterate).
        image_loss_weight: weight of the image-image supervised contrastive term (0: off).
        seed: seeds model initialisation, shuffling, caption choice and shifts.
        num_threads: `torch.set_num_threads` during training and evaluation.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    captions_per_image: int = 2
    filler_probability: float = 0.8
    max_filler: int = 4
    max_shift_px: float = 2.0
    max_rotation_deg: float = 10.0
    max_scale_delta: float = 0.1
    ema_decay: float = 0.995
    image_loss_weight: float = 0.5
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.captions_per_image not in (1, 2):
            raise ValueError(f"captions_per_image must be 1 or 2, got {self.captions_per_image}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.max_shift_px < 0:
            raise ValueError(f"invalid recipe {self}")


DEFAULT_RECIPE = Recipe()
