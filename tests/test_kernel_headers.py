"""Every pointer in a kernel or launcher header resolves: kernels_cuda/*.cu (the leading ``//`` comment) and
nemo_scratch/backends/{numba_cuda,cupy}/*.py (the module docstring).

A header (the project conventions, "Kernels") names what a kernel must agree with and where that is checked:

    Reference:  nemo_scratch.ops.moe.route, moe_experts          dotted symbols; a bare name continues the
                                                                 module of the symbol before it
    Test:       tests/test_backend_core.py::test_route_*, ::test_moe_experts_matches_reference
                tests/test_backend_quant.py (test_nvfp4_*, test_fp8_matmul_*)
    Tolerance:  tests/tolerances.py ("kernel_router", float32); dequantisation bit-exact

A field continues on the next lines indented deeper than its own line. ``Reference:`` symbols must import,
``Test:`` files must exist and define the named test functions (``*`` ends a prefix that must match at least
one), ``Tolerance:`` tuples must be keys of nemo_scratch/tolerances.py TOLERANCES, and a field without a tuple
must say "exact". Prose in parentheses (without a quoted key) is skipped. ``header_problems`` is a function
of the header text, so the tests below also show it failing on mutated headers.
"""

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

from nemo_scratch.tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parent.parent
HEADER_FILES = sorted([*ROOT.glob("kernels_cuda/*.cu"), *ROOT.glob("nemo_scratch/backends/numba_cuda/*.py"),
                       *ROOT.glob("nemo_scratch/backends/cupy/*.py")])
FIELD = re.compile(r"^(\s*)(Reference|Test|Tolerance):\s*(.*)$")


def header_lines(text, suffix):
    """[(line number, line)] of the header: the leading ``//`` comment of a .cu file (the ``//`` removed), the
    module docstring of a .py file."""
    lines = text.splitlines()
    if suffix == ".cu":
        head = []
        for line in lines:
            if not line.startswith("//"):
                break
            head.append(line[2:])
        return list(enumerate(head, 1))
    doc = ast.get_docstring(ast.parse(text), clean=False)
    if doc is None:
        return []
    first = next(i for i, line in enumerate(lines, 1) if '"""' in line or "'''" in line)
    return list(enumerate(doc.splitlines(), first))


def header_fields(text, suffix):
    """[(field, line number, value)]: each Reference/Test/Tolerance field with its continuation lines joined."""
    fields, current = [], None
    for number, line in header_lines(text, suffix):
        match = FIELD.match(line)
        if match:
            current = [match.group(2), number, match.group(3).strip(), len(match.group(1))]
            fields.append(current)
        elif current is not None and line.strip() and len(line) - len(line.lstrip()) > current[3]:
            current[2] += " " + line.strip()
        else:
            current = None
    return [(field, number, value) for field, number, value, _ in fields]


@functools.cache
def resolves(symbol):
    """True when ``symbol`` (a.b.c.name) is an importable module or an attribute path inside one."""
    parts = symbol.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


