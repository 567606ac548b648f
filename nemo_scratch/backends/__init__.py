"""Backend registry: ``numpy`` (the reference), ``numba`` (Numba-CUDA kernels), ``cupy`` (CUDA C via RawModule).

Every backend exposes the op set of docs/ops-api.md under the same names and signatures. The model never
imports a kernel: it calls ``backend.<op>(...)``. Nothing here imports numba or cupy, or touches a GPU,
until ``get_backend`` is asked for that backend.
"""

import importlib

from ..errors import BackendError

# name -> (module, class); imported lazily.
_REGISTRY = {
    "numpy": ("nemo_scratch.backends.numpy_backend", "NumpyBackend"),
    "numba": ("nemo_scratch.backends.numba_cuda", "NumbaBackend"),
    "cupy": ("nemo_scratch.backends.cupy", "CupyBackend"),
}
_CACHE = {}

BACKENDS = tuple(_REGISTRY)


def get_backend(name="numpy"):
    """The backend object for ``name`` (cached). Raises BackendError naming what is missing."""
    if not isinstance(name, str):
        return name  # already a backend object
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    if name not in _CACHE:
        module, cls = _REGISTRY[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} needs a package that is not installed ({exc}); "
                               f"install the gpu-cuda12 or gpu-cuda13 extra") from None
        _CACHE[name] = getattr(mod, cls)()
    return _CACHE[name]
