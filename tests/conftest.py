"""Shared pytest setup: the Hypothesis ``ci`` profile and small fixtures.

The ``ci`` profile is derandomized (the same examples every run) with no deadline; it is the default.
Set HYPOTHESIS_PROFILE=dev for random exploration with more examples.
"""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

import gpu_harness  # noqa: E402,F401  (decides simulator vs GPU before any test module imports numba)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
