"""The model-repository contract between `export/` (writer) and its readers.

A Vitrine model repository is a stock Triton model repository plus two files at its root:

    <repo>/
      manifest.json          this module's `Manifest`, everything a client needs
      tokenizer.json         HF `tokenizers` file equal to the model's open_clip tokenizer
      <image_model>/config.pbtxt, <image_model>/1/model.onnx
      <text_model>/config.pbtxt,  <text_model>/1/model.onnx

Triton ignores plain files at the repository root, so stock `tritonserver` loads the same folder.
This module imports neither torch nor open_clip: the serving side reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TowerParity(_Strict):
    """ONNX-vs-PyTorch agreement measured by the export's parity gate on one batch."""

    batch_size: int
    min_cosine: float = Field(description="smallest per-row cosine(ONNX, PyTorch) of the embeddings")
    max_abs_diff: float = Field(description="largest |ONNX - PyTorch| over all embedding elements")
    threshold: float = Field(description="min_cosine had to be >= this for the export to succeed")


class ImageTower(_Strict):
    """The image tower as Triton serves it.

    Input `input_name`: uint8 [B, H, W, 3], RGB, already resized and center-cropped to `size`
    (see `resize_mode`, `interpolation`); float conversion (/255) and mean/std normalization
    happen inside the ONNX graph. Output `output_name`: float32 [B, embedding_dim], L2-normalized.
    """

    triton_model: str
    input_name: str = "pixels"
    output_name: str = "embedding"
    size: tuple[int, int] = Field(description="(height, width) in pixels of the input image")
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def check_length_buckets(buckets: tuple[int, ...], context_length: int) -> tuple[int, ...]:
    """`buckets` when they are valid text length buckets: strictly ascending, >= 2, the last = context_length.

    Raises:
        ValueError: otherwise (the message lists the buckets).
    """
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2 or buckets[-1] != context_length:
        raise ValueError(f"length buckets must be strictly ascending, >= 2 and end at context_length "
                         f"{context_length}, got {list(buckets)}")
    return buckets


class TextTower(_Strict):
    """The text tower as Triton serves it.

    Input `input_name`: int64 [B, L] token ids: <sot> ids <eot> then `pad_id`, truncated to context_length
    with the last kept id replaced by <eot> (open_clip's rule). L = context_length for a fixed-length graph;
    with `dynamic_length` any 2 <= L <= context_length, and clients pad each request to the smallest of
    `length_buckets` that fits its longest text (the causal attention and <eot> pooling make the embedding
    independent of the padding, see export.towers.DynamicTextTower).
    Output `output_name`: float32 [B, embedding_dim], L2-normalized.
    """

    triton_model: str
    input_name: str = "input_ids"
    output_name: str = "embedding"
    context_length: int
    pad_id: int = 0
    tokenizer_file: str = TOKENIZER_FILE
    dynamic_length: bool = Field(False, description="the graph takes any sequence length 2..context_length")
    length_buckets: tuple[int, ...] = Field(
        (), description="ascending token lengths requests are padded up to; the last is context_length. Empty = "
                        "(context_length,). Only a dynamic_length tower may have more than one")

    @model_validator(mode="after")
    def _check_buckets(self) -> "TextTower":
        buckets = self.length_buckets
        if not buckets:
            return self
        check_length_buckets(buckets, self.context_length)
        if len(buckets) > 1 and not self.dynamic_length:
            raise ValueError(f"length_buckets {list(buckets)} need a dynamic_length text tower (this graph takes "
                             f"only {self.context_length} tokens)")
        return self

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padded lengths a client may send, ascending (at least (context_length,))."""
        return self.length_buckets or (self.context_length,)


class Manifest(_Strict):
    """Everything a client needs to use the exported towers; written by `export`, read everywhere else."""

    format_version: int = FORMAT_VERSION
    model_id: str = Field(description="'<model_name>/<pretrained>@sha256:<weights_sha256[:16]>'")
    model_name: str = Field(description="open_clip model name, e.g. 'ViT-B-32'")
    pretrained: str = Field(description="pretrained tag, 'file:<checkpoint name>' or 'random'")
    weights_sha256: str = Field(description="sha256 of the state_dict tensors, hex")
    embedding_dim: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    image: ImageTower
    text: TextTower
    parity: dict[str, TowerParity] = Field(default_factory=dict, description="keyed 'image' / 'text'")
    exporter: dict[str, str] = Field(default_factory=dict, description="tool versions, opset, time")

    @staticmethod
    def make_model_id(model_name: str, pretrained: str, weights_sha256: str) -> str:
        """Return the canonical model id string (see the `model_id` field)."""
        return f"{model_name}/{pretrained}@sha256:{weights_sha256[:16]}"

    @property
    def collection_name(self) -> str:
        """A Milvus collection name for this model: letters, digits and '_' only, <= 255 chars."""
        base = re.sub(r"[^0-9A-Za-z]+", "_", f"{self.model_name}_{self.pretrained}").strip("_").lower()
        return f"vitrine_{base[:200]}_{self.weights_sha256[:12]}"

    def write(self, repository: Path) -> Path:
        """Write `manifest.json` into `repository`; returns its path."""
        path = Path(repository) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def read(cls, repository: Path | str) -> "Manifest":
        """Read `<repository>/manifest.json`.

        Raises:
            FileNotFoundError: no manifest there (not a Vitrine model repository; run `vitrine export`).
            pydantic.ValidationError: the file does not match this schema.
        """
        path = Path(repository) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {repository} is not a Vitrine model repository "
                "(create one with `vitrine export` or `vitrine train-demo`)"
            )
        return cls.model_validate_json(path.read_text())

    def tokenizer_path(self, repository: Path | str) -> Path:
        """Path of the tokenizer.json for the text tower inside `repository`."""
        return Path(repository) / self.text.tokenizer_file
