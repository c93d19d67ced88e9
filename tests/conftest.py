"""Shared test settings: one deterministic, fast hypothesis profile for the whole suite.

``derandomize=True`` makes every run draw the same examples, so a failure reproduces on the
next run and CI never flakes on a lucky draw; ``database=None`` keeps runs from writing a
``.hypothesis/`` folder. Set ``HYPOTHESIS_PROFILE=thorough`` to search much longer (still
reproducible) when changing the core.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

_COMMON = {
    "derandomize": True,
    "database": None,
    # Examples hold up to ~50k elements and call torch; wall time per example varies with
    # machine load, which must not fail a test.
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("kvmix", max_examples=100, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kvmix"))


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator, fresh for every test."""
    return np.random.default_rng(20240229)
