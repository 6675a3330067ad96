"""`GenerationOptions`: the typed, validated options of one Gemini generation, and the values they accept.

The options map onto the google-genai SDK's `GenerateContentConfig` (`to_config()`); every value is checked
once, when the options are built, so a bad one never reaches Gemini.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.genai import types

from retrieval_service.errors import InvalidInputError

#: Aspect ratios Gemini 2.5 Flash Image accepts in `imageConfig.aspectRatio`
#: (https://ai.google.dev/gemini-api/docs/image-generation#aspect_ratios).
ASPECT_RATIOS: tuple[str, ...] = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")

#: Output modalities of `generationConfig.responseModalities`.
RESPONSE_MODALITIES: tuple[str, ...] = ("TEXT", "IMAGE")

#: `HarmBlockThreshold` values a caller may pass as `safety_threshold` (google.genai.types).
SAFETY_THRESHOLDS: tuple[str, ...] = (
    "BLOCK_LOW_AND_ABOVE",
    "BLOCK_MEDIUM_AND_ABOVE",
    "BLOCK_ONLY_HIGH",
    "BLOCK_NONE",
    "OFF",
)

#: The harm categories a `safety_threshold` is applied to: the four the Gemini API lets callers adjust
#: (https://ai.google.dev/gemini-api/docs/safety-settings#safety-filters).
SAFETY_CATEGORIES: tuple[types.HarmCategory, ...] = (
    types.HarmCategory.HARM_CATEGORY_HARASSMENT,
    types.HarmCategory.HARM_CATEGORY_HATE_SPEECH,
    types.HarmCategory.HARM_CATEGORY_SEXUALLY_EXPLICIT,
    types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT,
)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class GenerationOptions:
    """Options passed through to Gemini's `GenerateContentConfig`; None leaves Gemini's default.

    Attributes:
        temperature: sampling temperature, 0..2.
        top_p: nucleus sampling probability mass, 0..1.
        top_k: top-k sampling, >= 1.
        seed: sampling seed, a signed 32-bit integer.
        max_output_tokens: token limit of each candidate's output, >= 1.
        candidate_count: number of candidates, 1..8; each streamed part carries its candidate_index.
        response_modalities: non-empty subset of ("TEXT", "IMAGE"), case-insensitive; default both.
        aspect_ratio: aspect ratio of generated images, one of `ASPECT_RATIOS` (`imageConfig.aspectRatio`).
        safety_threshold: one of `SAFETY_THRESHOLDS`, applied to every category of `SAFETY_CATEGORIES`.

    Raises:
        InvalidInputError: a value is out of range; the message names the field.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_output_tokens: int | None = None
    candidate_count: int | None = None
    response_modalities: Sequence[str] = RESPONSE_MODALITIES  # stored as a tuple of upper-case names
    aspect_ratio: str | None = None
    safety_threshold: str | None = None

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_int("top_k", self.top_k, 1, None)
        _check_int("seed", self.seed, _INT32_MIN, _INT32_MAX)
        _check_int("max_output_tokens", self.max_output_tokens, 1, None)
        _check_int("candidate_count", self.candidate_count, 1, 8)

        modalities = self.response_modalities
        if isinstance(modalities, str) or not isinstance(modalities, Sequence):
            raise InvalidInputError("response_modalities must be a list of 'TEXT' and/or 'IMAGE'")
        normalized = tuple(str(m).strip().upper() for m in modalities)
        if not normalized:
            raise InvalidInputError("response_modalities must name at least one of 'TEXT', 'IMAGE'")
        unknown = [m for m in normalized if m not in RESPONSE_MODALITIES]
        if unknown:
            raise InvalidInputError(f"response_modalities: unknown modality {unknown}; allowed: TEXT, IMAGE")
        if len(set(normalized)) != len(normalized):
            raise InvalidInputError(f"response_modalities: duplicate modality in {list(normalized)}")
        object.__setattr__(self, "response_modalities", normalized)

        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInputError(
                f"aspect_ratio {self.aspect_ratio!r} is not supported; allowed: {', '.join(ASPECT_RATIOS)}"
            )
        if self.safety_threshold is not None and self.safety_threshold not in SAFETY_THRESHOLDS:
            raise InvalidInputError(
                f"safety_threshold {self.safety_threshold!r} is not supported; "
                f"allowed: {', '.join(SAFETY_THRESHOLDS)}"
            )

    def to_config(self) -> types.GenerateContentConfig:
        """Build the SDK request config (automatic function calling and stream continuation disabled)."""
        safety = (
            [types.SafetySetting(category=c, threshold=self.safety_threshold) for c in SAFETY_CATEGORIES]
            if self.safety_threshold is not None
            else None
        )
        return types.GenerateContentConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_output_tokens=self.max_output_tokens,
            candidate_count=self.candidate_count,
            response_modalities=list(self.response_modalities),
            image_config=types.ImageConfig(aspect_ratio=self.aspect_ratio) if self.aspect_ratio else None,
            safety_settings=safety,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    """Raise InvalidInputError unless `value` is None or a number (not a bool) in [low, high]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidInputError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def _check_int(name: str, value: int | None, low: int, high: int | None) -> None:
    """Raise InvalidInputError unless `value` is None or an int (not a bool) in [low, high] (None: no cap)."""
    if value is None:
        return
    out_of_range = isinstance(value, int) and (value < low or (high is not None and value > high))
    if isinstance(value, bool) or not isinstance(value, int) or out_of_range:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidInputError(f"{name} must be an integer {bound}, got {value!r}")
