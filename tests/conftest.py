"""Session fixtures: real models, real servers, started once and cleaned up.

Expensive artefacts (the trained demo checkpoint) are cached under `.cache/` (or $VITRINE_CACHE_DIR),
so a second test run skips training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests/milvus_server.py: the real Milvus standalone server (`milvus` package), one per session
pytest_plugins = ["milvus_server", "redis_server"]  # tests/redis_server.py: real redis-server processes

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("VITRINE_CACHE_DIR", ROOT / ".cache"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


@pytest.fixture(scope="session")
def demo(cache_dir):
    """The trained demo model exported to a model repository, and the held-out digits written as PNG files.

    Training (~2-3 min on 2 cores) happens once; the checkpoint and the export are reused from `cache_dir`.
    """
    from tools.demo import prepare_demo

    return prepare_demo(cache_dir, cache_dir / "test" / "model_repository", cache_dir / "test" / "dataset")


@pytest.fixture(scope="session")
def encoder_server(demo):
    """A real Triton (PyTriton) encoder server over the demo repository on free loopback ports."""
    from encoder_server.server import EncoderServer
    from tools.processes import free_port

    server = EncoderServer(demo.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    yield server
    server.stop()
