"""Opaque page tokens for SearchImages (AIP-158).

A token carries the offset of the next page and a fingerprint of the query it belongs to; a token used with a
different query (other text, image, filter or min_score) is rejected, as AIP-158 requires.
"""

from __future__ import annotations

import base64
import hashlib
import json

from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW
from retrieval_service.errors import InvalidInputError


def query_fingerprint(*parts: bytes | str | float | None) -> str:
    """Return a short hex digest identifying a query from its parts (text/image bytes, filter, min_score)."""
    h = hashlib.sha256()
    for part in parts:
        raw = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()[:24]


def encode_page_token(offset: int, fingerprint: str) -> str:
    """Return the token for the page starting at `offset` (results) of the query `fingerprint`."""
    raw = json.dumps({"o": offset, "q": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str) -> int:
    """Return the offset carried by `token`; 0 for an empty token.

    Raises:
        InvalidInputError: the token is malformed or was issued for a different query.
    """
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, owner = int(data["o"]), str(data["q"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # OverflowError: int(Infinity)
        raise InvalidInputError("page_token is malformed; pass a next_page_token returned by SearchImages") from exc
    if owner != fingerprint:
        raise InvalidInputError("page_token belongs to a different query (text, image, filter or min_score changed)")
    if not 0 <= offset < MILVUS_MAX_WINDOW:
        raise InvalidInputError(f"page_token offset {offset} is out of range [0, {MILVUS_MAX_WINDOW})")
    return offset
