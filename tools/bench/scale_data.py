"""The scale benchmark's data: seeded clustered vectors, their exact top-k, recall@k, synthetic row ids.

Data: seeded synthetic vectors from a Gaussian mixture (`MixtureSpec`): `clusters` centres in a
`latent_dim`-d space, points scattered around them, mapped into `dim` dimensions by a fixed random
orthonormal map, plus isotropic noise, then L2-normalised. Real image embeddings are clustered and have a low
intrinsic dimension (estimates for CLIP-like embeddings are a few tens); uniform random vectors in 512-d have
none of that structure (all pairwise cosines ~0), which makes every ANN index look far worse than on real
data. Queries are fresh draws from the same mixture (not stored vectors).

Plain numpy; nothing here talks to Milvus.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

#: Neighbours per query: every search of the benchmark asks for TOP_K hits and is scored by recall@TOP_K.
TOP_K = 10


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """The synthetic data distribution (see module doc).

    Attributes:
        clusters: number of mixture components (centres ~ N(0, I) in the latent space).
        latent_dim: intrinsic dimension of the data.
        spread: standard deviation of points around their centre, per latent dimension (centres have 1).
        noise: standard deviation of the isotropic noise added in the `dim`-d space, relative to the norm of
            the mapped latent point.
    """

    clusters: int = 1000
    latent_dim: int = 32
    spread: float = 0.5
    noise: float = 0.1


class Mixture:
    """Seeded Gaussian-mixture sampler of L2-normalised float32 vectors [n, dim]."""

    def __init__(self, dim: int, spec: MixtureSpec = MixtureSpec(), seed: int = 0) -> None:
        """Fix the centres and the latent -> `dim` map from `seed` (numpy PCG64)."""
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim, self.spec = dim, spec
        rng = np.random.default_rng([seed, 0])
        latent = min(spec.latent_dim, dim)
        self.centres = rng.standard_normal((spec.clusters, latent)).astype(np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))  # orthonormal columns
        self.basis = q.T.astype(np.float32)  # [latent, dim]

    def sample(self, n: int, stream: int, chunk: int = 100_000) -> np.ndarray:
        """`n` vectors, float32 [n, dim], unit L2 norm; `stream` selects an independent seeded draw."""
        rng = np.random.default_rng([stream, 1])
        out = np.empty((n, self.dim), dtype=np.float32)
        latent = self.basis.shape[0]
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            labels = rng.integers(0, self.spec.clusters, size=m)
            z = self.centres[labels] + self.spec.spread * rng.standard_normal((m, latent), dtype=np.float32)
            x = z @ self.basis
            scale = self.spec.noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(self.dim)
            x += scale * rng.standard_normal((m, self.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = TOP_K, chunk: int = 200_000) -> np.ndarray:
    """Exact top-k row indices by cosine similarity (dot products of unit vectors), best first.

    Args:
        vectors: float32 [N, dim], L2-normalised.
        queries: float32 [Q, dim], L2-normalised.
        k: neighbours per query (<= N).

    Returns:
        int64 [Q, k].
    """
    best_idx = np.empty((queries.shape[0], 0), dtype=np.int64)
    best_sim = np.empty((queries.shape[0], 0), dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        sims = queries @ vectors[start : start + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        best_idx = np.concatenate([best_idx, part + start], axis=1)
        best_sim = np.concatenate([best_sim, np.take_along_axis(sims, part, axis=1)], axis=1)
        keep = np.argsort(-best_sim, axis=1, kind="stable")[:, :k]
        best_idx = np.take_along_axis(best_idx, keep, axis=1)
        best_sim = np.take_along_axis(best_sim, keep, axis=1)
    return best_idx


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k, where k = truth.shape[1] (recall@k)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def row_id(i: int) -> str:
    """Content id of synthetic row `i`: sha256 hex of its index (the store requires 64 hex characters)."""
    return hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest()

