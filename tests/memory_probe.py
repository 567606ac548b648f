"""Run in a fresh interpreter by the memory tests: load a checkpoint, run a prefill, report resident memory.

    python tests/memory_probe.py CHECKPOINT WEIGHTS TOKENS [PREFILL_CHUNK]

Prints one JSON object: /proc/self/status figures (VmRSS, VmHWM, RssAnon, RssFile, in bytes) at the start
(after the imports and a first call of the CPU kernel: numba and its compiled code are library code, like
numpy, not the run's memory), after the load and after the prefill, and the seconds the load took.
"""

import json
import sys
import time


def status():
    from nemo_scratch.memory import proc_bytes

    return proc_bytes("/proc/self/status", ("VmRSS", "VmHWM", "RssAnon", "RssFile"))


def main():
    import numpy as np

    import nemo_scratch
    from nemo_scratch.ops import quant_fast

    # numba, llvmlite and the kernel's compiled code (about 110 MB) load here, not inside the measured prefill
    quant_fast.dense_matmul_fast(np.ones((1, 8), np.float32), np.ones((2, 8), np.float32))
    path, weights, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 else None
    start = status()
    t0 = time.perf_counter()
    model = nemo_scratch.load(path, weights=weights)
    load_s = time.perf_counter() - t0
    loaded = status()
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(1, tokens))
    model.forward(ids, model.new_cache(1), last_only=True, prefill_chunk=chunk)
    print(json.dumps({"start": start, "loaded": loaded, "prefilled": status(), "load_seconds": load_s}))


if __name__ == "__main__":
    main()
