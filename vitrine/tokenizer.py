"""Text -> token ids for the text tower, equal to the model's open_clip tokenizer, without torch.

The ids come from the repository's tokenizer.json (HF `tokenizers`, written by
`export.tokenizer_json`). Before tokenizing, each text goes through open_clip's Python cleaning
(open_clip/tokenizer.py `basic_clean` + `whitespace_clean`, and `str.lower` for clean='lower'):

    ftfy.fix_text -> html.unescape twice -> strip -> " ".join(split()) -> lower()

which a tokenizer.json normalizer cannot express (ftfy). The clean mode is read from the file:
a `Lowercase` step in its normalizer means clean='lower' (see `export.tokenizer_json`).
"""

from __future__ import annotations

import bisect
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Tokenizer

from vitrine.manifest import Manifest, check_length_buckets


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


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of a batch of texts padded to one length, with what each row holds.

    ids: int64 [B, L], <sot> ids <eot> then pad_id; L is the smallest allowed length that fits the longest row.
    token_counts: int32 [B], ids before the padding (<sot> and <eot> included), <= context_length.
    truncated: bool [B], the text had more tokens than context_length and its tail was cut (open_clip's rule:
        the first context_length - 2 ids, then <eot>).
    """

    ids: np.ndarray
    token_counts: np.ndarray
    truncated: np.ndarray


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of the ascending `buckets` >= `length` (the last bucket when none is).

    E.g. bucket_for(9, (8, 16, 32, 77)) == 16.
    """
    i = bisect.bisect_left(buckets, length)
    return buckets[min(i, len(buckets) - 1)]


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
        # No padding in the HF tokenizer: rows are padded here to a length bucket (or context_length).
        self._tokenizer.enable_truncation(max_length=self.context_length)
        self._tokenizer.no_padding()

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
        return self.encode_padded(texts, (self.context_length,)).ids

    def encode_padded(self, texts: Sequence[str], buckets: Sequence[int] | None = None, *,
                      cleaned: bool = False) -> TokenBatch:
        """Token ids for `texts`, padded to the smallest of `buckets` that fits the longest row.

        Args:
            texts: the texts (raw, or already through `clean` when `cleaned`).
            buckets: ascending allowed lengths, the last = context_length (manifest `text.buckets`); None =
                (context_length,), the fixed-length graph's only shape.
            cleaned: skip open_clip's cleaning (the caller already applied `clean`, e.g. for a cache key).

        Returns:
            TokenBatch: ids int64 [B, L], token_counts int32 [B], truncated bool [B]; B = 0 gives [0, buckets[0]].

        Raises:
            TypeError: `texts` is a single str, or an element is not a str.
            ValueError: a text is empty or only whitespace after cleaning (message names its index); buckets
                not ascending or not ending at context_length.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts, got a single str")
        buckets = check_length_buckets(tuple(buckets), self.context_length) if buckets else (self.context_length,)
        prepared: list[str] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
            c = text if cleaned else self.clean(text)
            if not c:
                raise ValueError(f"texts[{i}] is empty or only whitespace")
            prepared.append(c)
        if not prepared:
            empty = np.zeros(0, dtype=np.int32)
            return TokenBatch(np.zeros((0, buckets[0]), dtype=np.int64), empty, empty.astype(bool))
        encodings = self._tokenizer.encode_batch(prepared)
        counts = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        longest = int(counts.max())
        # guards against a tokenizer.json whose post-processor or truncation does not fit the manifest
        if longest > self.context_length or int(counts.min()) < 2:
            raise ValueError(f"tokenizer {self.path} produced rows of {int(counts.min())}..{longest} ids, expected "
                             f"2..{self.context_length}")
        ids = np.full((len(encodings), bucket_for(longest, buckets)), self.pad_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : counts[row]] = encoding.ids
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return TokenBatch(ids, counts, truncated)
