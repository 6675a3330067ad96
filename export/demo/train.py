"""Train (once) and evaluate the demo CLIP `vitrine-digits-tiny` on the digits data set.

Recipe (`Recipe`; defaults tuned on 2 CPU cores): AdamW (lr 5e-4, no weight decay, betas
(0.9, 0.98), eps 1e-6 as in the CLIP paper, fused kernel), linear warm-up then cosine decay,
60 epochs of batch 64, seeded and in a fixed order; the weights kept are an exponential moving
average (decay 0.995) of the iterates. Each step pairs every image with one English and one
Chinese caption drawn by `captions.sample_caption` (a random training template, often with random
filler around it) and optimises
- a class-aware soft contrastive loss: the CLIP loss (Radford et al. 2021, symmetric cross-entropy
  over cosine-similarity logits times a learned temperature) with the one-hot targets replaced by a
  uniform distribution over all pairs of the same digit, because two captions of the same digit
  are both right; plus
- 0.5 x a supervised contrastive loss among the batch's images (Khosla et al. 2020), which makes
  image-to-image neighbours share the digit.

Training inputs go through the serving path: `data.render_digit` -> open_clip's eval transform
(resize shortest side bicubic, center crop 32 px, normalize), pre-computed once; the only
augmentation is a small random rotation, zoom and shift (`_random_affine`) with paper colour
filling the border. Text is encoded on length-sorted buckets trimmed to their longest caption
(`encode_text_bucketed`, exact for a causal text tower that pools at <eot>).

`ensure_checkpoint` caches the result under `<cache_dir>/demo/` keyed by a hash of the model config
JSON, the recipe, the data split, the training code and the caption templates; the checkpoint is a
plain `state_dict` saved with `torch.save`, loadable by
`open_clip.create_model("vitrine-digits-tiny", pretrained=str(path))`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from export.demo import MODEL_CONFIG_PATH, MODEL_NAME, register_model_config
from export.demo import captions
from export.demo.captions import EVALUATION_TEMPLATES, TRAINING_TEMPLATES, Template, sample_caption
from export.demo.data import RENDER_SIZE, Split, load_digit_arrays, load_split, render_digit, split_indices

CACHE_SUBDIR = "demo"
CACHE_FORMAT = 1  # bump when the checkpoint layout or the key's ingredients change
PRECISION_K = 10


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


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_key(recipe: Recipe = DEFAULT_RECIPE) -> str:
    """sha256 (hex) of everything that determines the trained weights.

    Ingredients: the parsed model config JSON, `recipe`, the train split's source indices, the
    training templates and filler pools, the source code of the functions that sample captions,
    render digits and train, and `CACHE_FORMAT`. (Editing one of those functions, docstring
    included, retrains once.)
    """
    code = [
        inspect.getsource(f)
        for f in (
            captions.Template.format,
            captions.sample_caption,
            captions._filler,
            captions._random_ideograph,
            render_digit,
            train,
            _random_affine,
            _soft_clip_loss,
            _soft_image_loss,
            _sample_tokens,
            encode_text_trimmed,
        )
    ]
    caption_data = {
        "templates": [[t.language, t.text] for t in TRAINING_TEMPLATES],
        "filler": captions.FILLER_WORDS,
        "same_lead": captions.SAME_LEAD_CHARACTERS,
        "same_last_byte": captions.SAME_LAST_BYTE_CHARACTERS,
        "decoys": captions.DECOY_CHARACTERS,
        "digit_words": captions.DIGIT_WORDS,
    }
    payload = {
        "format": CACHE_FORMAT,
        "model_name": MODEL_NAME,
        "model_config": json.loads(MODEL_CONFIG_PATH.read_text()),
        "recipe": asdict(recipe),
        "train_indices": split_indices("train").tolist(),
        "captions": caption_data,
        "code_sha256": hashlib.sha256("\n".join(code).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def checkpoint_paths(cache_dir: Path | str, recipe: Recipe = DEFAULT_RECIPE) -> tuple[Path, Path]:
    """(checkpoint `.pt`, info `.json`) paths for `recipe` under `<cache_dir>/demo/`."""
    stem = f"{MODEL_NAME}-{cache_key(recipe)[:16]}"
    folder = Path(cache_dir) / CACHE_SUBDIR
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def read_checkpoint_info(checkpoint: Path | str) -> dict[str, Any]:
    """The JSON written next to a checkpoint: key, recipe, train_seconds, evaluation, versions.

    Raises:
        FileNotFoundError: no `<checkpoint stem>.json` next to `checkpoint`.
    """
    path = Path(checkpoint).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {checkpoint} is not a checkpoint written by ensure_checkpoint"
        )
    return json.loads(path.read_text())


def cached_checkpoint(cache_dir: Path | str, recipe: Recipe = DEFAULT_RECIPE) -> Path | None:
    """The cached checkpoint for `recipe` under `cache_dir`, or None when there is no complete entry
    (checkpoint and JSON both present, the JSON recording the full `cache_key(recipe)`)."""
    checkpoint, info_path = checkpoint_paths(cache_dir, recipe)
    if not (checkpoint.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return None
    return checkpoint if info.get("key") == cache_key(recipe) else None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_demo_model(
    pretrained: Path | str | None = None,
) -> tuple[open_clip.CLIP, Callable[[Image.Image], torch.Tensor], open_clip.tokenizer.SimpleTokenizer]:
    """Build `vitrine-digits-tiny` (random init, or weights from the `pretrained` file) on the CPU.

    Returns:
        (model in eval mode, eval preprocess PIL -> float32 [3, 32, 32], tokenizer
        list[str] -> int64 [N, 77]).

    Raises:
        RuntimeError: `pretrained` is not a file or does not match the architecture (open_clip).
    """
    register_model_config()
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(pretrained) if pretrained is not None else None
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def _preprocess_split(
    preprocess: Callable[[Image.Image], torch.Tensor], split: Split
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [N, 3, H, W] model inputs, int64 [N] labels) of `split`: render_digit -> preprocess."""
    images, labels = load_digit_arrays()
    indices = split_indices(split)
    pixels = torch.stack([preprocess(render_digit(images[i])) for i in indices])
    return pixels, torch.as_tensor(labels[indices])


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


