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
