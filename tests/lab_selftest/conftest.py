"""Fixtures shared by the lab self-tests: each module names its own STATE_DIR (its own lab)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compose"))

from labkit import Lab


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with Lab(state_dir=request.module.STATE_DIR).running() as lab:
        yield lab


@pytest.fixture
def healed(lab: Lab) -> Iterator[Lab]:
    """Every test that breaks something leaves a whole lab behind."""
    yield lab
    lab.heal()