def encode_text_trimmed(model: open_clip.CLIP, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on the tokens up to the longest caption's <eot> only.

    The CLIP text tower is causal and pools at <eot> (the largest id, `pool_type="argmax"`), so
    positions after the last <eot> cannot change the result; skipping them makes a training step
    several times cheaper for short captions. tokens: int64 [N, context_length];
    returns float32 [N, embed_dim] (L2-normalised when `normalize`). Mirrors
    `open_clip.model.CLIP.encode_text` (open_clip_torch 3.3); tests check that they agree.
    """
    length = int(tokens.argmax(dim=1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, model.text_pool_type)
    if isinstance(model.text_projection, torch.nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def encode_text_bucketed(model: open_clip.CLIP, tokens: torch.Tensor, bucket_size: int = 32) -> torch.Tensor:
    """`encode_text_trimmed` on length-sorted buckets of `bucket_size` captions, rows in input order.

    tokens: int64 [N, context_length]; returns float32 [N, embed_dim], L2-normalised. Captions of
    similar length share a bucket, so each is trimmed close to its own length.
    """
    order = tokens.argmax(dim=1).argsort(stable=True)
    chunks = [encode_text_trimmed(model, tokens[idx]) for idx in order.split(bucket_size)]
    out = torch.empty(len(tokens), chunks[0].shape[1], dtype=chunks[0].dtype)
    return out.index_copy(0, order, torch.cat(chunks))


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


def ensure_checkpoint(
    cache_dir: Path | str, *, progress: bool = True, recipe: Recipe = DEFAULT_RECIPE
) -> Path:
    """Path of the trained demo checkpoint, training it first unless a matching one is cached.

    The cache lives in `<cache_dir>/demo/<model>-<key[:16]>.pt` (+ `.json`): `key = cache_key(recipe)`.
    A cached checkpoint is used only when its JSON records the same full key. Both files are written
    atomically (temp file + rename, checkpoint first, JSON last), so an interrupted run leaves no
    entry that looks complete. The JSON holds the key, recipe, train_seconds, the held-out
    `evaluate` result and library versions.

    Returns:
        Path of a `torch.save`d state_dict: `open_clip.create_model("vitrine-digits-tiny",
        pretrained=str(path))` loads it (call `export.demo.register_model_config()` first).

    Raises:
        OSError: `cache_dir` cannot be created or written.
    """
    cached = cached_checkpoint(cache_dir, recipe)
    if cached is not None:
        return cached
    checkpoint, info_path = checkpoint_paths(cache_dir, recipe)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    model, stats = train(recipe, progress=progress)
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    _atomic_write(checkpoint, lambda tmp: torch.save(state_dict, tmp))

    # Measure on the weights as saved and reloaded through open_clip, the path every reader uses.
    reloaded, preprocess, tokenizer = create_demo_model(checkpoint)
    evaluation = evaluate(reloaded, tokenizer, preprocess, "heldout", num_threads=recipe.num_threads)
    info = {
        "key": cache_key(recipe),
        "model_name": MODEL_NAME,
        "model_config": json.loads(MODEL_CONFIG_PATH.read_text()),
        "recipe": asdict(recipe),
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        **stats,
        "evaluation": evaluation,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(
        info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    )
    return checkpoint
