"""Shared fixtures: the repository root and the team's real images (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path | None:
    """`$XMODAL_SHARED_DATA`, else `../shared/data` beside the checkout, else /work/shared/data."""
    candidates = [os.environ.get("XMODAL_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "hit_uav" / "images").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        pytest.skip("real images not found: set XMODAL_SHARED_DATA to the shared/data folder")
    return path
