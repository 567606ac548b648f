"""Shared pytest setup: the Hypothesis ``ci`` profile and small fixtures (``rng``; ``be``, the backend of a
``(backend, mode)`` run of gpu_harness.BACKEND_MODES).

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


@pytest.fixture
def be(backend, mode):
    """The backend of one ``(backend, mode)`` run (the test parametrizes both; gpu_harness.BACKEND_MODES). For
    ``cupy-emu`` the CPU CUDA emulator is ``cupy`` for this test only (gpu_harness.backend_for)."""
    with gpu_harness.backend_for(backend, mode) as backend_object:
        yield backend_object
