"""The contract around the kernels, for every op of every GPU backend (docs/oracle.md section 1): the backend
runs its kernel table on device arrays, float64 (oracle mode) runs the reference, wrong arguments raise the
package's errors before any device work, decode steps check the ``out_state`` buffer, empty inputs give empty
outputs (or keep the state), and read-only host arrays (a memory-mapped checkpoint) are never written.

Runs for every gpu_harness.BACKEND_MODES run (``be`` fixture). The values of the ops are tested in
tests/test_backend_{core,quant,mamba}.py.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import importlib
import inspect

import numpy as np
import pytest
from gpu_harness import BACKEND_MODES, arrays, cupy_hidden, run, runs_on_numpy_arrays, ssd_inputs
from tolerances import assert_close

from nemo_scratch.backends.numpy_backend import NumpyBackend
from nemo_scratch.errors import DtypeError, InputError, ShapeError
from nemo_scratch.ops import attention, conv, moe, norm, quant, ssd, ssd_fast

PACKAGES = {"numba": "nemo_scratch.backends.numba_cuda", "cupy": "nemo_scratch.backends.cupy"}
# The ops the value tests compare with the reference: each must be a kernel of both backends.
KERNEL_OPS = {"rms_norm", "gated_rms_norm", "causal_conv1d", "causal_conv1d_step", "ssd_scan", "ssd_scan_chunked",
              "ssd_step", "gqa_attention", "gqa_decode", "route", "moe_experts", "nvfp4_dequantize",
              "nvfp4_matmul", "fp8_matmul"}


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_backend_binds_its_kernel_table_and_keeps_arrays_on_the_device(be, backend, mode):
    """Without this, every comparison with the reference could pass against the reference itself."""
    kernels = importlib.import_module(PACKAGES[backend]).KERNELS
    assert KERNEL_OPS <= set(kernels), KERNEL_OPS - set(kernels)
    for op, (module, entry) in kernels.items():
        kernel = getattr(importlib.import_module(f"{PACKAGES[backend]}.{module}"), entry)
        assert inspect.unwrap(getattr(be, op)) is kernel, f"{backend}: be.{op} is not {module}.{entry}"
    reference_ops = [k for k, v in vars(NumpyBackend).items() if isinstance(v, staticmethod) and k not in kernels]
    for op in reference_ops:  # no kernel: the reference function itself (it runs on the backend's arrays)
        assert getattr(be, op) is getattr(NumpyBackend, op), op
    dev = be.asarray(np.ones((2, 3), dtype=np.float32))
    out = be.rms_norm(dev, be.asarray(np.ones(3, np.float32)), 1e-5)
    assert isinstance(dev, be.xp.ndarray) and isinstance(out, be.xp.ndarray)
    assert type(be.to_numpy(out)) is np.ndarray and be.to_numpy(out).shape == (2, 3)


def float64_cases():
    """(op name, reference, tolerance key of the float64 comparison, float64 arguments)."""
    make = arrays(3)
    f64 = lambda *shape: make(*shape).astype(np.float64)  # noqa: E731
    x, w, state, weight = f64(2, 5, 6), f64(6, 4), f64(2, 6, 4), f64(6)
    xs, dt, A, B, C = (a.astype(np.float64) for a in ssd_inputs(make, 2, 5, 4, 3, 2, 3))
    q, k, v = f64(1, 3, 4, 8), f64(1, 5, 2, 8), f64(1, 5, 2, 8)
    wq = quant.nvfp4_quantize(make(4, 16))
    xq = f64(2, 16)
    return [
        ("rms_norm", norm.rms_norm, "rms_norm", (x, weight, 1e-5)),
        ("gated_rms_norm", norm.gated_rms_norm, "gated_rms_norm", (x, f64(2, 5, 6), weight, 3, 1e-5)),
        ("causal_conv1d", conv.causal_conv1d, "conv1d", (x, w, None, state)),
        ("causal_conv1d_step", conv.causal_conv1d_step, "conv1d", (x[:, 0], state, w, f64(6))),
        # ssd_scan (the model's prefill scan) falls back to the numpy backend's ssd_scan, the fast twin
        ("ssd_scan", ssd_fast.ssd_scan_chunked_fast, "ssd", (xs, dt, A, B, C, 2, f64(4), f64(2, 4, 3, 3))),
        ("ssd_scan_chunked", ssd.ssd_scan_chunked, "ssd", (xs, dt, A, B, C, 2, f64(4), f64(2, 4, 3, 3))),
        ("ssd_step", ssd.ssd_step, "ssd_step", (xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], f64(4), f64(2, 4, 3, 3))),
        ("gqa_attention", attention.gqa_attention, "attention", (q, k, v)),
        ("gqa_decode", attention.gqa_decode, "attention", (q, k, v)),
        ("route", moe.route, "router", (f64(3, 8), f64(6, 8), None, 2)),
        ("moe_experts", moe.moe_experts, "moe", (f64(3, 4), np.array([[0, 2], [1, 0], [2, 1]]), f64(3, 2),
                                                 f64(3, 5, 4), f64(3, 4, 5))),
        ("linear", lambda x_, w_: quant.nvfp4_matmul(x_, w_.packed, w_.block_scale, w_.global_scale),
         "quant_matmul", (xq, wq)),
        ("nvfp4_matmul", quant.nvfp4_matmul, "quant_matmul", (xq, wq.packed, wq.block_scale, wq.global_scale)),
    ]


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_float64_runs_the_reference(be, mode):
    """Kernels compute in float32; float64 calls run the reference: bit for bit where the backend's arrays are
    NumPy arrays, within the float64 key on CuPy arrays (CuPy's exp/sum round differently from NumPy's)."""
    for name, ref, key, args in float64_cases():
        got, want = run(be, getattr(be, name), *args), ref(*args)
        for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.shape == r.shape and g.dtype == r.dtype, name
            assert g.dtype == np.float64 or g.dtype == np.int64, name
            if runs_on_numpy_arrays(be) or g.dtype == np.int64:
                assert np.array_equal(g, r), name
            else:
                assert_close(g, r, key, what=name)


def bad_calls():
    """(error, message fragment, op name, arguments): each breaks one rule of docs/oracle.md section 1."""
    make = arrays(5)
    x, weight = make(2, 3, 8), make(8)
    ssd_h3 = ssd_inputs(make, 1, 4, 3, 2, 2, 3)         # 3 heads over 2 groups
    xs, dt, A, B, C = ssd_inputs(make, 1, 4, 4, 2, 2, 3)
    step = (xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None)
    experts = (make(3, 5, 4), make(3, 4, 5))
    u8 = lambda *shape: np.zeros(shape, np.uint8)  # noqa: E731
    return {
        "attention-t>s": (ShapeError, "t <= s", "gqa_attention", (make(1, 4, 2, 8), make(1, 3, 2, 8),
                                                                 make(1, 3, 2, 8))),
        "attention-batch": (ShapeError, "k has shape", "gqa_attention", (make(2, 1, 2, 8), make(1, 3, 2, 8),
                                                                         make(1, 3, 2, 8))),
        "attention-dh": (ShapeError, "k has shape", "gqa_attention", (make(1, 2, 4, 8), make(1, 3, 2, 9),
                                                                      make(1, 3, 2, 9))),
        "attention-mix": (DtypeError, "mix", "gqa_attention", (make(1, 1, 2, 8), make(1, 3, 2, 8).astype(np.float64),
                                                               make(1, 3, 2, 8))),
        "decode-heads": (ShapeError, "divide", "gqa_decode", (make(1, 1, 3, 8), make(1, 3, 2, 8), make(1, 3, 2, 8))),
        "decode-t>s": (ShapeError, "t=4 positions", "gqa_decode", (make(1, 4, 4, 8), make(1, 3, 2, 8),
                                                                   make(1, 3, 2, 8))),
        "route-top_k": (InputError, "top_k", "route", (make(2, 8), make(6, 8), None, 7)),
        "route-n_group": (InputError, "n_group=3", "route", (make(2, 8), make(8, 8), None, 2, 3)),
        "route-top_k-of-groups": (InputError, "top_k=5", "route", (make(2, 8), make(8, 8), None, 5, 4, 2)),
        "experts-ids": (InputError, "expert ids", "moe_experts", (make(2, 4), np.array([[0, 3], [1, 2]]),
                                                                  make(2, 2), *experts)),
        "experts-twice": (InputError, "twice", "moe_experts", (make(2, 4), np.array([[0, 0], [1, 2]]), make(2, 2),
                                                               *experts)),
        "experts-idx-shape": (ShapeError, "idx", "moe_experts", (make(2, 4), np.array([[0, 1]]), make(1, 2),
                                                                 *experts)),
        "experts-idx-dtype": (DtypeError, "idx", "moe_experts", (make(3, 16), np.zeros((3, 2), np.float32),
                                                                 make(3, 2), make(4, 8, 16), make(4, 16, 8))),
        "experts-down": (ShapeError, "down", "moe_experts", (make(3, 16), np.zeros((3, 2), np.int64), make(3, 2),
                                                             make(4, 8, 16), make(4, 16, 9))),
        "dequantize-scale-dtype": (DtypeError, "block_scale", "nvfp4_dequantize",
                                   (u8(2, 8), np.zeros((2, 1), np.float32), np.float32(1.0))),
        "nvfp4-x": (ShapeError, "x has shape", "nvfp4_matmul", (make(3, 32), u8(2, 8), u8(2, 1), np.float32(1.0))),
        "nvfp4-in-16": (ShapeError, "multiple of 16", "nvfp4_matmul", (make(2, 24), u8(4, 12), u8(4, 1),
                                                                       np.ones((), np.float32))),
        "fp8-data-dtype": (DtypeError, "uint8", "fp8_matmul", (make(2, 8), make(4, 8), np.ones((), np.float32))),
        "fp8-x": (ShapeError, "x has shape", "fp8_matmul", (make(2, 7), u8(4, 8), np.ones((), np.float32))),
        "rms_norm-mix": (DtypeError, "rms_norm", "rms_norm", (x, weight.astype(np.float64), 1e-5)),
        "rms_norm-weight": (ShapeError, "weight", "rms_norm", (x, make(7), 1e-5)),
        "gated-n_groups": (ShapeError, "n_groups", "gated_rms_norm", (x, x, weight, 3, 1e-5)),
        "gated-z": (ShapeError, "z", "gated_rms_norm", (x, x[:, :2], weight, 2, 1e-5)),
        "conv-activation": (InputError, "activation", "causal_conv1d", (x, make(8, 4), None, None, "gelu")),
        "conv-state": (ShapeError, "state", "causal_conv1d", (x, make(8, 4), None, make(2, 8, 3))),
        "conv_step-state": (ShapeError, "state", "causal_conv1d_step", (x[:, 0], make(2, 8, 3), make(8, 4), None)),
        "conv_step-bias": (ShapeError, "bias", "causal_conv1d_step", (x[:, 0], make(2, 8, 4), make(8, 4), make(7))),
        "ssd-groups": (ShapeError, "groups", "ssd_scan", (*ssd_h3, 2)),
        "ssd-chunk": (InputError, "chunk", "ssd_scan", (xs, dt, A, B, C, 0)),
        "ssd_step-mix": (DtypeError, "ssd_step", "ssd_step", (*step, make(1, 4, 2, 3).astype(np.float64))),
        "ssd_step-state": (ShapeError, "state", "ssd_step", (*step, make(1, 4, 3, 3))),
    }


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@pytest.mark.parametrize("case", sorted(bad_calls()))
def test_bad_arguments_raise_package_errors_before_any_device_work(be, mode, case):
    """Host arrays, and ``import cupy`` made to fail: a launcher that reached device work before checking would
    fail with ModuleNotFoundError (cupy) or a kernel's own error, never with the package error asked for."""
    error, fragment, op, args = bad_calls()[case]
    with cupy_hidden(), pytest.raises(error, match=fragment):
        getattr(be, op)(*args)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_out_state_is_checked(be, mode):
    make = arrays(5)
    xs, dt, A, B, C = (be.asarray(a) for a in ssd_inputs(make, 1, 1, 4, 2, 2, 3))
    step, state = (xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None), be.asarray(make(1, 4, 2, 3))
    with pytest.raises(DtypeError, match="out_state"):
        be.ssd_step(*step, state, out_state=be.asarray(make(1, 4, 2, 3).astype(np.float64)))
    with pytest.raises(ShapeError, match="out_state"):
        be.ssd_step(*step, state, out_state=be.asarray(make(1, 4, 2, 4)))
    with pytest.raises(ShapeError, match="out_state"):
        be.causal_conv1d_step(be.asarray(make(2, 8)), be.asarray(make(2, 8, 4)), be.asarray(make(8, 4)), None,
                              out_state=be.asarray(make(2, 8, 8))[:, :, ::2])  # not contiguous


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_empty_inputs(be, mode):
    """No token: empty outputs of the right shape and dtype; the conv and SSM states come back unchanged."""
    make = arrays(2)
    out = run(be, be.moe_experts, make(0, 4), np.zeros((0, 2), np.int64), make(0, 2), make(3, 5, 4), make(3, 4, 5))
    assert out.shape == (0, 4) and out.dtype == np.float32
    idx, w = run(be, be.route, make(0, 8), make(6, 8), None, 2)
    assert idx.shape == (0, 2) and idx.dtype == np.int64 and w.shape == (0, 2) and w.dtype == np.float32
    y = run(be, be.linear, make(0, 32), quant.nvfp4_quantize(make(5, 32)))
    assert y.shape == (0, 5) and y.dtype == np.float32
    state = make(2, 5, 4)
    y, new_state = run(be, be.causal_conv1d, make(2, 0, 5), make(5, 4), make(5), state)
    assert y.shape == (2, 0, 5) and np.array_equal(new_state, state)
    x, dt, A, B, C = ssd_inputs(make, 2, 0, 2, 3, 1, 4)
    init = make(2, 2, 3, 4)
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, 4, initial_state=init)
    assert y.shape == (2, 0, 2, 3) and np.array_equal(final, init)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_read_only_host_arrays(be, mode):
    """Weights from a memory-mapped checkpoint are read-only host arrays: no backend may write into them."""
    make = arrays(11)
    x, dt, A, B, C = ssd_inputs(make, 1, 5, 2, 3, 1, 4)
    D, weight, bias = make(2), make(6, 4), make(6)
    for a in (A, D, weight, bias):
        a.flags.writeable = False
    y, _ = be.ssd_scan(x, dt, A, B, C, 2, D=D)
    assert_close(be.to_numpy(y), ssd.ssd_scan_chunked(x, dt, A, B, C, 2, D=D)[0], "kernel_ssd")
    xc = make(1, 5, 6)
    assert_close(be.to_numpy(be.causal_conv1d(xc, weight, bias)[0]), conv.causal_conv1d(xc, weight, bias)[0],
                 "kernel_conv1d")
