"""The docs show code and values from tested files: docs/oracle.md and docs/architecture.md against the code.

- docs/oracle.md: the op signature listing equals the reference functions' signatures and covers every
  backend op; every row of the numba and cupy ``KERNELS`` tables names an entry point with the reference's
  parameters (minus ``rows_per_tile``, as the doc allows); the tolerance table equals
  ``TOLERANCES``; the golden-op table equals ``golden.OPS`` and the case table ``golden_cases.CASES``; the
  ``bash`` block has one ``nemo-scratch golden`` command per op (and a few ``--case`` ones) and each runs;
  every ``python`` block runs (in a temporary folder holding those files); the ``cpp`` block compiles, passes
  on a golden file and fails on a tampered one.
- Both docs: every ``path.py::name`` pointer names a file and a top-level (or ``Class.method``) definition in
  it, and every path-like token names a file that exists. In docs/architecture.md's ``| equation | function |``
  tables every bare function name resolves in the module its section (or its row) names.
"""

import ast
import contextlib
import inspect
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tolerances import TOLERANCES

from nemo_scratch import cli, golden
from nemo_scratch.backends import cupy as cupy_backend
from nemo_scratch.backends import numba_cuda as numba_backend
from nemo_scratch.backends.numpy_backend import NumpyBackend
from nemo_scratch.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nemo_scratch.golden_cases import CASES
from nemo_scratch.ops import attention, conv, linear, moe, norm, quant, ssd, ssd_fast

ROOT = Path(__file__).resolve().parent.parent
ORACLE = (ROOT / "docs" / "oracle.md").read_text()
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
REFERENCE_MODULES = {"ops/norm.py": norm, "ops/conv.py": conv, "ops/ssd.py": ssd, "ops/attention.py": attention,
                     "ops/moe.py": moe, "ops/linear.py": linear, "ops/quant.py": quant, "ops/ssd_fast.py": ssd_fast}


def blocks(text, lang):
    """The bodies of the fenced code blocks of ``lang`` (```python ... ```), in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def table(text, header):
    """The rows (lists of cells, ``\\|`` unescaped) of the markdown table whose header line is ``header``."""
    lines = text[text.index(header + "\n"):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def params(signature):
    """[(name, default source or None)] of a signature: an inspect.Signature or the text '(a, b=1)'."""
    if isinstance(signature, str):
        fn = ast.parse(f"def f{signature}: pass").body[0].args
        defaults = [None] * (len(fn.args) - len(fn.defaults)) + [ast.unparse(d) for d in fn.defaults]
        return [(a.arg, d) for a, d in zip(fn.args, defaults)]
    return [(p.name, None if p.default is inspect.Parameter.empty else repr(p.default))
            for p in signature.parameters.values()]


# ---------------------------------------------------------------------------------------------- the op API

def doc_signatures():
    """{name: (module, '(params)')} from the ```text listing of docs/oracle.md; every line must parse."""
    (listing,) = blocks(ORACLE, "text")
    module, found = None, {}
    for line in listing.splitlines():
        if m := re.match(r"# (ops/\w+\.py)\b", line):
            module = REFERENCE_MODULES[m.group(1)]
        elif m := re.match(r"(\w+)(\(.*?\))\s*(#.*)?$", line):
            assert module is not None, f"signature before any '# ops/<file>.py' line: {line}"
            found[m.group(1)] = (module, m.group(2))
        else:
            assert line.startswith("    #"), f"neither a module line, a signature nor an indented comment: {line!r}"
    return found


def test_signature_listing_matches_the_reference():
    listed = doc_signatures()
    for name, (module, text) in listed.items():
        assert hasattr(module, name), f"docs/oracle.md lists {module.__name__}.{name}, which does not exist"
        assert params(text) == params(inspect.signature(getattr(module, name))), f"{name}{text}"


def test_signature_listing_covers_every_backend_op():
    # every op NumpyBackend binds, under its own name (``ssd_scan`` is an alias of ssd_scan_chunked)
    ops = {k for k, v in vars(NumpyBackend).items() if isinstance(v, staticmethod) and v.__func__.__name__ == k}
    assert len(ops) > 15, "NumpyBackend binds its ops as staticmethods"
    assert ops <= set(doc_signatures()), f"ops missing from docs/oracle.md: {sorted(ops - set(doc_signatures()))}"


def entry_point(package, module, entry):
    """The ast.FunctionDef of ``entry`` in nemo_scratch/backends/<package>/<module>.py (imports no numba/cupy)."""
    path = ROOT / "nemo_scratch" / "backends" / package / f"{module}.py"
    tree = ast.parse(path.read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry]
    assert len(defs) == 1, f"{path.relative_to(ROOT)} has no function {entry}"
    return defs[0]


@pytest.mark.parametrize("package, kernels", [("numba_cuda", numba_backend.KERNELS), ("cupy", cupy_backend.KERNELS)])
def test_kernel_entry_points_take_the_reference_parameters(package, kernels):
    assert kernels
    for op, (module, entry) in kernels.items():
        fn = entry_point(package, module, entry)
        got = params("(" + ast.unparse(fn.args) + ")")
        want = params(inspect.signature(getattr(NumpyBackend, op)))
        if ("rows_per_tile", "128") not in got:      # the reference's tiling knob
            want = [p for p in want if p[0] != "rows_per_tile"]
        assert got == want, f"backends/{package}/{module}.py::{entry} takes {got}, the reference {op} {want}"


# ---------------------------------------------------------------------------------------------- tables

def test_tolerance_table_equals_TOLERANCES():
    rows = table(ORACLE, "| key | dtype | rtol | atol | reason |")
    doc = {(key.strip("`"), dtype): (float(rtol), float(atol), reason) for key, dtype, rtol, atol, reason in rows}
    assert len(doc) == len(rows), "a (key, dtype) appears twice in docs/oracle.md"
    assert doc == TOLERANCES


