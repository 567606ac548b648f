"""The backend registry: names, errors, lazy imports, and the numba backend on the CUDA simulator."""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gpu_harness import gpu_available, numba_backend, requires_sim
from tolerances import assert_close

from nemo_scratch.backends import BACKENDS, get_backend
from nemo_scratch.backends.numpy_backend import NumpyBackend
from nemo_scratch.errors import BackendError
from nemo_scratch.ops import norm

ROOT = Path(__file__).resolve().parent.parent
GPU_PACKAGES = {"numba", "numba_cuda", "cupy", "cupy_backends", "cuda", "llvmlite"}


def python(code, **env):
    """Run ``code`` in a fresh interpreter from the repo root; its last stdout line parsed as JSON."""
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"} | env
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendError, match=r"'torch'.*numpy.*numba.*cupy"):
        get_backend("torch")


def test_numpy_backend_is_the_default_and_objects_pass_through():
    be = get_backend()
    assert isinstance(be, NumpyBackend) and be.name == "numpy" and be.xp is np
    assert get_backend(be) is be and get_backend("numpy") is be


def test_importing_the_backends_loads_no_gpu_package():
    """Every module of the registry imports without numba, cupy or the CUDA driver (nothing probes a GPU)."""
    result = python(
        "import importlib, importlib.util, json, sys\n"
        "from nemo_scratch.backends import _REGISTRY\n"
        "found = [m for m, _ in _REGISTRY.values() if importlib.util.find_spec(m) is not None]\n"
        "for m in found: importlib.import_module(m)\n"
        "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''\n"
        "print(json.dumps({'imported': found, 'top': sorted({k.split('.')[0] for k in sys.modules}),\n"
        "                  'libcuda': 'libcuda' in maps}))")
    assert {"nemo_scratch.backends.numpy_backend", "nemo_scratch.backends.numba_cuda"} <= set(result["imported"])
    assert not GPU_PACKAGES & set(result["top"]), GPU_PACKAGES & set(result["top"])
    assert not result["libcuda"], "importing the backends loaded the CUDA driver"


def test_gpu_available_never_raises():
    assert gpu_available() in (True, False)


def test_numba_backend_without_gpu_or_simulator_says_what_is_missing():
    """With the simulator off: no GPU -> BackendError naming the simulator switch; GPU -> cupy arrays or
    BackendError naming cupy."""
    result = python(
        "import json\n"
        "from nemo_scratch.backends import get_backend\n"
        "from nemo_scratch.errors import BackendError\n"
        "try:\n"
        "    be = get_backend('numba'); print(json.dumps({'xp': be.xp.__name__}))\n"
        "except BackendError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))", NUMBA_ENABLE_CUDASIM="0")
    if not gpu_available():
        assert "no CUDA GPU" in result["error"] and "NUMBA_ENABLE_CUDASIM=1" in result["error"]
    else:
        assert result.get("xp") == "cupy" or "needs cupy" in result["error"]


@pytest.mark.sim
@requires_sim
def test_numba_backend_on_the_simulator():
    """The numba backend runs on NumPy arrays under the simulator: kernels for the Mamba-path ops, the
    reference (on xp = numpy) for every other op."""
    from nemo_scratch.backends.numba_cuda import KERNELS

    be = numba_backend()
    assert be.name == "numba" and be.xp is np and be.simulator and "numba" in BACKENDS
    for op, (module, entry) in KERNELS.items():
        fn = getattr(be, op)
        kernel = inspect.unwrap(fn)  # the binder's wrapper: contract, then this kernel or the reference
        assert kernel.__name__ == entry and kernel.__module__ == f"nemo_scratch.backends.numba_cuda.{module}", op
    reference_ops = [k for k, v in vars(NumpyBackend).items() if isinstance(v, staticmethod) and k not in KERNELS]
    assert "discretize_dt" in reference_ops
    for op in reference_ops:  # no kernel: the reference function itself
        assert getattr(be, op) is getattr(NumpyBackend, op), op
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    dev = be.asarray(x)
    assert isinstance(dev, np.ndarray) and isinstance(be.to_numpy(dev), np.ndarray)
    assert_close(be.to_numpy(be.rms_norm(dev, be.asarray(weight), 1e-5)), norm.rms_norm(x, weight, 1e-5),
                 "kernel_rms_norm")


def test_docs_backends_table_matches_the_kernel_tables():
    """docs/backends.md lists exactly the ops each GPU backend binds to a kernel, with the right entry points."""
    import re
    from pathlib import Path

    from nemo_scratch.backends.cupy import KERNELS as CUPY
    from nemo_scratch.backends.numba_cuda import KERNELS as NUMBA

    doc = (Path(__file__).resolve().parent.parent / "docs" / "backends.md").read_text()
    rows = [line.split("|")[1:-1] for line in doc.splitlines() if line.startswith("| `")]
    documented_numba, documented_cupy = {}, {}
    for cells in rows:
        ops = re.findall(r"`(\w+)`", cells[0].split("(")[0])
        numba_entry = re.fullmatch(r"\s*`(\w+)\.(\w+)`\s*", cells[1])
        cu_file = re.match(r"\s*`(\w+)\.cu`", cells[3])
        for op in ops:
            if numba_entry:
                documented_numba[op] = numba_entry.groups()
            if cu_file:
                documented_cupy[op] = cu_file.group(1)
    assert documented_numba == {op: tuple(v) for op, v in NUMBA.items()}
    assert set(documented_cupy) == set(CUPY)
    for op, (module, entry) in CUPY.items():
        assert entry.endswith("_cupy") and module == documented_cupy[op], (op, module)
