"""The comparison formats of notebook 05 (nemo_scratch/formats.py): shapes, exact cases and error bounds."""

import numpy as np
import pytest

from nemo_scratch import formats
from nemo_scratch.ops.quant import E2M1_VALUES, nvfp4_dequantize, nvfp4_quantize

RNG = np.random.default_rng(0)
W = (RNG.normal(size=(3, 8, 64)) * RNG.lognormal(size=(3, 8, 1))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_round_trip_shape_dtype_and_error(name):
    fn, bits, _ = formats.FORMATS[name]
    out = fn(W)
    assert out.shape == W.shape and out.dtype == np.float32
    rel = np.linalg.norm(out - W) / np.linalg.norm(W)
    assert 0 < rel < (0.04 if name == "fp8" else 0.2), rel
    assert bits == {"nvfp4": 4.5, "int4": 4.5, "mxfp4": 4.25, "fp8": 8.0}[name]


def test_nvfp4_round_trip_is_the_package_format():
    q = nvfp4_quantize(W)
    np.testing.assert_array_equal(formats.nvfp4_roundtrip(W), nvfp4_dequantize(q.packed, q.block_scale,
                                                                                q.global_scale))


def test_int4_is_exact_on_its_own_grid():
    # a block whose values are integers -7..7 times one power of two (an exact E4M3 value) survives exactly
    row = np.tile(np.arange(-7, 9, dtype=np.float32).clip(-7, 7), 4)[None, None] * np.float32(2.0 ** -3)
    np.testing.assert_array_equal(formats.int4_roundtrip(row), row)
    # error at most half a step s*g per weight
    out = formats.int4_roundtrip(W)
    step = np.abs(W.reshape(3, 8, 4, 16)).max(-1, keepdims=True) / 7
    assert np.all(np.abs(out - W).reshape(3, 8, 4, 16) <= 0.5 * step * 1.07 + 1e-7)


def test_mxfp4_scales_are_powers_of_two_and_e2m1_values_survive():
    block = np.repeat(E2M1_VALUES[None, :8], 4, axis=0).reshape(1, 32) * np.float32(0.25)
    np.testing.assert_array_equal(formats.mxfp4_roundtrip(block), block)
    # halving the input halves the output exactly (a power-of-two scale commutes with E2M1 rounding)
    np.testing.assert_array_equal(formats.mxfp4_roundtrip(W / 2), formats.mxfp4_roundtrip(W) / 2)


def test_all_zero_tensor_stays_zero():
    z = np.zeros((2, 32), np.float32)
    for name, (fn, _, _) in formats.FORMATS.items():
        assert np.all(fn(z) == 0), name
