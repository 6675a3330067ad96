"""The demo model `vitrine-digits-tiny` in PyTorch: building it, its inputs, and a fast text encoding.

- `create_demo_model`: random init or a checkpoint, eval preprocess and tokenizer (open_clip);
- `_preprocess_split`: a split's digits through the serving path (`data.render_digit` -> open_clip's
  eval transform: resize shortest side bicubic, center crop 32 px, normalize), computed once;
- `encode_text_trimmed` / `encode_text_bucketed`: text encoded on length-sorted buckets trimmed to
  their longest caption (exact for a causal text tower that pools at <eot>);
- `_torch_threads`: `torch.set_num_threads` for a block.

Names called from `export.demo.train.train` keep their (private) names: its source text and that
of `encode_text_trimmed` are part of the cache key (`export.demo.cache.cache_key`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from export.demo import MODEL_NAME, register_model_config
from export.demo.data import Split, load_digit_arrays, render_digit, split_indices


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(n)`; the previous thread count is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
