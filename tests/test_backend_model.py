"""End to end through the GPU backends: a random tiny checkpoint (BF16, and its "ultra"-quantized copy with
NVFP4 experts and FP8 Mamba/shared experts) loaded with the backend of every gpu_harness.BACKEND_MODES run
(numba on the simulator, cupy on the CPU emulator, either on a GPU) gives the NumPy backend's logits, for a
prefill and for a cached decode step."""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import BACKEND_MODES
from tolerances import assert_close

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset


@pytest.fixture(scope="module", params=["bf16", "nvfp4"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_random_checkpoint(root / "bf16", preset("tiny"), seed=11)
    if request.param == "bf16":
        return root / "bf16"
    quantize_checkpoint(root / "bf16", root / "q", "ultra")   # NVFP4 experts, FP8 Mamba/shared, BF16 rest
    return root / "q"


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_model_matches_numpy(checkpoint, be, backend, mode):
    ref = nemo_scratch.load(checkpoint)
    got = nemo_scratch.load(checkpoint, backend=backend)
    assert got.backend is be and be.name == backend
    ids = np.array([[3, 1, 4]])
    assert_close(got.forward(ids), ref.forward(ids), "kernel_model", np.float32, what=f"{backend}-{mode} prefill")
    # cached decode: the conv step, SSM state update and split-K attention decode kernels
    c_ref, c_got = ref.new_cache(1), got.new_cache(1)
    ref.forward(ids, c_ref)
    got.forward(ids, c_got)
    assert_close(got.forward([[2]], c_got), ref.forward([[2]], c_ref), "kernel_model", np.float32,
                 what=f"{backend}-{mode} decode step")
