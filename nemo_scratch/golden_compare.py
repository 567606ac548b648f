"""Comparing a result with the reference: shape and dtype first, then the tolerance budget, with a reason.

``compare(got, ref, key, dtype)`` is the one comparison of golden files, ``nemo_scratch.oracle.check`` and
any code that holds a kernel to the reference (re-exported by nemo_scratch/golden.py). It says why a result
fails (a wrong shape, a transposed one, a wrong dtype, non-finite values, bits, the tolerance) and where:
the first bad index in C order.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

EXACT = "exact"   # the tolerance key of bit-exact decodes: compare bit patterns, never "close"


def tolerance_table():
    """The project's one tolerance table (nemo_scratch/tolerances.py, also tests/tolerances.py)."""
    from .tolerances import TOLERANCES

    return TOLERANCES


def kernel_key(key):
    """The tolerance key a float32 GPU kernel of an op is held to: ``kernel_<key>`` ("exact" stays exact)."""
    return key if key == EXACT else f"kernel_{key}"


def rtol_atol(key, dtype):
    """(rtol, atol) of TOLERANCES[(key, dtype)]; (0, 0) for EXACT."""
    if key == EXACT:
        return 0.0, 0.0
    entry = tolerance_table().get((key, np.dtype(dtype).name))
    if entry is None:
        raise InputError(f"tolerance key {key!r} has no {np.dtype(dtype).name} entry in nemo_scratch/tolerances.py")
    return entry[:2]


def _fail(reason, first_bad=None, n_bad=None, **errors):
    return {"max_abs": float("inf"), "max_rel": float("inf"), "used": float("inf"), **errors,
            "first_bad": first_bad, "n_bad": n_bad, "reason": reason}


def _first(bad):  # bool [...] -> the first True index in C order (a tuple), or None
    flat = np.flatnonzero(bad)
    return tuple(int(i) for i in np.unravel_index(flat[0], bad.shape)) if flat.size else None


def check_layout(got, ref, key, dtype):
    """None when ``got`` has the shape and dtype ``compare`` holds it to, else the reason it has not.

    The shape is the reference's. The dtype is ``dtype`` for a float output held to a tolerance (the
    reference may be float64: a float32 result is compared with the float64 reference), and the reference's
    own dtype for integer outputs and exact decodes.
    """
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        hint = (" (the same sizes in another order: a transposed result?)"
                if sorted(got.shape) == sorted(ref.shape) else "")
        return f"shape {list(got.shape)}, expected {list(ref.shape)}{hint}"
    want = np.dtype(dtype) if ref.dtype.kind == "f" and key != EXACT else ref.dtype
    if got.dtype != want:
        return f"dtype {got.dtype}, expected {want}"
    if ref.dtype != want and ref.dtype != np.float64:
        return f"the reference is {ref.dtype}, less precise than the {want} it is to check"
    return None


def compare(got, ref, key, dtype, atol_scale=1.0):
    # [...], [...] -> {"max_abs", "max_rel", "used", "first_bad", "n_bad", "reason"}
    """Shape and dtype first (``check_layout``), then the max abs and rel error of ``got`` against ``ref`` and
    the share of the tolerance budget used.

    The check: |got - ref| <= atol * atol_scale + rtol * |ref| elementwise, (rtol, atol) = TOLERANCES[(key,
    dtype)]; ``used`` > 1 fails. Integer outputs and the EXACT key compare bit patterns (used is 0 or inf),
    except that a NaN must only sit where the reference has one (its sign and payload are free: GPUs write
    one canonical NaN). Non-finite values must sit where the reference has them. ``first_bad`` is the index
    (a tuple, C order) of the first element that fails, ``n_bad`` how many do, and ``reason`` None on a pass,
    else why it fails (a wrong shape or dtype, non-finite values, bits, or the tolerance).
    """
    rtol, atol = rtol_atol(key, dtype)
    got, ref = np.asarray(got), np.asarray(ref)
    if (layout := check_layout(got, ref, key, dtype)) is not None:
        return _fail(layout)
    g, r = got.astype(np.float64), ref.astype(np.float64)
    fin = np.isfinite(r)
    err = np.where(fin, np.abs(g - np.where(fin, r, 0)), 0.0)
    rel = err / np.maximum(np.abs(np.where(fin, r, 0)), 1e-30)
    errors = {"max_abs": float(np.nan_to_num(err, nan=np.inf).max(initial=0.0)),
              "max_rel": float(np.nan_to_num(rel, nan=np.inf).max(initial=0.0))}
    if key == EXACT or ref.dtype.kind != "f":
        if ref.dtype.kind == "f":
            bits = f"u{ref.dtype.itemsize}"
            nan = np.isnan(ref)
            bad = (np.isnan(got) != nan) | (~nan & (got.view(bits) != ref.view(bits)))
        else:
            bad = got != ref
        if bad.any():
            return _fail(f"{int(bad.sum())} of {bad.size} elements differ from the reference (compared exactly)",
                         _first(bad), int(bad.sum()), **errors)
        return {**errors, "used": 0.0, "first_bad": None, "n_bad": 0, "reason": None}
    bad = (np.isfinite(g) != fin) | (~fin & ~((g == r) | (np.isnan(g) & np.isnan(r))))
    if bad.any():
        return _fail(f"{int(bad.sum())} of {bad.size} elements are non-finite where the reference is not, or the "
                     "other way round", _first(bad), int(bad.sum()), **errors)
    # used = max |got - ref| / (atol * atol_scale + rtol * |ref|)
    ratio = np.where(fin, err / (atol * atol_scale + rtol * np.abs(np.where(fin, r, 0))), 0.0)
    used = float(ratio.max(initial=0.0))
    if used > 1:
        bad = ratio > 1
        return {**errors, "used": used, "first_bad": _first(bad), "n_bad": int(bad.sum()),
                "reason": f"{int(bad.sum())} of {bad.size} elements out of tolerance"}
    return {**errors, "used": used, "first_bad": None, "n_bad": 0, "reason": None}
