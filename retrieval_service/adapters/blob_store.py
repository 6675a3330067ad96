"""Content-addressed local store of original image bytes.

An image's id is the sha256 hex digest of its encoded bytes (the Milvus primary key too), and its bytes live
at `<root>/<id[0:2]>/<id[2:4]>/<id>`. Writes go to a temporary file in the same directory and are renamed
into place with `os.replace`, so a reader never sees a partial file and concurrent writers of the same
bytes are harmless. `BlobStore`'s methods are synchronous and safe to call from several threads or processes;
`AsyncBlobStore` runs them in a thread pool for the use cases.
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from retrieval_service.errors import InvalidInputError, NotFoundError
from vitrine.image_ids import image_id_of, is_image_id


def content_id(data: bytes) -> str:
    """Return the id of `data`: its sha256 digest as 64 lowercase hex characters (`vitrine.image_ids`)."""
    return image_id_of(data)


def check_content_id(image_id: object) -> str:
    """Return `image_id` if it is a content id (64 lowercase hex characters, a sha256 digest).

    Raises:
        InvalidInputError: anything else (so an id can never be a path or inject into a filter expression).
    """
    if not is_image_id(image_id):
        shown = repr(image_id) if len(repr(image_id)) <= 80 else repr(image_id)[:77] + "..."
        raise InvalidInputError(
            f"image id must be 64 lowercase hex characters (a sha256 digest), got {shown}"
        )
    return image_id


class BlobStore:
    """Original image bytes on the local filesystem, keyed by their sha256."""

    def __init__(self, root: Path | str) -> None:
        """Use (and create if needed) the directory `root`."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, image_id: str) -> Path:
        """Where the bytes of `image_id` are (or would be) stored. Raises InvalidInputError for a bad id."""
        check_content_id(image_id)
        return self.root / image_id[0:2] / image_id[2:4] / image_id

    def put(self, data: bytes, image_id: str | None = None) -> str:
        """Store `data` (idempotent: storing the same bytes twice writes them once) and return its id.

        Args:
            data: the encoded image bytes.
            image_id: `content_id(data)` when the caller has already computed it (ingest hashes each image
                once); None computes it here. A wrong id is the caller's bug: it is not re-checked.

        Returns:
            sha256 hex digest of `data`.

        Raises:
            OSError: the filesystem refused the write (disk full, permissions).
        """
        image_id = image_id or content_id(data)
        final = self.path(image_id)
        if final.is_file():
            return image_id
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{image_id[:8]}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return image_id

    def get(self, image_id: str) -> bytes:
        """Return the stored bytes of `image_id`.

        Raises:
            InvalidInputError: `image_id` is not a content id.
            NotFoundError: nothing is stored under it.
        """
        try:
            return self.path(image_id).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no stored image bytes for id {image_id}") from None

    def exists(self, image_id: str) -> bool:
        """True when bytes are stored under `image_id` (InvalidInputError for a malformed id)."""
        return self.path(image_id).is_file()

    def delete(self, image_id: str) -> bool:
        """Remove the bytes of `image_id`; returns False when there were none. Empty fan-out dirs stay."""
        try:
            self.path(image_id).unlink()
        except FileNotFoundError:
            return False
        return True


class AsyncBlobStore:
    """Async facade over one `BlobStore` for the use cases; blocking file I/O runs in `executor`.

    Blob writes wait on fsync (~1-3 ms per file here), not the CPU, so the default pool has more threads (8)
    than cores and a batch's files are written in parallel.
    """

    def __init__(self, blobs: BlobStore, executor: Executor | None = None) -> None:
        self.sync = blobs
        self.executor = executor or ThreadPoolExecutor(8, thread_name_prefix="vitrine-blobs")

    async def get(self, image_id: str) -> bytes:
        """`BlobStore.get`: the stored bytes (NotFoundError when absent)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.sync.get, image_id)

    async def put_all(self, contents: Sequence[bytes], image_ids: Sequence[str]) -> None:
        """Store each of `contents` under its already computed id, one pool thread per file (fsyncs overlap)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.executor, functools.partial(self.sync.put, c, i))
                               for c, i in zip(contents, image_ids)))

    def shutdown(self) -> None:
        """Let queued writes finish (bytes of rows being inserted land before exit)."""
        self.executor.shutdown(wait=True)
