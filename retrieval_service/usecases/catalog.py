"""Use cases on the stored images themselves: GetImage, DeleteImages, GetCollectionStats.

Plain values in and out (retrieval_service.usecases.types); errors from retrieval_service.errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from retrieval_service.adapters.blob_store import AsyncBlobStore
from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW, AsyncVectorStore, validate_filter
from retrieval_service.errors import FieldError, NotFoundError
from retrieval_service.usecases.preprocess import image_format
from retrieval_service.usecases.types import CollectionStats, StoredImage, require_image_id


class Catalog:
    """Read, delete and describe the images of one collection (and their original bytes).

    Args:
        model_id: the manifest's model id (reported by `stats`).
        store: the collection (async).
        blobs: the original bytes (async).
    """

    def __init__(self, *, model_id: str, store: AsyncVectorStore, blobs: AsyncBlobStore) -> None:
        self.model_id = model_id
        self._store = store
        self._blobs = blobs

    async def get(self, image_id: str) -> StoredImage:
        """The record, original bytes and MIME type of a stored image.

        Raises:
            FieldError('image_id'): not 64 lowercase hex characters.
            NotFoundError: the id is not in the collection (or its bytes are gone).
            DependencyUnavailableError: Milvus is down.
        """
        require_image_id(image_id)
        rows = await self._store.get([image_id])
        if not rows:
            raise NotFoundError(f"image {image_id} is not in the collection")
        content = await self._blobs.get(image_id)
        return StoredImage(record=rows[0], content=content, mime_type=image_format(content))

    async def delete(self, image_ids: Sequence[str], filter: str) -> int:  # noqa: A002 - Milvus' name
        """Delete by ids or by filter (exactly one); returns how many stored images were deleted.

        The original bytes stay in the blob store (it is shared by collections of other models).

        Raises:
            FieldError('image_ids'): both or neither given, more than MILVUS_MAX_WINDOW (16384) ids, a bad id.
            InvalidFilterError: `filter` is outside the filter grammar.
            DependencyUnavailableError: Milvus is down.
        """
        if bool(image_ids) == bool(filter):
            raise FieldError("image_ids", "set exactly one of image_ids and filter")
        if image_ids:
            if len(image_ids) > MILVUS_MAX_WINDOW:
                raise FieldError("image_ids", f"at most {MILVUS_MAX_WINDOW} ids per call")
            ids = [require_image_id(i, "image_ids") for i in image_ids]
            return await self._store.delete(ids=ids)
        return await self._store.delete(filter=validate_filter(filter))

    async def stats(self) -> CollectionStats:
        """Count, model id, embedding dim and index of the served collection.

        Raises:
            DependencyUnavailableError: Milvus is down.
        """
        info = await self._store.describe()
        return CollectionStats(
            collection=str(info["collection"]),
            image_count=int(info["count"]),
            model_id=self.model_id,
            embedding_dim=int(info["dim"]),
            index_type=str(info["index_type"]),
            metric_type=str(info["metric_type"]),
            index_params={k: str(v) for k, v in dict(info.get("params", {})).items()},
            milvus_kind="lite" if self._store.is_lite else "server",
        )
