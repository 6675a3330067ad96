"""The events `GeminiGenerator.stream()` yields: `TextChunk` and `ImageChunk` in Gemini's order, then one
`Finished`. Plain frozen dataclasses, no SDK or transport types, so any transport can convert them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

#: Candidate finish reasons meaning Gemini withheld the output for policy reasons (types.FinishReason).
BLOCKING_FINISH_REASONS: frozenset[str] = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)


@dataclass(frozen=True)
class TextChunk:
    """A text part, in the order Gemini streamed it."""

    text: str
    candidate_index: int = 0


@dataclass(frozen=True)
class ImageChunk:
    """A generated image part: encoded bytes exactly as Gemini returned them (e.g. PNG)."""

    data: bytes
    mime_type: str
    candidate_index: int = 0


@dataclass(frozen=True)
class Finished:
    """The last event of every stream.

    Attributes:
        finish_reason: Gemini's finish reason of candidate 0 (or of the blocked candidate), e.g. 'STOP',
            'MAX_TOKENS', 'IMAGE_SAFETY'; '' when the prompt itself was blocked (Gemini then sends no
            candidate).
        blocked: True when Gemini blocked the prompt (`promptFeedback.blockReason`) or an output
            (finish reason in `BLOCKING_FINISH_REASONS`).
        block_reason: the prompt's block reason (e.g. 'SAFETY', 'PROHIBITED_CONTENT') or the blocking finish
            reason; '' when not blocked.
        prompt_tokens, candidates_tokens, total_tokens: Gemini's `usageMetadata` (0 where it sent none).
        first_part_ms: milliseconds from the call to the first streamed part; None when no part came.
        total_ms: milliseconds from the call to the end of the stream (retries and backoff included).
        text_parts, image_parts: counts of the TextChunk / ImageChunk events yielded.
        attempts: HTTP requests made (1 + retries).
    """

    finish_reason: str
    blocked: bool = False
    block_reason: str = ""
    prompt_tokens: int = 0
    candidates_tokens: int = 0
    total_tokens: int = 0
    first_part_ms: float | None = None
    total_ms: float = 0.0
    text_parts: int = 0
    image_parts: int = 0
    attempts: int = 1


GenerationEvent = Union[TextChunk, ImageChunk, Finished]
