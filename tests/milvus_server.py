"""pytest plugin: one real Milvus standalone server (the `milvus` package) for the whole test session.

`pytest_plugins = ["milvus_server"]` (tests/conftest.py) provides the session fixture `milvus_server_uri`.
Starting and stopping servers is `tools.milvus_server`'s job; tests that need a server of their own call
`start_milvus_server(base_dir, bin_cache=BIN_CACHE)` from here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.milvus_server import milvus_server, prepare_bin_cache, start_milvus_server  # noqa: F401 - re-exported

ROOT = Path(__file__).resolve().parents[1]
#: Decompressed server binaries, kept between runs (same cache root as tests/conftest.py).
BIN_CACHE = Path(os.environ.get("VITRINE_CACHE_DIR", ROOT / ".cache")) / "milvus-bin-2.3.5"


@pytest.fixture(scope="session")
def milvus_server_uri() -> Iterator[str]:
    """URI ('http://127.0.0.1:<port>') of a Milvus standalone server shared by the test session."""
    base = Path(tempfile.mkdtemp(prefix="vitrine-milvus-"))
    with milvus_server(base, bin_cache=BIN_CACHE) as uri:
        yield uri
