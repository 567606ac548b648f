"""Helpers every op shares: the array namespace (NumPy or CuPy) and the dtype/shape checks at op boundaries.

Dtype policy (docs/oracle.md section 2): an op computes in the dtype of its float inputs, float32 (default) or
float64 (oracle mode). All float inputs of one call must share that dtype; a mix raises DtypeError instead
of letting NumPy promote to float64 behind the user's back.
"""

import numpy as np

from ..errors import DtypeError, ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def get_xp(*arrays):
    """The array module for these arrays: ``cupy`` if any is a CuPy array; the namespace an ndarray subclass
    declares with ``__array_namespace__`` (parallel/devices.py's virtual-device arrays: NumPy allocating on
    their device); else ``numpy``.

    Never imports CuPy unless a CuPy array is already in hand (so the reference needs NumPy alone).
    """
    for a in arrays:
        kind = type(a)
        if kind.__module__.startswith("cupy"):
            import cupy

            return cupy
        if kind is not np.ndarray and isinstance(a, np.ndarray) and \
                getattr(kind, "__array_namespace__", None) is not np.ndarray.__array_namespace__:
            return a.__array_namespace__()
    return np


def reference_ops():
    """The reference op namespace (ops/reference.py): the default ``ops=`` of the composite ops (linear, mlp,
    latent_moe), which a backend replaces with itself to put its kernels underneath."""
    from . import reference

    return reference


def check_float(name, *arrays):
    """Assert every array is float32 or float64 and all share one dtype; return that dtype."""
    dtype = None
    for i, a in enumerate(arrays):
        if a is None:
            continue
        dt = np.dtype(a.dtype)
        if dt not in FLOAT_DTYPES:
            raise DtypeError(f"{name}: argument {i} has dtype {dt}, expected float32 or float64")
        if dtype is None:
            dtype = dt
        elif dt != dtype:
            raise DtypeError(f"{name}: arguments mix {dtype} and {dt}; pass one dtype (float32, or float64 "
                             "for oracle mode) so nothing is promoted silently")
    return dtype


def check_shape(name, arg, array, shape):
    """Assert ``array.shape == shape`` where a None entry in ``shape`` matches anything."""
    got = tuple(array.shape)
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ShapeError(f"{name}: {arg} has shape {list(got)}, expected {want}")
