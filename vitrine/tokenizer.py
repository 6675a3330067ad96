"""Text -> token ids for the text tower, equal to the model's open_clip tokenizer, without torch.

The ids come from the repository's tokenizer.json (HF `tokenizers`, written by
`export.tokenizer_json`). Before tokenizing, each text goes through open_clip's Python cleaning
(open_clip/tokenizer.py `basic_clean` + `whitespace_clean`, and `str.lower` for clean='lower'):

    ftfy.fix_text -> html.unescape twice -> strip -> " ".join(split()) -> lower()

which a tokenizer.json normalizer cannot express (ftfy). The clean mode is read from the file:
a `Lowercase` step in its normalizer means clean='lower' (see `export.tokenizer_json`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Tokenizer

from vitrine.manifest import Manifest


def _has_lowercase(normalizer: dict | None) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Lowercase":
        return True
    return any(_has_lowercase(step) for step in normalizer.get("normalizers", []) or [])


def clean_text(text: str, lower: bool) -> str:
    """open_clip's text cleaning (`_clean_lower` when `lower`, else `_clean_whitespace`).

    Source: open_clip/tokenizer.py (`basic_clean`, `whitespace_clean`), open_clip_torch 3.3.0.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if lower else text


class TextTokenizer:
    """Batch text tokenizer producing the text tower's input.

    Args:
        tokenizer_json_path: the repository's tokenizer.json.
        context_length: tokens per row (manifest `text.context_length`).
        pad_id: id used after <eot> (manifest `text.pad_id`).

    Raises:
        FileNotFoundError: no file at `tokenizer_json_path`.
        ValueError: context_length < 2 or the file is not a valid tokenizer.json.
    """

    def __init__(self, tokenizer_json_path: Path | str, context_length: int, pad_id: int = 0) -> None:
        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found (export the model with `vitrine export`)"
            )
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for <sot> and <eot>), got {context_length}")
        raw = path.read_text(encoding="utf-8")
        try:
            self._tokenizer = Tokenizer.from_str(raw)
            spec = json.loads(raw)
        except Exception as exc:  # tokenizers raises a plain Exception on a malformed file
            raise ValueError(f"{path} is not a valid HF tokenizers file: {exc}") from exc
        self.path = path
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.lowercase = _has_lowercase(spec.get("normalizer"))
        pad_token = (spec.get("padding") or {}).get("pad_token") or self._tokenizer.id_to_token(self.pad_id)
        if pad_token is None:
            raise ValueError(f"pad_id {pad_id} is not in the vocabulary of {path}")
        # The manifest, not the file, decides the shape: open_clip's truncation (keep the first
        # context_length - 2 ids, then <eot>) and right padding with pad_id.
        self._tokenizer.enable_truncation(max_length=self.context_length)
        self._tokenizer.enable_padding(length=self.context_length, pad_id=self.pad_id, pad_token=pad_token)

    @classmethod
    def from_repository(cls, repository: Path | str, manifest: Manifest | None = None) -> "TextTokenizer":
        """Tokenizer of a Vitrine model repository (reads manifest.json when `manifest` is None).

        Raises:
            FileNotFoundError: no manifest.json or tokenizer.json in `repository`.
        """
        manifest = manifest if manifest is not None else Manifest.read(repository)
        return cls(manifest.tokenizer_path(repository), manifest.text.context_length, manifest.text.pad_id)

    def clean(self, text: str) -> str:
        """open_clip's cleaning of one text (see module docstring)."""
        return clean_text(text, self.lowercase)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids for `texts`: int64 [B, context_length], <sot> ids <eot> then pad_id.

        Raises:
            TypeError: `texts` is a single str, or an element is not a str.
            ValueError: a text is empty or only whitespace after open_clip's cleaning (message
                names its index).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts, got a single str")
        cleaned: list[str] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
            c = self.clean(text)
            if not c:
                raise ValueError(f"texts[{i}] is empty or only whitespace")
            cleaned.append(c)
        if not cleaned:
            return np.zeros((0, self.context_length), dtype=np.int64)
        encodings = self._tokenizer.encode_batch(cleaned)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        # guards against a tokenizer.json whose post-processor or padding does not fit the manifest
        if ids.shape != (len(cleaned), self.context_length):
            raise ValueError(f"tokenizer {self.path} produced shape {ids.shape}, expected "
                             f"({len(cleaned)}, {self.context_length})")
        return ids
