"""``check(op, fn)``: hold your own implementation of a golden op to the reference over Hypothesis cases.

Each case (strategies.cases) draws dims that cross the op's chunk, block, warp and tile sizes and one of the
op's input cases (nemo_scratch/golden_cases.py: random, ties, zeros, huge, dt at the floor, every NVFP4
code and block-scale boundary, ...). ``fn`` gets the case's inputs as the reference does
(``fn(**inputs, **static)``) and returns the op's outputs. Each output is checked for shape, then dtype, then
values (nemo_scratch/golden.py::compare). On the first failure Hypothesis shrinks the case to the smallest
one that still fails and ``check`` raises OracleFailure naming it; on success it returns an OracleReport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from ..errors import InputError, OracleFailure, ShapeError
from ..golden import OPS, cast_inputs
from ..golden_compare import EXACT, compare, kernel_key, rtol_atol
from ..golden_cases import CASES, case_names, make_case
from .locate import axes, causes, index_text, where
from .strategies import QUERY_TILES, ROW_TILE, cases as case_strategy

DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class OracleReport:
    """What a passing ``check`` ran: ``cases`` cases (``by_case``: how many of each input case) and the largest
    share of the tolerance budget any output used (``worst_used``; 0.0 when every output is exact), with the
    output and case where it did (``worst``)."""

    op: str
    dtype: str
    tolerance_key: str
    cases: int
    by_case: dict = field(hash=False)
    worst_used: float
    worst: str

    def __str__(self):
        counts = ", ".join(f"{name} {n}" for name, n in self.by_case.items())
        return (f"{self.op} ({self.dtype}): {self.cases} cases pass ({counts}); worst {100 * self.worst_used:.1f}% "
                f"of the {self.tolerance_key!r} budget ({self.worst})")


def to_numpy(value, like=None):
    """A result as a NumPy array, without importing torch, JAX or CuPy: DLPack (np.from_dlpack), then CuPy's
    ``.get()``, torch's ``.detach().cpu().numpy()``, ``__array__``. Plain lists, tuples and Python numbers
    carry no dtype: they take ``like``'s when they hold the same kind of number."""
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    if isinstance(value, (list, tuple, int, float, bool)):
        arr = np.asarray(value)
        same_kind = like is not None and (arr.dtype.kind == like.dtype.kind == "f" or
                                          (arr.dtype.kind in "iu" and like.dtype.kind in "iu"))
        return arr.astype(like.dtype) if same_kind else arr
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass   # a device array, a tensor that requires grad, or a dtype NumPy lacks: the copies below
    kind = type(value).__module__.split(".")[0]
    try:
        if kind == "cupy" and callable(getattr(value, "get", None)):
            return np.asarray(value.get())
        if all(callable(getattr(value, a, None)) for a in ("detach", "cpu", "numpy")):
            return value.detach().cpu().numpy()
        if hasattr(value, "__array__"):
            return np.asarray(value)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise _Unreadable(f"a {kind}.{type(value).__name__} of dtype {getattr(value, 'dtype', '?')} that NumPy "
                          f"cannot hold ({exc})") from None
    raise _Unreadable(f"a {type(value).__module__}.{type(value).__name__}, which is not an array (no __array__ "
                      "and no __dlpack__)")


class _Unreadable(Exception):
    pass


class _Mismatch(Exception):
    """An output that failed compare, raised inside @given: the full report (which re-runs the reference with
    known mistakes) is written once, for the shrunk case, not at every shrinking step."""

    def __init__(self, *details):
        super().__init__(details[0])
        self.details = details


def case_inputs(case, dtype=np.float32):
    """The inputs of a drawn Case -> (inputs, static, atol_scale): the golden maker and the case's changes from
    ``case.seed`` (what ``case.golden_command()`` writes to a file), float inputs cast to ``dtype``."""
    rng = np.random.default_rng(case.seed)
    inputs, static = OPS[case.op][1](rng, case.dims)
    inputs, static, atol_scale = make_case(case.op, case.case, rng, case.dims, inputs, static)
    return cast_inputs(inputs, dtype), static, atol_scale


