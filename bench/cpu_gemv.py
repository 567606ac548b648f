"""The fused CPU GEMV (ops/quant_numba.py) against the NumPy tiles it replaces (ops/quant.py), same run, same threads.

    python bench/cpu_gemv.py [--threads N] [--rows 1,2,4,8,9,16] [--repeats 5] [--shapes lm_head,in_proj,expert]
                             [--omp-wait-policy PASSIVE|ACTIVE]

For each Nano-width weight shape and each stored format (float32, BF16, FP8, NVFP4: random codes, the timing
does not depend on the values), times y = x @ W^T for m rows of x both ways, interleaved, and prints the
median milliseconds, the stored bytes read per second and the ratio reference / kernel (> 1: the kernel is
faster). It also measures this machine's memory bandwidth in the same run (a NumPy sum over 1 GiB, and a
1 GiB copy counted as read + write), the ceiling a memory-bound GEMV can reach. The kernel's row limit
(ops/quant_fast.py GEMV_ROWS) is chosen from the m where the ratio falls below 1. The kernel and the
tiles alternate (Numba's OpenMP threads, then OpenBLAS's), as they do in a model; ``--omp-wait-policy ACTIVE``
lets Numba's idle threads spin (libgomp's default) instead of sleeping (what ops/quant_fast.py sets) to show
what the two thread pools cost each other then.
"""

import argparse
import os
import statistics
import sys
import time

SHAPES = {"lm_head": (131072, 2688), "in_proj": (10304, 2688), "expert": (1856, 2688), "expert_down": (2688, 1856)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default="1,2,4,8,9,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="lm_head,in_proj,expert,expert_down")
    ap.add_argument("--formats", default="float32,bf16,fp8,nvfp4")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth test's array")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"])
    args = ap.parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    set_threads(args.threads)

    import numba
    import numpy as np

    from nemo_scratch.ops import quant, quant_fast

    print(f"threads {args.threads} (OpenBLAS and Numba), OMP_WAIT_POLICY {args.omp_wait_policy}, numpy "
          f"{np.__version__}, numba {numba.__version__}, {os.cpu_count()} cores")
    print("memory bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth(np, args.bandwidth_mib).items()))
    rng = np.random.default_rng(0)
    for name in args.shapes.split(","):
        out, inn = SHAPES[name]
        for fmt in args.formats.split(","):
            kernel, reference, nbytes = weight(fmt, out, inn, rng, np, quant, quant_fast)
            for m in [int(r) for r in args.rows.split(",")]:
                x = rng.standard_normal((m, inn), dtype=np.float32)
                kernel(x), reference(x)           # warm-up: compile, page in
                k_times, r_times = [], []
                for _ in range(args.repeats):     # interleaved: both see the same machine noise
                    k_times.append(timed(kernel, x))
                    r_times.append(timed(reference, x))
                k, r = statistics.median(k_times), statistics.median(r_times)
                path = "kernel" if m <= quant_fast.GEMV_ROWS else "tiles "
                print(f"{name:12s} [{out:6d} x {inn}] {fmt:8s} m={m:<3d} kernel {k * 1e3:8.2f} ms "
                      f"({nbytes / k / 1e9:5.1f} GB/s)   NumPy tiles {r * 1e3:8.2f} ms ({nbytes / r / 1e9:5.1f} GB/s)"
                      f"   ratio {r / k:5.2f}   (the backend runs: {path})", flush=True)
    return 0


def weight(fmt, out, inn, rng, np, quant, quant_fast):
    """(kernel(x), reference(x), stored bytes) for a random weight [out, inn] stored as ``fmt``."""
    kernel_on = quant_fast.ENABLED

    def forced(fn, *w):   # the fast twin with the row rule widened, so every m runs the kernel
        def run(x):
            limit, quant_fast.GEMV_ROWS, quant_fast.ENABLED = quant_fast.GEMV_ROWS, x.shape[0], kernel_on
            try:
                return fn(x, *w)
            finally:
                quant_fast.GEMV_ROWS = limit
        return run

    if fmt == "float32":
        w = rng.standard_normal((out, inn), dtype=np.float32)
        return forced(quant_fast.dense_matmul_fast, w), lambda x: quant.dense_matmul(x, w), w.nbytes
    if fmt == "bf16":
        bits = (rng.standard_normal((out, inn), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return forced(quant_fast.bf16_matmul_fast, bits), lambda x: quant.bf16_matmul(x, bits), bits.nbytes
    finite = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)   # E4M3 codes but NaN
    scale = np.float32(0.01)
    if fmt == "fp8":
        data = rng.choice(finite, size=(out, inn))
        return forced(quant_fast.fp8_matmul_fast, data, scale), lambda x: quant.fp8_matmul(x, data, scale), \
            data.nbytes
    packed = rng.integers(0, 256, size=(out, inn // 2), dtype=np.uint8)
    block = rng.choice(finite[(finite > 0x20) & (finite < 0x60)], size=(out, inn // 16))   # sane block scales
    return (forced(quant_fast.nvfp4_matmul_fast, packed, block, scale),
            lambda x: quant.nvfp4_matmul(x, packed, block, scale), packed.nbytes + block.nbytes)


def set_threads(n):
    """BLAS, OpenMP (Numba's pool) and torch threads, set before they load. Then nemo_scratch is imported first,
    before numpy, so its OpenBLAS idle-thread default (nemo_scratch/__init__.py) counts here as in the CLI."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    import nemo_scratch  # noqa: F401


def bandwidth(np, mib=1024):
    """{what: GB/s} of a ``mib`` MiB float32 array: np.sum reads it; np.copyto reads and writes it (2x moved)."""
    a = np.ones(mib * 2**18, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a), a.sum()
    read = min(timed(lambda _: a.sum(), None) for _ in range(3))
    copy = min(timed(lambda _: np.copyto(b, a), None) for _ in range(3))
    return {"sum (read)": a.nbytes / read / 1e9, "copy (read + write)": 2 * a.nbytes / copy / 1e9}


def timed(fn, x):
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
