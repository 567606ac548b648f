"""NVFP4 / FP8 weights on every GPU backend against the NumPy reference: dequantisation bit for bit, the fused
W4A16 / W8A16 matmuls (GEMV for a few rows, tiled GEMM otherwise) and ``linear`` with each weight format.

Runs for every gpu_harness.BACKEND_MODES run (``be`` fixture), like tests/test_backend_core.py. Shapes cross
the matmul row blocks (1 / 4 / 16 rows), the output columns a block, the 16-element NVFP4 block and the
32 x 16 inputs a warp reads per step, with non-multiples. Matmuls within ``kernel_quant_matmul``.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import (BACKEND_MODES, arrays, assert_bits_equal, backend_modes, dim, kernel_settings, pack,
                         pinned, random_nvfp4, run, seeds)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.ops import linear, quant

EMU_GPU = ("emu", "gpu")


# ---------------------------------------------------------------------------------------------------------
# Dequantisation: bit-exact

@pytest.mark.parametrize("backend, mode", backend_modes("emu", "gpu"))
def test_nvfp4_dequantize_bit_exact_over_all_codes(be, mode):
    """Every packed byte (two E2M1 codes) under every E4M3 scale code, NaN scales included, two tensors. Not
    on the simulator (a Python thread a byte: 40 s); there the device decode itself runs over every code
    (test_backend_numba_only.py::test_decode_every_code_bit_exact), and random bytes here below."""
    packed = np.tile(np.arange(256, dtype=np.uint8), (2, 256, 1))                 # [2, 256, 256]: in = 512
    block_scale = np.tile(np.arange(256, dtype=np.uint8)[:, None], (2, 1, 32))    # row r: scale code r
    global_scale = np.array([1.0, 0.0371], dtype=np.float32)
    got = run(be, be.nvfp4_dequantize, packed, block_scale, global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(packed, block_scale, global_scale), "nvfp4_dequantize")


def check_nvfp4_dequantize(be, seed, stack, rows, blocks):
    """Random bytes: every nibble pair and scale code may appear (NaN scales included), stacked [*stack]."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (*stack, rows, 8 * blocks), dtype=np.uint8)
    block_scale = rng.integers(0, 256, (*stack, rows, blocks), dtype=np.uint8)
    global_scale = rng.uniform(1e-4, 2.0, size=stack).astype(np.float32)
    got = run(be, be.nvfp4_dequantize, packed, block_scale, global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(packed, block_scale, global_scale),
                      f"nvfp4_dequantize {stack} {rows}x{16 * blocks}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, stack=st.lists(st.integers(1, 3), max_size=2))
def test_nvfp4_dequantize_bit_exact(be, mode, data, seed, stack):
    check_nvfp4_dequantize(be, seed, tuple(stack), data.draw(dim(mode, "dequant_rows")),
                           data.draw(dim(mode, "dequant_blocks")))


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "33x33-blocks-stacked", dict(seed=17, stack=(3,), rows=33, blocks=33)),
]))
def test_nvfp4_dequantize_pinned(be, mode, case):
    check_nvfp4_dequantize(be, **case)


# ---------------------------------------------------------------------------------------------------------
# Fused matmuls, and linear() sending a packed weight to them

def matmul_rows(mode):
    """Rows of x: 1 (GEMV) often, else across every row block."""
    return st.one_of(st.just(1), dim(mode, "matmul_rows"))


def check_matmul(be, fmt, seed, lead, m, out, inn):
    make = arrays(seed)
    w = pack(fmt, make(out, inn))
    x = make(*lead, m, inn) / np.float32(np.sqrt(inn))   # outputs O(1)
    if fmt == "nvfp4":
        got = run(be, be.nvfp4_matmul, x, w.packed, w.block_scale, w.global_scale)
        ref = quant.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    else:
        got = run(be, be.fp8_matmul, x, w.data, w.scale)
        ref = quant.fp8_matmul(x, w.data, w.scale)
    what = f"{fmt}_matmul x={(*lead, m, inn)} out={out}"
    assert_close(got, ref, "kernel_quant_matmul", what=what)
    assert_close(run(be, be.linear, x, w), ref, "kernel_quant_matmul", what=f"linear, {what}")


LEADS = st.sampled_from([(), (2,)])


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, lead=LEADS)
def test_nvfp4_matmul_matches_reference(be, mode, data, seed, lead):
    m, out = data.draw(matmul_rows(mode)), data.draw(dim(mode, "matmul_out"))
    check_matmul(be, "nvfp4", seed, lead, m, out, 16 * data.draw(dim(mode, "matmul_in_blocks")))


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, lead=LEADS)
def test_fp8_matmul_matches_reference(be, mode, data, seed, lead):
    """Any input width: the last 16-wide step is partial."""
    m, out = data.draw(matmul_rows(mode)), data.draw(dim(mode, "matmul_out"))
    check_matmul(be, "fp8", seed, lead, m, out, data.draw(dim(mode, "fp8_in")))


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "nvfp4-2-row-blocks-second-warp-step", dict(fmt="nvfp4", seed=18, lead=(), m=17, out=9, inn=528)),
    (("sim",) + EMU_GPU, "nvfp4-one-block-3d", dict(fmt="nvfp4", seed=19, lead=(2,), m=3, out=8, inn=16)),
    (EMU_GPU, "fp8-partial-step-second-warp-step", dict(fmt="fp8", seed=20, lead=(), m=5, out=17, inn=530)),
]))
def test_matmul_pinned(be, mode, case):
    check_matmul(be, **case)


LINEAR = {"sim": (8, 32, 2), "emu": (24, 48, 3), "gpu": (24, 48, 3)}   # (out, in, rows of x [2, rows, in])


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@pytest.mark.parametrize("fmt", ["dense", "nvfp4", "fp8"])
def test_linear_with_each_weight_format(be, mode, fmt):
    """linear(): packed weights on the fused matmuls, a dense one on the reference's matmul (on xp)."""
    (out, inn, rows), make = LINEAR[mode], arrays(21)
    w, x = pack(fmt, make(out, inn)), make(2, rows, inn)
    assert_close(run(be, be.linear, x, w), linear.linear(x, w), "kernel_quant_matmul", what=f"linear ({fmt})")


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("out,inn", [(5120, 2048), (2048, 5120), (8192, 8192)])
def test_nvfp4_matmul_ultra_shapes(be, mode, m, out, inn):
    """The fused W4A16 GEMV (m = 1) and small GEMM (m = 16) at Ultra's expert and model widths."""
    w, x = random_nvfp4(np.random.default_rng(out), out, inn), arrays(m + out)(m, inn)
    assert_close(run(be, be.linear, x, w), linear.linear(x, w), "kernel_quant_matmul",
                 what=f"nvfp4 linear {m}x{inn} -> {out}")
