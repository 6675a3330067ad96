"""Image ids, as every part of Vitrine spells them: the sha256 of the encoded image bytes, 64 lowercase hex.

An id is the Milvus primary key, the blob store's file name and the `image_id` of the public API
(proto/vitrine/v1/retrieval_service.proto), so it is defined once, here. Because it is hex only, an id can
never be a path or inject into a Milvus filter expression.
"""

from __future__ import annotations

import hashlib
import re

#: 64 lowercase hex characters (a sha256 digest, FIPS 180-4).
IMAGE_ID_PATTERN = re.compile(r"[0-9a-f]{64}")


def image_id_of(data: bytes) -> str:
    """Return the id of the encoded image `data` (bytes): its sha256 digest, 64 lowercase hex characters."""
    return hashlib.sha256(data).hexdigest()


def is_image_id(value: object) -> bool:
    """True when `value` is a str of exactly 64 lowercase hex characters."""
    return isinstance(value, str) and IMAGE_ID_PATTERN.fullmatch(value) is not None
