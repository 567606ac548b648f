"""End to end through the GPU backends: a random tiny checkpoint (BF16 and NVFP4/FP8) loaded with
``backend="numba"`` (simulator here, a GPU where there is one) or ``backend="cupy"`` (GPU only) gives the
NumPy backend's logits, for a prefill and for cached decode steps."""

import numpy as np
import pytest

import gpu_harness
import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset
from tolerances import assert_close

BACKENDS = [
    pytest.param("numba", marks=[pytest.mark.sim, gpu_harness.requires_sim], id="numba-sim"),
    pytest.param("numba", marks=[pytest.mark.gpu, gpu_harness.requires_gpu], id="numba-gpu"),
    pytest.param("cupy", marks=[pytest.mark.gpu, gpu_harness.requires_cupy], id="cupy-gpu"),
]


@pytest.fixture(scope="module", params=["bf16", "nvfp4"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_random_checkpoint(root / "bf16", preset("tiny"), seed=11)
    if request.param == "bf16":
        return root / "bf16"
    quantize_checkpoint(root / "bf16", root / "q", "ultra")   # NVFP4 experts, FP8 Mamba/shared, BF16 rest
    return root / "q"


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_numpy(checkpoint, backend):
    ref = nemo_scratch.load(checkpoint)
    got = nemo_scratch.load(checkpoint, backend=backend)
    assert got.backend.name == backend
    ids = np.array([[3, 1, 4]])
    assert_close(got.forward(ids), ref.forward(ids), "kernel_model", np.float32, what=f"{backend} prefill")
    # cached decode: the conv step, SSM state update and split-K attention decode kernels
    c_ref, c_got = ref.new_cache(1), got.new_cache(1)
    ref.forward(ids, c_ref)
    got.forward(ids, c_got)
    assert_close(got.forward([[2]], c_got), ref.forward([[2]], c_ref), "kernel_model", np.float32,
                 what=f"{backend} decode step")