@functools.cache
def functions_in(path):
    """Names of the top-level functions of a test file (None when the file does not exist)."""
    file = ROOT / path
    if not file.is_file():
        return None
    return {n.name for n in ast.parse(file.read_text()).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def reference_problems(value):
    problems, module, named = [], None, 0
    for item in re.split(r"[,;]", re.sub(r"\([^()]*\)", " ", value)):
        match = re.match(r"\s*([A-Za-z_][\w.]*)", item)
        if not match:
            continue
        name, named = match.group(1), named + 1
        if "." in name:
            module = name.rsplit(".", 1)[0]
        elif module is None:
            problems.append(f"{name!r} has no module (write the dotted path)")
            continue
        else:
            name = f"{module}.{name}"
        if not resolves(name):
            problems.append(f"{name} does not resolve")
    if not named:
        problems.append("names no symbol")
    return problems


def named_test_problems(value):
    problems, path = [], None
    for match in re.finditer(r"(tests/[\w/.]+\.py)|::([\w*]+)|\b(test_[\w*]*)", value):
        if match.group(1):
            path = match.group(1)
            if functions_in(path) is None:
                problems.append(f"{path} does not exist")
            continue
        name = match.group(2) or match.group(3)
        if path is None:
            problems.append(f"{name} names no test file")
            continue
        defined = functions_in(path) or set()
        found = any(d.startswith(name[:-1]) for d in defined) if name.endswith("*") else name in defined
        if not found and functions_in(path) is not None:
            problems.append(f"{path} defines no {'test starting with ' + name[:-1] if name.endswith('*') else name}")
    if path is None:
        problems.append("names no tests/<file>.py")
    return problems


def tolerance_problems(value):
    problems, keys = [], 0
    for group in re.findall(r"\(([^()]*)\)", value):
        quoted = re.findall(r'"(\w+)"', group)
        names = [q for q in quoted if q not in ("float32", "float64")]
        if not names:
            continue  # prose
        dtypes = re.findall(r"\bfloat(?:32|64)\b", group)
        if len(dtypes) != 1:
            problems.append(f"({group}): expected one dtype, float32 or float64")
            continue
        for name in names:
            keys += 1
            if (name, dtypes[0]) not in TOLERANCES:
                problems.append(f'("{name}", {dtypes[0]}) is not a key of nemo_scratch/tolerances.py TOLERANCES')
    if keys == 0 and "exact" not in value:
        problems.append("names no tolerance key and does not say exact")
    return problems


CHECKS = {"Reference": reference_problems, "Test": named_test_problems, "Tolerance": tolerance_problems}


def header_problems(text, suffix):
    """['line N: Field: problem'] for every pointer of the header that does not resolve; [] when all do."""
    return [f"line {number}: {field}: {problem}" for field, number, value in header_fields(text, suffix)
            for problem in CHECKS[field](value)]


# ---------------------------------------------------------------------------------------------------------

KERNEL_MODULES = ("attention", "conv", "moe", "norm", "quant", "ssd")   # helpers (runtime, loader) have none


def needs_header(path):
    return path.suffix == ".cu" or path.stem in KERNEL_MODULES


@pytest.mark.parametrize("path", HEADER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_header_pointers_resolve(path):
    text, where = path.read_text(), path.relative_to(ROOT)
    fields = {field for field, _, _ in header_fields(text, path.suffix)}
    if needs_header(path):
        assert fields == set(CHECKS), f"{where}: the header lacks {sorted(set(CHECKS) - fields)}"
    problems = header_problems(text, path.suffix)
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


KERNEL_FILES = [p for p in HEADER_FILES if needs_header(p) and (p.suffix == ".cu" or "numba_cuda" in p.parts)]


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_headers_list_versions_and_build_flags(path):
    """A kernel file (.cu, numba module) lists its versions and its build flags, which exclude fast-math."""
    head = "\n".join(line for _, line in header_lines(path.read_text(), path.suffix))
    where = path.relative_to(ROOT)
    assert re.search(r"^\s*Versions\b.*:", head, re.M), f"{where}: the header has no Versions line"
    build = re.search(r"^\s*Build:(.*)$", head, re.M)
    assert build, f"{where}: the header has no Build: line"
    no_fast_math = "no fast-math" if path.suffix == ".cu" else "fastmath=False"
    assert no_fast_math in build.group(1), f"{where}: the Build line must say {no_fast_math}"


MISSING = "test_backend_" + "gone.py"  # a test file that does not exist (split so no scan reads it as a path)

GOOD_CU = """// example.cu: a header as the conventions ask.
//
// Reference: nemo_scratch.ops.moe.route, moe_experts (the routed experts)
// Test:      tests/test_backend_core.py::test_route_matches_reference,
//            tests/test_backend_core.py (test_moe_experts_*, test_route_ties_go_to_the_lower_index)
// Tolerance: ("kernel_router", "float32") (selection compared exactly, near-ties within float32 rounding
//            excepted), ("kernel_moe", "float32")
// Versions:
//   route_v1_block  one block per 4 tokens
extern "C" __global__ void k() {}
"""

GOOD_PY = '''"""An example launcher.

Reference:  nemo_scratch.ops.quant.nvfp4_dequantize, nvfp4_matmul;
            nemo_scratch.ops.linear.linear (packed weights go to the kernels here)
Test:       tests/test_backend_quant.py::test_nvfp4_*, ::test_fp8_matmul_matches_reference
Tolerance:  dequantize bit-exact; matmuls tests/tolerances.py ("kernel_quant_matmul", float32)
Versions:
  nvfp4_matmul_v1  one warp per output column
"""

import numpy as np
'''


@pytest.mark.parametrize("text, suffix", [(GOOD_CU, ".cu"), (GOOD_PY, ".py")], ids=["cu", "py"])
def test_resolver_accepts_a_correct_header(text, suffix):
    assert [field for field, _, _ in header_fields(text, suffix)] == ["Reference", "Test", "Tolerance"]
    assert header_problems(text, suffix) == []


@pytest.mark.parametrize("text, suffix, old, new, problem", [
    (GOOD_CU, ".cu", "moe_experts (the", "moe_expert (the", "Reference: nemo_scratch.ops.moe.moe_expert does not"),
    (GOOD_PY, ".py", "ops.linear.linear", "ops.linear.fused_linear", "nemo_scratch.ops.linear.fused_linear does not"),
    (GOOD_PY, ".py", "nemo_scratch.ops.quant.nvfp4_dequantize, nvfp4_matmul;", "nvfp4_matmul;",
     "'nvfp4_matmul' has no module"),
    (GOOD_CU, ".cu", "// Reference: nemo_scratch.ops.moe.route, moe_experts (the routed experts)", "// Reference: ",
     "Reference: names no symbol"),
    (GOOD_CU, ".cu", "::test_route_matches_reference", "::test_route_matches_the_reference",
     "test_backend_core.py defines no test_route_matches_the_reference"),
    (GOOD_CU, ".cu", "test_moe_experts_*", "test_moe_experts_grouped_*",
     "defines no test starting with test_moe_experts_grouped_"),
    (GOOD_PY, ".py", "tests/test_backend_quant.py", "tests/" + MISSING,
     MISSING + " does not exist"),
    (GOOD_CU, ".cu", '("kernel_moe", "float32")', '("kernel_experts", "float32")',
     '("kernel_experts", float32) is not a key'),
    (GOOD_PY, ".py", '("kernel_quant_matmul", float32)', '("kernel_quant_matmul", float16)', "expected one dtype"),
    (GOOD_PY, ".py", 'dequantize bit-exact; matmuls tests/tolerances.py ("kernel_quant_matmul", float32)',
     "close enough", "names no tolerance key and does not say exact"),
])
def test_resolver_fails_on_a_mutated_header(text, suffix, old, new, problem):
    """One wrong pointer (a made-up symbol, a test or test file that does not exist, an unknown tolerance
    key) gives exactly one problem, naming it."""
    assert old in text
    problems = header_problems(text.replace(old, new), suffix)
    assert len(problems) == 1 and problem in problems[0], problems


def test_resolver_reads_continuation_lines_only():
    """A continuation is indented deeper than its field; the next field or prose ends it."""
    text = GOOD_CU.replace("//            excepted), (\"kernel_moe\", \"float32\")",
                           "// excepted), (\"kernel_moe\", \"float32\")")
    (tolerance,) = [v for f, _, v in header_fields(text, ".cu") if f == "Tolerance"]
    assert "kernel_moe" not in tolerance
    moved = GOOD_CU.replace("//            tests/test_backend_core.py (", "//            tests/" + MISSING + " (")
    assert any(MISSING + " does not exist" in p for p in header_problems(moved, ".cu"))