def _outputs(result, names):  # the function's return value -> one object per output name
    if len(names) == 1:
        return [result[0] if isinstance(result, tuple) and len(result) == 1 else result]
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        got = f"{len(result)} values" if isinstance(result, (tuple, list)) else f"one {type(result).__name__}"
        raise _Unreadable(f"returned {got}, expected a tuple of {len(names)}: ({', '.join(names)})")
    return list(result)


def _validate(op, fn, dtype, examples, names, dims, convert, tile):
    if op not in OPS:
        raise InputError(f"oracle.check: op {op!r} has no reference here; expected one of {sorted(OPS)}")
    if not callable(fn):
        raise InputError(f"oracle.check: fn is a {type(fn).__name__}, expected the function to test")
    if np.dtype(dtype).name not in DTYPES:
        raise InputError(f"oracle.check: dtype={dtype!r}, expected float32 or float64")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise InputError(f"oracle.check: examples={examples!r}, expected a positive integer")
    bad = [c for c in names or () if c not in case_names(op)]
    if bad or (names is not None and not names):
        raise InputError(f"oracle.check: cases={names!r}; {op} has the cases {list(case_names(op))}")
    for name, value in (dims or {}).items():
        if name not in OPS[op][0]:
            raise InputError(f"oracle.check: dims names {name!r}; {op}'s dimensions are {sorted(OPS[op][0])}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise InputError(f"oracle.check: dims {name}={value!r}, expected an integer in [1, 4096]")
    if convert is not None and not callable(convert):
        raise InputError(f"oracle.check: convert is a {type(convert).__name__}, expected a function of one array")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise InputError(f"oracle.check: tile={tile!r}, expected a positive integer")


def check(op, fn, *, dtype="float32", examples=25, cases=None, dims=None, convert=None, seed=None, tile=None):
    """Test ``fn``, your implementation of the golden op ``op`` (nemo_scratch/golden.py::OPS), against the
    reference on ``examples`` Hypothesis cases -> OracleReport; raises OracleFailure on the smallest failing
    case Hypothesis finds.

    fn       called as ``fn(**inputs, **static)`` with the reference's argument names (NumPy arrays, or
             ``convert(array)`` of each: ``convert=torch.from_numpy``); it returns the op's outputs (a tuple
             when there are several), as NumPy, CuPy, torch or JAX arrays, or anything with ``__array__``
    dtype    "float32": float inputs in float32, held to the float32 reference with the ``kernel_<key>``
             tolerance; "float64": held to the float64 reference with ``<key>``. Decodes are exact and the
             router's selection is exact in both.
    examples how many cases Hypothesis draws (default 25)
    cases    the input cases to draw from (default: all of the op's, golden_cases.case_names(op))
    dims     dimensions to pin, e.g. {"dh": 64}; the others are drawn
    seed     None: the same cases every run (derandomized); an int: that Hypothesis seed
    tile     the tile the failure report locates an index in: attention query tile (default 64),
             NVFP4 matmul output rows per tile (default 128)
    """
    _validate(op, fn, dtype, examples, cases, dims, convert, tile)
    dtype = DTYPES[np.dtype(dtype).name]
    key = OPS[op][4]
    key = kernel_key(key) if dtype == np.float32 else key
    tile = tile or (ROW_TILE if op == "nvfp4_matmul" else QUERY_TILES[-1])
    fn_name = getattr(fn, "__qualname__", None) or repr(fn)
    seen = {"cases": 0, "by_case": {}, "worst": (0.0, "no output had a budget")}

    # no "explain" phase: it traces every line of the reference and the function under test
    @settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
    @given(case=case_strategy(op, dims, cases))
    def run(case):
        try:
            inputs, static, atol_scale = case_inputs(case, dtype)
            refs = OPS[op][2](**inputs, **static)
        except (InputError, ShapeError):
            if dims:       # pinned dims the drawn ones do not fit: draw again
                reject()
            raise
        refs = refs if isinstance(refs, tuple) else (refs,)
        _run_one(op, fn, fn_name, case, inputs, static, refs, atol_scale, dtype, key, convert, tile, seen)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except _Mismatch as failed:
        raise OracleFailure(_failure(*failed.details)) from None
    except Unsatisfiable:
        raise InputError(f"oracle.check: dims={dims} never fit {op} with the sizes it draws") from None
    by_case = {name: seen["by_case"][name] for name in case_names(op) if name in seen["by_case"]}
    return OracleReport(op, np.dtype(dtype).name, key, seen["cases"], by_case, *seen["worst"])


def _run_one(op, fn, fn_name, case, inputs, static, refs, atol_scale, dtype, key, convert, tile, seen):
    what = CASES[op][case.case][0] if case.case in CASES[op] else "the op's random inputs"
    head = f"oracle.check({op!r}, {fn_name}) failed on {case} ({np.dtype(dtype).name}: {what})"
    again = f"\n  reproduce: {case.golden_command()}"
    given_inputs = {k: v.copy() for k, v in inputs.items()}
    args = {k: (convert(v) if convert is not None else v) for k, v in given_inputs.items()}
    try:
        result = fn(**args, **static)
    except Exception as exc:  # noqa: BLE001  the function under test failed: report it with the case
        raise OracleFailure(f"{head}:\n  {fn_name} raised {type(exc).__name__}: {exc}{again}") from exc
    changed = [k for k in inputs if given_inputs[k].tobytes() != inputs[k].tobytes()]
    if changed:
        raise OracleFailure(f"{head}:\n  {fn_name} modified its input(s) {changed}; ops never write their "
                            f"inputs{again}")
    names = OPS[op][3]
    try:
        outputs = _outputs(result, names)
    except _Unreadable as exc:
        raise OracleFailure(f"{head}:\n  {fn_name} {exc}{again}") from None
    worst = seen["worst"]
    for name, value, ref in zip(names, outputs, refs):
        try:
            got = to_numpy(value, like=ref)
        except _Unreadable as exc:
            raise OracleFailure(f"{head}:\n  output {name!r} is {exc}; expected {ref.dtype} "
                                f"[{', '.join(axes(op, name))}]{again}") from None
        e = compare(got, ref, key, dtype, atol_scale)
        if e["reason"] is not None:
            raise _Mismatch(head, op, name, got, ref, e, case, inputs, static, key, dtype, atol_scale, tile)
        if key != EXACT and ref.dtype.kind == "f" and e["used"] >= worst[0]:
            worst = (e["used"], f"{name!r} on {case}")
    seen["worst"] = worst
    seen["cases"] += 1
    seen["by_case"][case.case] = seen["by_case"].get(case.case, 0) + 1


def _failure(head, op, name, got, ref, e, case, inputs, static, key, dtype, atol_scale, tile):
    lines = [f"{head}:", f"  output {name!r}: {e['reason']}"]
    if got.shape != ref.shape:
        lines[-1] += f"; the axes are [{', '.join(axes(op, name))}]"
    index = e["first_bad"]
    if index is not None:
        # str of a NumPy scalar: the shortest text that reads back to the same float32 / float64
        lines.append(f"  first bad element: {index_text(op, name, index)}: expected {ref[index]!s}, "
                     f"got {got[index]!s}")
        lines.append(f"  where: {where(op, name, index, case.dims, inputs, tile)}")
    for cause in causes(op, name, got, ref, index, case.dims, inputs, static, key, dtype, atol_scale):
        lines.append(f"  cause: {cause}")
    if key == EXACT or ref.dtype.kind != "f":
        lines.append("  budget: none, this output is compared exactly")
    elif np.isfinite(e["used"]):
        rtol, atol = rtol_atol(key, dtype)
        lines.append(f"  budget: max abs err {e['max_abs']:.3e}, max rel err {e['max_rel']:.3e}: "
                     f"{100 * e['used']:.1f}% of the {key!r} budget atol + rtol*|ref| (rtol={rtol:g}, "
                     f"atol={atol:g}{f' x {atol_scale:g}' if atol_scale != 1 else ''})")
    lines.append(f"  reproduce: {case.golden_command()}")
    return "\n".join(lines)
