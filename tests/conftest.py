"""Shared test fixtures. Tests are offline and CPU-only; the ones that read ../shared/data skip
cleanly when it is absent (a user's fresh machine does not have it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEOLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $GEOLOC_SHARED_DATA); skips when absent."""
    if not (SHARED_DATA / "im2gps3k-dev" / "im2gps3k_places365.csv").is_file():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (set GEOLOC_SHARED_DATA)")
    return SHARED_DATA
