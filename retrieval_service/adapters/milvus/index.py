"""The vector index of the collection: its settings, the pymilvus index spec, and the search parameters.

`IndexSettings` is the `index` section of the service settings (retrieval_service.settings); the store builds
the index from it when it creates a collection, and searches with the parameters of the index that exists
(an existing collection keeps its index: `built_params` reads it back from `describe_index`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymilvus import MilvusClient
from pymilvus.milvus_client.index import IndexParams

from retrieval_service.adapters.milvus.schema import VECTOR

#: Build parameter names Milvus reports flattened next to `index_type` (server) instead of under 'params'.
_BUILD_KEYS = ("nlist", "M", "efConstruction")


class IndexSettings(BaseModel):
    """Vector index of the `embedding` field and its search parameters (Milvus names and ranges).

    Build parameters are used when the collection is created; search parameters on every search.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_type: Literal["FLAT", "IVF_FLAT", "HNSW"] = "HNSW"
    metric_type: Literal["COSINE"] = Field("COSINE", description="fixed: scores are cosine similarities")
    nlist: int = Field(128, ge=1, le=65536, description="IVF_FLAT: number of clusters")
    nprobe: int = Field(16, ge=1, le=65536, description="IVF_FLAT search: clusters visited (<= nlist)")
    M: int = Field(16, ge=2, le=2048, description="HNSW: graph degree")
    efConstruction: int = Field(200, ge=8, le=512, description="HNSW: build-time candidate list size")
    ef: int = Field(
        64, ge=1, le=32768, description="HNSW search: candidate list size (raised to offset + top_k)"
    )

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "IndexSettings":
        if self.index_type == "IVF_FLAT" and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self

    def build_params(self) -> dict[str, int]:
        """Index build parameters for `index_type` (Milvus names)."""
        if self.index_type == "IVF_FLAT":
            return {"nlist": self.nlist}
        if self.index_type == "HNSW":
            return {"M": self.M, "efConstruction": self.efConstruction}
        return {}

    def index_spec(self) -> IndexParams:
        """The pymilvus index spec of the vector field (named like the field) for these settings."""
        spec = MilvusClient.prepare_index_params()
        # Build parameters nested under "params": Milvus Lite only reads them there; the server accepts both.
        build = self.build_params()
        spec.add_index(
            VECTOR.name,
            index_type=self.index_type,
            index_name=VECTOR.name,
            metric_type=self.metric_type,
            params={"params": build} if build else {},
        )
        return spec

    def search_params(self, index_type: str, built: Mapping[str, int], window: int) -> dict[str, int]:
        """Search parameters for an index of `index_type` built with `built`, for offset + top_k = `window`.

        HNSW: ef = max(`ef`, window) (Milvus requires ef >= top_k, offset included); IVF: nprobe = min(`nprobe`,
        the built nlist); FLAT: none.
        """
        if index_type == "HNSW":
            return {"ef": max(self.ef, window)}
        if index_type.startswith("IVF"):
            return {"nprobe": min(self.nprobe, int(built.get("nlist", self.nprobe)))}
        return {}


def built_params(info: Mapping[str, object]) -> dict[str, int]:
    """Build parameters from `describe_index` output, which nests them under 'params' (Lite, or when
    created nested) or flattens them as strings (server); values that are not integers are left out."""
    params: dict[str, object] = {}
    nested = info.get("params")
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except ValueError:
            nested = {}
    if isinstance(nested, dict):
        params.update(nested)
    for key in _BUILD_KEYS:
        if key in info:
            params[key] = info[key]
    out: dict[str, int] = {}
    for key, value in params.items():
        try:
            out[key] = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue
    return out
