"""Reference images for a Gemini request: checked, size-limited and, where Gemini does not accept the type,
transcoded to PNG with Pillow before they are sent as inline data."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from retrieval_service.errors import InvalidInputError

#: Input image MIME types Gemini accepts as inline data
#: (https://ai.google.dev/gemini-api/docs/image-understanding, "Supported image formats").
#: References of other types (GIF, BMP, TIFF) are transcoded to PNG.
GEMINI_IMAGE_MIME_TYPES: frozenset[str] = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}
)

#: Inline data must keep the whole request under 20 MB
#: (https://ai.google.dev/gemini-api/docs/image-understanding, "Passing images inline"); checked on the raw
#: reference bytes (base64 adds a third on the wire).
MAX_INLINE_BYTES = 20 * 1000 * 1000


def prepare_references(references: Sequence[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    """Check references and transcode types Gemini does not accept to PNG.

    Args:
        references: (encoded image bytes, MIME type) pairs, in the order they are to be sent.

    Returns:
        (bytes, MIME type) pairs in the same order; 'image/jpg' is spelled 'image/jpeg', types outside
        `GEMINI_IMAGE_MIME_TYPES` are PNG (first frame of animations; RGBA when the image has alpha).

    Raises:
        InvalidInputError: a reference is not a (bytes, str) pair, is empty, cannot be decoded for
            transcoding, or the references total more than `MAX_INLINE_BYTES`.
    """
    prepared: list[tuple[bytes, str]] = []
    for i, ref in enumerate(references):
        if not (isinstance(ref, tuple) and len(ref) == 2):
            raise InvalidInputError(f"reference {i} must be a (bytes, mime_type) pair")
        data, mime_type = ref
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InvalidInputError(f"reference {i} is empty")
        mime = (mime_type or "").strip().lower()
        if mime == "image/jpg":
            mime = "image/jpeg"
        if mime not in GEMINI_IMAGE_MIME_TYPES:
            data, mime = _to_png(bytes(data), i, mime_type)
        prepared.append((bytes(data), mime))
    total = sum(len(d) for d, _ in prepared)
    if total > MAX_INLINE_BYTES:
        raise InvalidInputError(
            f"reference images total {total} bytes; Gemini inline data is limited to {MAX_INLINE_BYTES} bytes"
        )
    return prepared


def _to_png(data: bytes, index: int, mime_type: str) -> tuple[bytes, str]:
    """PNG bytes of the first frame of `data`; InvalidInputError (naming reference `index`) if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # first frame of animations
            alpha = "A" in image.getbands() or "transparency" in image.info
            converted = image.convert("RGBA" if alpha else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(
            f"reference {index} ({mime_type or 'no MIME type'}) is not an image Gemini accepts "
            f"({', '.join(sorted(GEMINI_IMAGE_MIME_TYPES))}) and could not be decoded to convert it: {exc}"
        ) from exc
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue(), "image/png"