def test_golden_op_table_equals_OPS():
    rows = table(ORACLE, "| op | dimensions (defaults) | outputs | tolerance key |")
    doc = {op: (dims, outputs, key) for op, dims, outputs, key in rows}
    want = {op: (", ".join(f"{k}={v}" for k, v in spec[0].items()), ", ".join(spec[3]), spec[4])
            for op, spec in golden.OPS.items()}
    assert doc == want


def test_golden_case_table_equals_CASES():
    rows = table(ORACLE, "| op | case | what it holds |")
    assert [(op, case, what) for op, case, what in rows] == \
        [(op, case, what) for op, cases in CASES.items() for case, (what, _) in cases.items()]


# ---------------------------------------------------------------------------------------------- runnable code

def golden_commands():
    """argv lists of the ```bash block's lines (each `nemo-scratch golden ...`)."""
    (bash,) = blocks(ORACLE, "bash")
    return [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding the golden files the doc's commands write (run in-process through cli.main)."""
    path = tmp_path_factory.mktemp("oracle_doc")
    with contextlib.chdir(path):
        for argv in golden_commands():
            assert argv[:2] == ["nemo-scratch", "golden"], argv
            assert cli.main(argv[1:]) == 0, argv
            assert Path(argv[argv.index("--out") + 1]).is_file()
    return path


def test_golden_commands_cover_every_op(workdir):
    ops = [argv[argv.index("--op") + 1] for argv in golden_commands() if "--case" not in argv]
    assert sorted(ops) == sorted(golden.OPS)
    for argv in (argv for argv in golden_commands() if "--case" in argv):   # the tie and boundary examples
        assert argv[argv.index("--case") + 1] in golden.case_names(argv[argv.index("--op") + 1]), argv
    for argv in golden_commands():
        assert golden.read_golden(workdir / argv[argv.index("--out") + 1])[0] == argv[argv.index("--op") + 1]


PYTHON_BLOCKS = blocks(ORACLE, "python")


@pytest.mark.parametrize("code", [pytest.param(c, id=f"block{i}", marks=[pytest.mark.oracle] if "torch" in c else [])
                                  for i, c in enumerate(PYTHON_BLOCKS)])
def test_python_block_runs(code, workdir):
    if "torch" in code:
        pytest.importorskip("torch", reason="the PyTorch example needs torch (the oracle extra)")
        pytest.importorskip("safetensors", reason="the PyTorch example needs safetensors (the oracle extra)")
    with contextlib.chdir(workdir):
        exec(compile(code, "docs/oracle.md", "exec"), {"__name__": "oracle_doc"})


def test_python_blocks_exist():
    assert len(PYTHON_BLOCKS) >= 3, "oracle.md shows float32/float64 modes, NumPy and PyTorch readers"


CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, c++ or clang++) on PATH")
def test_cpp_block_compiles_passes_and_catches_a_bad_file(workdir, tmp_path):
    (cpp,) = blocks(ORACLE, "cpp")
    src, exe = tmp_path / "golden_rms_norm.cpp", tmp_path / "golden_rms_norm"
    src.write_text(cpp)
    build = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    good = workdir / "rms_norm.safetensors"
    run = subprocess.run([str(exe), str(good)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith(f"rms_norm: {2 * 8 * 64} values")
    # the same file with out32.y off by 1%: the C++ check must fail
    f = SafetensorsFile(good)
    tensors = {k: (np.array(f.get(k)), f.dtype_of(k)) for k in f.keys()}
    tensors["out32.y"] = (tensors["out32.y"][0] * np.float32(1.01), "F32")
    bad = write_safetensors(tmp_path / "bad.safetensors", tensors, metadata=f.metadata)
    assert subprocess.run([str(exe), str(bad)], capture_output=True, timeout=30).returncode == 1


# ---------------------------------------------------------------------------------------------- pointers

def resolve(path):
    """A doc path: from the repository root, else from inside the package (``ops/ssd.py``)."""
    for base in (ROOT, ROOT / "nemo_scratch"):
        if (base / path).is_file():
            return base / path
    return None


def defines(path, dotted):
    """True when ``dotted`` (``f``, ``Class``, ``Class.method``, ``NAME``) is defined at the top of ``path``."""
    scope = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


@pytest.mark.parametrize("doc, text", [("oracle.md", ORACLE), ("architecture.md", ARCHITECTURE)])
def test_pointers_resolve(doc, text):
    pointers = re.findall(r"`([\w/.]+\.py)::([\w.]+)`", text)
    assert pointers, f"docs/{doc} has no path::name pointers"
    for path, name in pointers:
        file = resolve(path)
        assert file is not None, f"docs/{doc}: {path} (in `{path}::{name}`) does not exist"
        assert defines(file, name), f"docs/{doc}: {path} defines no {name}"
    for path in re.findall(r"`([\w./]+/[\w.]+\.(?:py|cu|cuh|md))`", text):
        assert resolve(path) is not None, f"docs/{doc}: {path} does not exist"


def test_architecture_function_names_resolve():
    """Bare names in the function column resolve in a module named by the section heading or the row."""
    checked = 0
    for section in re.split(r"^## ", ARCHITECTURE, flags=re.M)[1:]:
        if "| equation | function |" not in section:
            continue
        heading = section.splitlines()[0]
        for row in table(section, "| equation | function |"):
            modules = [resolve(p) for p in re.findall(r"([\w/]+\.py)", heading + " " + row[-1])]
            modules = [m for m in modules if m is not None]
            for name in re.findall(r"`([A-Za-z_]\w*(?:\.\w+)?)`", row[-1]):
                head, _, rest = name.partition(".")
                sibling = [m.parent / f"{head}.py" for m in modules if rest and (m.parent / f"{head}.py").is_file()]
                ok = any(defines(m, name) for m in modules) or any(defines(s, rest) for s in sibling)
                assert ok, f"docs/architecture.md, '## {heading}': `{name}` is not defined in {modules}"
                checked += 1
    assert checked > 20
