"""What only the cupy backend has: the split-K plan of its decode, the limits of its CUDA C kernels (head dim,
SSD chunk length) and its own argument rules, the error without a GPU, and the shape table's boundaries
checked against its launch sizes.

Launchers: nemo_scratch/backends/cupy/{attention,moe,quant,ssd,loader}.py over kernels_cuda/*.cu. The tests
that need the backend run for the cupy runs of gpu_harness.BACKEND_MODES (``cupy-emu`` on the CPU CUDA
emulator, ``cupy-gpu`` on a device); the others need neither. The behaviour cupy shares with numba is tested
in tests/test_backend_{core,quant,mamba,contract}.py.
"""

import gpu_harness  # noqa: F401  (first: turns the numba simulator on before anything imports numba)
import pytest
from gpu_harness import arrays, backend_modes, boundaries, cupy_available, cupy_hidden, ssd_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_scratch.backends import get_backend
from nemo_scratch.backends.cupy import attention as attention_cupy
from nemo_scratch.backends.cupy import loader
from nemo_scratch.backends.cupy import moe as moe_cupy
from nemo_scratch.backends.cupy import quant as quant_cupy
from nemo_scratch.backends.cupy import ssd as ssd_cupy
from nemo_scratch.errors import BackendError, InputError, ShapeError


@settings(max_examples=200)
@given(s=st.integers(1, 300_000), blocks=st.integers(1, 5000), n_sm=st.sampled_from([1, 78, 114, 132, 144]))
def test_decode_splits_cover_the_keys_in_whole_tiles(s, blocks, n_sm):
    n_split, keys = attention_cupy.decode_splits(s, blocks, n_sm)
    assert keys % attention_cupy.ATT_TILE == 0 and keys >= attention_cupy.ATT_TILE
    assert (n_split - 1) * keys < s <= n_split * keys  # every key in exactly one split, none empty


def test_cupy_backend_without_a_gpu_says_what_is_missing():
    """Where cupy or a GPU is missing, get_backend("cupy") raises BackendError naming what is missing."""
    if cupy_available():
        assert get_backend("cupy").name == "cupy"
        return
    with pytest.raises(BackendError, match="cupy backend"):
        get_backend("cupy")


@pytest.mark.parametrize("backend, mode", backend_modes("cupy"))
def test_kernel_limits_raise_package_errors_before_any_device_work(be, mode):
    """Limits of the CUDA C kernels, and the state a decode step needs, checked before ``import cupy``."""
    make = arrays(5)
    with cupy_hidden():
        with pytest.raises(ShapeError, match="dh=300"):   # a lane holds 8 of at most 256 head dims
            be.gqa_attention(make(1, 1, 2, 300), make(1, 1, 1, 300), make(1, 1, 1, 300))
        x, dt, A, B, C = ssd_inputs(make, 1, 5000, 4, 2, 2, 3)
        with pytest.raises(InputError, match="chunk=5000"):  # 3 * chunk floats of shared memory
            be.ssd_scan(x, dt, A, B, C, 5000)
        with pytest.raises(InputError, match="state"):
            be.ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, None)


@pytest.mark.parametrize("mode", ["emu", "gpu"])
def test_shape_table_crosses_the_cupy_launch_sizes(mode):
    """gpu_harness.DIMS names the cupy kernels' tile sizes as boundaries of its emu and gpu columns, so the
    shared tests cross them: a change of a tile size must come with a change of the table."""
    expected = [("channels", loader.THREADS), ("width", loader.THREADS), ("step_state", 32),
                ("keys", attention_cupy.ATT_TILE), ("decode_keys", attention_cupy.ATT_TILE),
                ("queries", attention_cupy.ATT_ROWS), ("tokens", moe_cupy.ROUTER_TOKENS),
                ("moe_tokens", moe_cupy.MOE_ROWS), ("matmul_out", quant_cupy.MM_WARPS), ("matmul_rows", 4),
                ("matmul_rows", 16), ("chunk", ssd_cupy.MAX_L_TILE)]
    missing = [(name, size) for name, size in expected if size not in boundaries(mode, name)]
    assert not missing, f"gpu_harness.DIMS ({mode}) does not cross these cupy launch sizes: {missing}"
    assert attention_cupy.ATT_MAX_DH in boundaries("gpu", "attn_head_dim")
