"""Train the demo model once and cache it by a content key: `ensure_checkpoint`.

`ensure_checkpoint` caches the result under `<cache_dir>/demo/` keyed by a hash of the model config
JSON, the recipe, the data split, the training code and the caption templates (`cache_key`); the
checkpoint is a plain `state_dict` saved with `torch.save`, loadable by
`open_clip.create_model("vitrine-digits-tiny", pretrained=str(path))`. Next to it a JSON records the
key, recipe, training stats, the held-out `evaluate` result and library versions.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch

from export.demo import MODEL_CONFIG_PATH, MODEL_NAME
from export.demo import captions
from export.demo.augment import _random_affine, _sample_tokens
from export.demo.captions import TRAINING_TEMPLATES
from export.demo.data import render_digit, split_indices
from export.demo.evaluate import evaluate
from export.demo.losses import _soft_clip_loss, _soft_image_loss
from export.demo.model import create_demo_model, encode_text_trimmed
from export.demo.recipe import DEFAULT_RECIPE, Recipe
from export.demo.train import train

CACHE_SUBDIR = "demo"
CACHE_FORMAT = 1  # bump when the checkpoint layout or the key's ingredients change


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
