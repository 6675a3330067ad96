"""What `vitrine bench scale` measures: `ScaleConfig` (sizes, backends, index types, queries, sweeps, index
settings, data distribution), the `QUICK` preset of `make bench`, and `parse_sizes` for `--sizes`."""

from __future__ import annotations

import dataclasses

from retrieval_service.adapters.milvus import IndexSettings
from tools.bench.scale_data import TOP_K, MixtureSpec

BACKENDS = ("lite", "server")
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")


def parse_sizes(text: str) -> tuple[int, ...]:
    """'10k,100k,1M' or '10000,100000' -> (10000, 100000, 1000000). Raises ValueError on a bad item."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = {"k": 1_000, "m": 1_000_000}.get(item[-1], 1)
        number = item[:-1] if mult > 1 else item
        try:
            value = int(float(number) * mult)
        except ValueError:
            raise ValueError(f"size {item!r} is not a number like 10000, 10k or 1M") from None
        if value < TOP_K:
            raise ValueError(f"size {value} must be >= top_k ({TOP_K})")
        sizes.append(value)
    if not sizes:
        raise ValueError("no sizes given")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """What `run_scale` measures.

    Attributes:
        sizes: collection sizes (rows).
        dim: vector dimension.
        backends: subset of ("lite", "server").
        index_types: subset of ("FLAT", "IVF_FLAT", "HNSW").
        queries: measured single queries per (backend, size, index) at the default search parameters.
        sweep_queries: queries per nprobe/ef sweep point.
        search_budget_s: at most this many seconds of measured searches per point, once
            `tools.bench.scale_case.MIN_QUERIES` are done (Milvus Lite's FLAT search copies the whole
            collection per query: ~0.4 s at 100k x 512); the `queries` column says how many were measured.
        nprobe_sweep: IVF_FLAT nprobe values (those <= nlist are used).
        ef_sweep: HNSW ef values (Milvus raises ef below top_k to top_k).
        nlist, nprobe, M, efConstruction, ef: index settings (defaults: the service's `IndexSettings`).
        mixture: the data distribution.
        seed: seeds data, queries and mixture.
    """

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dim: int = 512
    backends: tuple[str, ...] = BACKENDS
    index_types: tuple[str, ...] = INDEX_TYPES
    queries: int = 1000
    sweep_queries: int = 200
    search_budget_s: float = 60.0
    nprobe_sweep: tuple[int, ...] = (1, 4, 16, 64)
    ef_sweep: tuple[int, ...] = (10, 32, 64, 128, 256)
    nlist: int = 128
    nprobe: int = 16
    M: int = 16
    efConstruction: int = 200
    ef: int = 64
    mixture: MixtureSpec = MixtureSpec()
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {self.backends}")
        bad = [i for i in self.index_types if i not in INDEX_TYPES]
        if bad or not self.index_types:
            raise ValueError(
                f"index types must be a non-empty subset of {INDEX_TYPES}, got {self.index_types}")
        if not self.sizes or min(self.sizes) < TOP_K:
            raise ValueError(f"sizes must be >= top_k ({TOP_K}), got {self.sizes}")
        if self.queries < 1 or self.sweep_queries < 0:
            raise ValueError("queries must be >= 1 and sweep_queries >= 0")
        # validates the index parameters (pydantic's ValidationError is a ValueError)
        self.index_settings("HNSW")
        self.index_settings("IVF_FLAT")

    def index_settings(self, index_type: str, **search: int) -> IndexSettings:
        """The service's `IndexSettings` for `index_type`, with search parameters overridden by `search`."""
        params = {"nlist": self.nlist, "nprobe": self.nprobe, "M": self.M,
                  "efConstruction": self.efConstruction, "ef": self.ef, **search}
        return IndexSettings(index_type=index_type, **params)


#: `make bench`'s short run (about 3 minutes on 2 idle cores).
QUICK = ScaleConfig(sizes=(10_000, 20_000), queries=100, sweep_queries=50, search_budget_s=10.0,
                    nprobe_sweep=(1, 4), ef_sweep=(10, 128))
