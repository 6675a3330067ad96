"""Train the demo CLIP `vitrine-digits-tiny` on the digits data set: the training loop `train`.

Recipe (`export.demo.recipe.Recipe`; defaults tuned on 2 CPU cores): AdamW (lr 5e-4, no weight
decay, betas (0.9, 0.98), eps 1e-6 as in the CLIP paper, fused kernel), linear warm-up then cosine
decay, 60 epochs of batch 64, seeded and in a fixed order; the weights kept are an exponential moving
average (decay 0.995) of the iterates. Each step pairs every image with one English and one
Chinese caption drawn by `captions.sample_caption` (a random training template, often with random
filler around it) and optimises
- a class-aware soft contrastive loss: the CLIP loss (Radford et al. 2021, symmetric cross-entropy
  over cosine-similarity logits times a learned temperature) with the one-hot targets replaced by a
  uniform distribution over all pairs of the same digit, because two captions of the same digit
  are both right; plus
- 0.5 x a supervised contrastive loss among the batch's images (Khosla et al. 2020), which makes
  image-to-image neighbours share the digit
(both in `export.demo.losses`).

Training inputs go through the serving path: `data.render_digit` -> open_clip's eval transform
(resize shortest side bicubic, center crop 32 px, normalize), pre-computed once; the only
augmentation is a small random rotation, zoom and shift (`export.demo.augment._random_affine`) with
paper colour filling the border. Text is encoded on length-sorted buckets trimmed to their longest
caption (`export.demo.model.encode_text_bucketed`, exact for a causal text tower that pools at <eot>).

Train once and reuse through `export.demo.cache.ensure_checkpoint`; measure with
`export.demo.evaluate.evaluate`. The source of `train` is part of the cache key: editing it,
docstring included, retrains once.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import open_clip
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from export.demo import MODEL_NAME
from export.demo.augment import _random_affine, _sample_tokens
from export.demo.captions import TRAINING_TEMPLATES
from export.demo.data import RENDER_SIZE
from export.demo.losses import _soft_clip_loss, _soft_image_loss
from export.demo.model import _preprocess_split, _torch_threads, create_demo_model, encode_text_bucketed
from export.demo.recipe import DEFAULT_RECIPE, Recipe


def train(recipe: Recipe = DEFAULT_RECIPE, *, progress: bool = True) -> tuple[open_clip.CLIP, dict[str, Any]]:
    """Train `vitrine-digits-tiny` from scratch on the train split (deterministic for a given recipe).

    Returns:
        (model in eval mode, stats {"train_seconds" (wall clock), "train_cpu_seconds" (CPU time of
        this process, all threads), "steps", "final_loss", "epoch_losses"}).
    """
    with _torch_threads(recipe.num_threads):
        torch.manual_seed(recipe.seed)
        model, preprocess, tokenizer = create_demo_model()
        generator = torch.Generator().manual_seed(recipe.seed)

        pixels, labels = _preprocess_split(preprocess, "train")  # float [1400, 3, 32, 32], int64 [1400]
        paper = preprocess(Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), (255, 255, 255)))[:, 0, 0]  # [3]
        caption_rng = random.Random(recipe.seed)
        if recipe.captions_per_image == 1:  # one caption from the whole pool
            pools = [TRAINING_TEMPLATES]
        else:  # one English and one Chinese caption
            pools = [tuple(t for t in TRAINING_TEMPLATES if t.language == lang) for lang in ("en", "zh")]

        steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
        total_steps = recipe.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            betas=(0.9, 0.98),
            eps=1e-6,
            fused=True,  # one fused kernel; the default per-tensor CPU loop is ~40x slower here
        )
        warmup = max(1, min(recipe.warmup_steps, total_steps - 1))
        scheduler = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup),
            ],
            milestones=[warmup],
        )

        # exponential moving average of the weights (buffers included), evaluated and saved instead
        # of the last iterate when ema_decay > 0
        ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
            if recipe.ema_decay > 0
            else None
        )
        model.train()
        start, start_cpu = time.perf_counter(), time.process_time()
        epoch_losses: list[float] = []
        bar = tqdm(range(recipe.epochs), desc=f"training {MODEL_NAME}", unit="epoch", disable=not progress)
        for _ in bar:
            order = torch.randperm(len(labels), generator=generator)
            running = 0.0
            for batch in order.split(recipe.batch_size):
                y = labels[batch]
                images = _random_affine(pixels[batch], paper, recipe, generator)
                tokens = _sample_tokens(y, pools, tokenizer, caption_rng, recipe)
                image_emb = model.encode_image(images, normalize=True)
                text_emb = encode_text_bucketed(model, torch.cat(tokens))
                scale = model.logit_scale.exp()
                loss = _soft_clip_loss(image_emb, text_emb, y, y.repeat(len(pools)), scale)
                if recipe.image_loss_weight > 0:
                    loss = loss + recipe.image_loss_weight * _soft_image_loss(image_emb, y, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
                if ema is not None:
                    ema.update_parameters(model)
                running += loss.item() * len(batch)
            epoch_losses.append(running / len(labels))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
        train_seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - start_cpu
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        model.eval()
    return model, {
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),
        "steps": total_steps,
        "final_loss": epoch_losses[-1],
        "epoch_losses": [round(x, 5) for x in epoch_losses],
    }
