"""The two torch modules that become the ONNX graphs Triton serves.

Both take what a client can produce without torch (uint8 pixels, int64 token ids) and return
L2-normalized float32 embeddings, so that cosine similarity is a dot product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class ImageTower(torch.nn.Module):
    """uint8 [B, H, W, 3] RGB pixels -> float32 [B, D] L2-normalized image embeddings.

    In the graph: x / 255, then (x - mean) / std per channel (torchvision `ToTensor` + `Normalize`,
    as in open_clip's eval transform), NHWC -> NCHW, `model.encode_image`, L2 normalization.
    Resize and center crop to (H, W) happen on the client (see `vitrine.manifest.ImageTower`).

    Args:
        model: an open_clip CLIP model (float32 or float16 weights).
        mean, std: RGB normalization constants of the model's preprocessing.
    """

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = next(model.parameters()).dtype
        channel = (1, 1, 1, 3)  # broadcasts over NHWC
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(channel), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(channel), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        x = x.permute(0, 3, 1, 2).to(self.compute_dtype)
        embedding = self.model.encode_image(x)
        return F.normalize(embedding.to(torch.float32), dim=-1)


class TextTower(torch.nn.Module):
    """int64 [B, context_length] token ids -> float32 [B, D] L2-normalized text embeddings.

    `model.encode_text` (open_clip pools at the <eot> position, the row's largest id), then L2
    normalization in float32.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedding = self.model.encode_text(input_ids)
        return F.normalize(embedding.to(torch.float32), dim=-1)


def _text_parts(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding the text transformer's parts if a dynamic-length forward reproduces it exactly, else None.

    Supported: open_clip's built-in text tower (`CLIP`, whose parts are attributes of the model, or `CustomTextCLIP`
    with a `TextTransformer` as `model.text`) with a causal mask, no padding mask, no class token and pooling at the
    <eot> position (`text_pool_type` 'argmax'). Hugging Face text towers (`HFTextEncoder`) are not: they keep the
    fixed-length export.
    """
    parts = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(getattr(parts, name, None) is not None for name in needed):
        return None
    if getattr(parts, "text_pool_type", getattr(model, "text_pool_type", None)) != "argmax":
        return None
    if getattr(parts, "cls_emb", None) is not None or getattr(parts, "use_pad_mask", False):
        return None
    return parts


def supports_dynamic_length(model: torch.nn.Module) -> bool:
    """True when `DynamicTextTower` can export `model`'s text tower (see `_text_parts`)."""
    return _text_parts(model) is not None


class DynamicTextTower(torch.nn.Module):
    """int64 [B, L] token ids, any 2 <= L <= context_length -> float32 [B, D] L2-normalized text embeddings.

    The same computation as open_clip's `encode_text` on the ids padded to context_length, run on the first L
    positions only: token embedding + `positional_embedding[:L]`, the transformer with the causal mask cut to
    `attn_mask[:L, :L]`, `ln_final`, pooling at the <eot> position (the row's largest id), `text_projection`.
    Exact because the attention is causal (a position never sees the padding after it) and the pooled position is
    inside the first L. open_clip 3.3's `CLIP.encode_text` adds all context_length positional embeddings, so it
    cannot take a shorter input; `TextTransformer._embeds` slices them the same way this module does.

    Raises:
        ValueError: the model's text tower is not supported (`supports_dynamic_length` is False).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        parts = _text_parts(model)
        if parts is None:
            raise ValueError("this text tower has no exact dynamic-length form (see export.towers._text_parts)")
        self.token_embedding = parts.token_embedding
        self.positional_embedding = parts.positional_embedding
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.text_projection = parts.text_projection
        self.register_buffer("attn_mask", parts.attn_mask.detach().clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length].to(cast_dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
        return F.normalize(x.to(torch.float32), dim=-1)
