"""nemo_scratch: Nemotron 3 from scratch — a readable NumPy reference with Numba-CUDA and CuPy kernel twins.

    import nemo_scratch
    model = nemo_scratch.load()                       # the bundled tiny trained model
    model = nemo_scratch.load("path/to/checkpoint")   # any Nemotron-H / Nemotron 3 HF checkpoint
    logits = model.forward([[1, 2, 3]])               # [b, t, v] float32
    result = model.generate([1, 2, 3], 16, mtp=True)  # speculative decoding with the MTP head
"""

import os
from pathlib import Path

# OpenBLAS's idle threads spin for 2**28 cycles (about 0.1 s) after every BLAS call by default; on a machine with
# as many cores as threads they take the cores from the Numba CPU kernels that run between BLAS calls (a decode
# step alternates the two): 1.5-2x slower (bench/cpu_gemv.py). 2**4 cycles lets them sleep at once. OpenBLAS reads
# it when NumPy first loads it, so this only counts when nemo_scratch is imported before numpy (the CLI, the
# benchmarks), and only as a default: a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402  (after the OpenBLAS default above)

from .config import PRESETS, NemotronConfig, preset
from .errors import NemoScratchError

__version__ = "0.1.0"

DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "nemotron3-tiny"


def load(path=None, backend="numpy", dtype="float32", dt_floor="config", with_mtp=True, weights="auto"):
    """Load a checkpoint directory (config.json + safetensors, BF16 or ModelOpt NVFP4/FP8) into a Model.

    path      checkpoint directory; None = the bundled tiny trained model
    backend   "numpy" (the reference), "numba" or "cupy" (GPU kernels)
    dtype     "float32" (default) or "float64" (oracle mode); packed NVFP4/FP8 weights stay packed
    dt_floor  "config" (time_step_limit of config.json), "transformers" (floor at time_step_min, as
              transformers 5.x does) or a number
    weights   "stored": every matrix stays as the file stores it (BF16 as BF16, FP8/NVFP4 packed),
              memory-mapped and decoded tile by tile at use, so loading reads headers only;
              "float32": BF16 matrices upcast at load (exact; faster for small models, 2x the bytes);
              "auto" (default): "float32" when the upcast model fits comfortably in available memory,
              else "stored". Both give bitwise the same logits on a BF16 checkpoint.
    """
    from .checkpoint import load_tensors
    from .model.model import Model
    from .model.tokenizer import load_tokenizer
    from .model.weights import build_params

    path = Path(DEFAULT_CHECKPOINT if path is None else path)
    cfg, tensors, info = load_tensors(path, dtype=dtype, weights=weights)
    params = build_params(cfg, tensors, with_mtp=with_mtp, dtype=np.dtype(info["dtype"]))
    return Model(cfg, params, backend=backend, dt_floor=dt_floor, info=info,
                 tokenizer=load_tokenizer(path, cfg), path=path)


def __getattr__(name):
    if name == "Model":
        from .model.model import Model

        return Model
    raise AttributeError(name)


__all__ = ["load", "Model", "NemotronConfig", "preset", "PRESETS", "NemoScratchError", "DEFAULT_CHECKPOINT"]
