"""Opaque page tokens for SearchImages (AIP-158).

A token carries the offset of the next page and a fingerprint of the query it belongs to; a token used with a
different query (other text, image, filter or min_score) is rejected, as AIP-158 requires.
"""

from __future__ import annotations

import base64
import hashlib
import json

from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW
from retrieval_service.errors import FieldError


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

    A token is the base64url (unpadded) JSON object {"o": offset, "q": fingerprint}: `o` must be a JSON
    integer (not a boolean, a string or a float such as 2.5 or 5.0) and `q` a string; anything else is
    malformed.

    Raises:
        FieldError: field 'page_token' (INVALID_ARGUMENT): the token is malformed, was issued for a different
            query, or its offset is out of range.
    """
    if not token:
        return 0
    malformed = "page_token is malformed; pass a next_page_token returned by SearchImages"
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, owner = data["o"], data["q"]
    # ValueError covers binascii.Error and JSON errors; RecursionError: JSON nested thousands deep
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FieldError("page_token", malformed) from exc
    # `type(...) is int`: json gives bool for true/false (an int subclass) and float for 2.5, 5.0 or 1e400
    if type(offset) is not int or type(owner) is not str:
        raise FieldError("page_token", malformed)
    if owner != fingerprint:
        raise FieldError("page_token",
                         "page_token belongs to a different query (text, image, filter or min_score changed)")
    if not 0 <= offset < MILVUS_MAX_WINDOW:
        raise FieldError("page_token", f"page_token offset {offset} is out of range [0, {MILVUS_MAX_WINDOW})")
    return offset
