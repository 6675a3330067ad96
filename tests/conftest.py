"""Session fixtures: real models, real servers, started once and cleaned up.

Expensive artefacts (the trained demo checkpoint) are cached under `.cache/` (or $VITRINE_CACHE_DIR),
so a second test run skips training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("VITRINE_CACHE_DIR", ROOT / ".cache"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR
