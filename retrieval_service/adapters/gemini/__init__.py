"""The Gemini adapter: image (and text) generation through the google-genai SDK; nothing here knows gRPC.

    client.py      GeminiGenerator: the long-lived SDK client, the streaming call, retries before output,
                   classification of SDK / transport errors, DEFAULT_MODEL
    options.py     GenerationOptions (validated once, -> GenerateContentConfig) and the values it accepts
    events.py      what a stream yields: TextChunk, ImageChunk, then one Finished (BLOCKING_FINISH_REASONS)
    errors.py      GenerationError and its subclasses (not configured, permission, quota)
    references.py  reference images: checks, the 20 MB inline limit, PNG transcoding of other types
    stream.py      bookkeeping of one response stream (internal to client.py)

Import the public names from this package: `from retrieval_service.adapters.gemini import GeminiGenerator`.
"""

from retrieval_service.adapters.gemini.client import DEFAULT_MODEL, GeminiGenerator
from retrieval_service.adapters.gemini.errors import (
    GenerationError,
    GenerationNotConfiguredError,
    GenerationPermissionError,
    GenerationQuotaError,
)
from retrieval_service.adapters.gemini.events import (
    BLOCKING_FINISH_REASONS,
    Finished,
    GenerationEvent,
    ImageChunk,
    TextChunk,
)
from retrieval_service.adapters.gemini.options import (
    ASPECT_RATIOS,
    RESPONSE_MODALITIES,
    SAFETY_CATEGORIES,
    SAFETY_THRESHOLDS,
    GenerationOptions,
)
from retrieval_service.adapters.gemini.references import GEMINI_IMAGE_MIME_TYPES, MAX_INLINE_BYTES

__all__ = [
    "ASPECT_RATIOS",
    "BLOCKING_FINISH_REASONS",
    "DEFAULT_MODEL",
    "GEMINI_IMAGE_MIME_TYPES",
    "MAX_INLINE_BYTES",
    "RESPONSE_MODALITIES",
    "SAFETY_CATEGORIES",
    "SAFETY_THRESHOLDS",
    "Finished",
    "GeminiGenerator",
    "GenerationError",
    "GenerationEvent",
    "GenerationNotConfiguredError",
    "GenerationOptions",
    "GenerationPermissionError",
    "GenerationQuotaError",
    "ImageChunk",
    "TextChunk",
]
