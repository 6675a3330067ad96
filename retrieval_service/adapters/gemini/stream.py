"""Bookkeeping of one Gemini response stream: SDK responses -> events, and the closing `Finished`.

`StreamState` reads what one HTTP stream says (parts, finish reasons per candidate, prompt block, usage);
`Tally` counts what was yielded across the attempts of one `stream()` call (for retry rules and timings).
Internal to the Gemini adapter: `client.GeminiGenerator` is their only user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from google.genai import types

from retrieval_service.adapters.gemini.events import (
    BLOCKING_FINISH_REASONS,
    Finished,
    GenerationEvent,
    ImageChunk,
    TextChunk,
)


class TruncatedStreamError(Exception):
    """The HTTP stream ended cleanly but without a finish reason or prompt feedback."""


@dataclass
class Tally:
    """Events yielded by one `stream()` call so far, over all its attempts.

    Attributes:
        started: `time.perf_counter()` at the call, seconds.
        emitted: TextChunk + ImageChunk events yielded (retries are allowed only while it is 0).
        text_parts, image_parts: the counts per kind.
        first_part_at: `time.perf_counter()` at the first event, seconds; None before it.
    """

    started: float
    emitted: int = 0
    text_parts: int = 0
    image_parts: int = 0
    first_part_at: float | None = None

    def count(self, event: GenerationEvent) -> None:
        """Count one yielded event (and note the time of the first)."""
        if self.first_part_at is None:
            self.first_part_at = time.perf_counter()
        self.emitted += 1
        if isinstance(event, TextChunk):
            self.text_parts += 1
        elif isinstance(event, ImageChunk):
            self.image_parts += 1


@dataclass
class StreamState:
    """What one HTTP stream said so far: finish reasons per candidate, prompt block, latest usage."""

    finish_reasons: dict[int, str] = field(default_factory=dict)
    prompt_block_reason: str = ""
    usage: types.GenerateContentResponseUsageMetadata | None = None

    @property
    def complete(self) -> bool:
        """True once a finish reason or a prompt block reason arrived (else the stream was cut short)."""
        return bool(self.finish_reasons) or bool(self.prompt_block_reason)

    def events(self, response: types.GenerateContentResponse) -> list[GenerationEvent]:
        """The TextChunk / ImageChunk events of one streamed response, in order (thought parts skipped)."""
        if response.usage_metadata is not None:
            self.usage = response.usage_metadata  # running total of this request; the latest one wins
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            self.prompt_block_reason = _enum_str(feedback.block_reason)
        out: list[GenerationEvent] = []
        for candidate in response.candidates or []:
            index = candidate.index or 0
            if candidate.content is not None:
                for part in candidate.content.parts or []:
                    if part.thought:
                        continue  # model reasoning, not output
                    if part.text:
                        out.append(TextChunk(text=part.text, candidate_index=index))
                    elif part.inline_data is not None and part.inline_data.data:
                        mime = part.inline_data.mime_type or "application/octet-stream"
                        out.append(ImageChunk(part.inline_data.data, mime, candidate_index=index))
            if candidate.finish_reason is not None:
                self.finish_reasons[index] = _enum_str(candidate.finish_reason)
        return out

    def finished(self, tally: Tally, attempts: int) -> Finished:
        """The closing event: the prompt block, else the first blocking candidate, else the lowest one."""
        blocking = [
            (i, r) for i, r in sorted(self.finish_reasons.items()) if r in BLOCKING_FINISH_REASONS
        ]
        if self.prompt_block_reason:
            finish_reason, blocked, block_reason = "", True, self.prompt_block_reason
        elif blocking:
            finish_reason, blocked, block_reason = blocking[0][1], True, blocking[0][1]
        else:
            lowest = min(self.finish_reasons) if self.finish_reasons else 0
            finish_reason, blocked, block_reason = self.finish_reasons.get(lowest, ""), False, ""
        usage = self.usage
        now = time.perf_counter()
        first = tally.first_part_at
        return Finished(
            finish_reason=finish_reason,
            blocked=blocked,
            block_reason=block_reason,
            prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
            candidates_tokens=(usage.candidates_token_count or 0) if usage else 0,
            total_tokens=(usage.total_token_count or 0) if usage else 0,
            first_part_ms=None if first is None else (first - tally.started) * 1000.0,
            total_ms=(now - tally.started) * 1000.0,
            text_parts=tally.text_parts,
            image_parts=tally.image_parts,
            attempts=attempts,
        )


def _enum_str(value: object) -> str:
    """'STOP' from FinishReason.STOP (or an unknown value the SDK kept as a plain string)."""
    return str(getattr(value, "value", value))
