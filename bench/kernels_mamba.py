"""The Mamba-path GPU kernels (numba and cupy backends) against the NumPy reference, at Nemotron 3 Ultra shapes.

    python bench/kernels_mamba.py [--quick] [--time T] [--batches 1,8,64] [--backends numba,cupy]
                                  [--repeats 20] [--warm-l2]

Shapes (spec 3, Ultra): 256 heads x head dim 64, state 128, 8 groups, conv_dim 18432, conv width 4, gated-norm
width 16384 in 8 groups, model width 8192. Prefill ops run one sequence of --time tokens (4096; --quick 256);
decode-step ops run at batch 1, 8 and 64 (--quick: 1 and 8).

Each op is first checked against the NumPy reference on the same inputs (the tolerance of tests/tolerances.py),
then timed with CUDA events after three warm-up calls (which include NVRTC / JIT compilation), by default with
a cold L2 (a 256 MiB buffer is rewritten before every timed call). Printed per op and backend:
- the kernel time and the NumPy reference's time on the CPU for the same shape (and their ratio);
- the bytes the op must move at least (its inputs and outputs, once) and the achieved bandwidth, as a fraction
  of the device's peak, computed from its memory clock and bus width (printed first);
- for the chunked scan, its time over a device-to-device memcpy moving the same bytes, measured in this run.
Exits with a message when there is no CUDA GPU (or no cupy).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # tolerances.py: the one tolerance table

ULTRA = dict(h=256, p=64, n=128, g=8, w=4, d=8192, chunk=128)
CUDA_DEV_ATTR_MEMORY_CLOCK_RATE = 36     # kHz  (cudaDevAttrMemoryClockRate; cudaDeviceProp lost the field in CUDA 13)
CUDA_DEV_ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37   # bits
CUDA_DEV_ATTR_L2_CACHE_SIZE = 38         # bytes
FLUSH_BYTES = 256 << 20
F32 = 4


def die(message):
    sys.exit(f"bench/kernels_mamba.py: {message}")


def cupy_or_exit():
    try:
        import cupy
    except ImportError:
        die("needs a CUDA GPU and cupy (pip install -e .[gpu-cuda13] or .[gpu-cuda12]); cupy is not installed")
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, or a broken one
        die(f"no CUDA GPU is available ({type(exc).__name__}: {exc}); run it on a machine with one")
    if n_devices < 1:
        die("no CUDA GPU is available (the driver reports 0 devices); run it on a machine with one")
    return cupy


def device_facts(cupy):
    """(name, peak HBM bytes/s, L2 bytes): peak = 2 (double data rate) x memory clock x bus width."""
    rt, dev = cupy.cuda.runtime, cupy.cuda.Device().id
    clock_hz = rt.deviceGetAttribute(CUDA_DEV_ATTR_MEMORY_CLOCK_RATE, dev) * 1e3
    bus_bytes = rt.deviceGetAttribute(CUDA_DEV_ATTR_GLOBAL_MEMORY_BUS_WIDTH, dev) / 8
    l2 = rt.deviceGetAttribute(CUDA_DEV_ATTR_L2_CACHE_SIZE, dev)
    name = rt.getDeviceProperties(dev)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return name, 2 * clock_hz * bus_bytes, l2, clock_hz, bus_bytes


class Timer:
    """CUDA-event timing of a callable: warm-up calls, then ``repeats`` timed calls (median, seconds)."""

    def __init__(self, cupy, repeats, cold_l2):
        self.cupy, self.repeats = cupy, repeats
        self.flush = cupy.empty(FLUSH_BYTES // F32, dtype=np.float32) if cold_l2 else None

    def __call__(self, fn):
        cp = self.cupy
        for _ in range(3):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.fill(1.0)   # evicts the op's data from L2
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        return statistics.median(times)


def memcpy_d2d(dst, src, nbytes):
    """A device-to-device copy of nbytes (cudaMemcpyAsync on the current stream)."""
    dst.data.copy_from_device_async(src.data, nbytes)


def cpu_time(fn, repeats):
    """Median wall time of the NumPy reference (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ultra_cases(t, batches):
    """[(op, shape label, make inputs(rng) -> args, kwargs, minimal bytes moved)] at Ultra's Mamba shapes."""
    h, p, n, g, w, d, chunk = (ULTRA[k] for k in ("h", "p", "n", "g", "w", "d", "chunk"))
    i, c = h * p, h * p + 2 * g * n

    def u(rng, *shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    def ssd_args(rng, b, tt):
        x, dt = u(rng, b, tt, h, p, lo=-2, hi=2), u(rng, b, tt, h, lo=0.01, hi=0.6)
        A = -np.exp(u(rng, h, lo=-1.0, hi=1.5))
        return x, dt, A, u(rng, b, tt, g, n), u(rng, b, tt, g, n)

    cases = [
        ("causal_conv1d", f"b=1 t={t} c={c} w={w}",
         lambda rng: ((u(rng, 1, t, c), u(rng, c, w), u(rng, c), u(rng, 1, c, w)), {}),
         F32 * (2 * t * c + 2 * c * w + c + c * w)),
        ("ssd_scan", f"b=1 t={t} h={h} p={p} n={n} g={g} chunk={chunk}",
         lambda rng: ((*ssd_args(rng, 1, t), chunk), {"D": u(rng, h), "initial_state": u(rng, 1, h, p, n)}),
         F32 * (2 * t * h * p + t * h + 2 * t * g * n + 2 * h * p * n + 2 * h)),
        ("gated_rms_norm", f"rows={t} i={i} groups={g}",
         lambda rng: ((u(rng, t, i, lo=-3, hi=3), u(rng, t, i, lo=-4, hi=4), u(rng, i), g, 1e-5), {}),
         F32 * (3 * t * i + i)),
        ("rms_norm", f"rows={t} d={d}",
         lambda rng: ((u(rng, t, d, lo=-3, hi=3), u(rng, d), 1e-5), {}),
         F32 * (2 * t * d + d)),
    ]
    for b in batches:
        def conv_step(rng, b=b):
            return (u(rng, b, c), u(rng, b, c, w), u(rng, c, w), u(rng, c)), {}

        def ssd_step(rng, b=b):
            x, dt, A, B, C = ssd_args(rng, b, 1)
            return (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], u(rng, h), u(rng, b, h, p, n, lo=-3, hi=3)), {}

        cases.append(("causal_conv1d_step", f"b={b} c={c} w={w}", conv_step,
                      F32 * (b * c * (2 + 2 * w) + c * w + c)))
        cases.append(("ssd_step", f"b={b} h={h} p={p} n={n} g={g}", ssd_step,
                      F32 * (2 * b * h * p * n + 2 * b * h * p + b * h + 2 * b * g * n + 2 * h)))
    return cases


REFERENCE = {   # backend op -> (reference function, tolerance key)
    "causal_conv1d": ("conv.causal_conv1d", "kernel_conv1d"),
    "causal_conv1d_step": ("conv.causal_conv1d_step", "kernel_conv1d"),
    "ssd_scan": ("ssd.ssd_scan_chunked", "kernel_ssd"),
    "ssd_step": ("ssd.ssd_step", "kernel_ssd_step"),
    "gated_rms_norm": ("norm.gated_rms_norm", "kernel_gated_rms_norm"),
    "rms_norm": ("norm.rms_norm", "kernel_rms_norm"),
}
STATE_ARG = {"causal_conv1d_step": 1, "ssd_step": 6}   # decode steps: update this argument in place


def reference_fn(op):
    import importlib

    module, fn = REFERENCE[op][0].split(".")
    return getattr(importlib.import_module(f"nemo_scratch.ops.{module}"), fn)


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: t=256, batch 1 and 8")
    ap.add_argument("--time", type=int, help="prefill tokens (default 4096; --quick 256)")
    ap.add_argument("--batches", help="decode batch sizes, comma-separated (default 1,8,64; --quick 1,8)")
    ap.add_argument("--backends", default="numba,cupy")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per op (median)")
    ap.add_argument("--cpu-repeats", type=int, default=1, help="timed calls of the NumPy reference")
    ap.add_argument("--warm-l2", action="store_true", help="do not flush L2 between timed calls")
    args = ap.parse_args()

    cupy = cupy_or_exit()
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    from tolerances import assert_close

    from nemo_scratch.backends import get_backend
    from nemo_scratch.errors import BackendError

    name, peak, l2, clock_hz, bus_bytes = device_facts(cupy)
    print(f"device: {name}; peak HBM bandwidth {peak / 1e9:.1f} GB/s = 2 x {clock_hz / 1e6:.0f} MHz memory clock "
          f"x {bus_bytes * 8:.0f}-bit bus; L2 {l2 / 2**20:.0f} MiB; "
          f"{'warm' if args.warm_l2 else 'cold'} L2 timing, median of {args.repeats}")

    backends = []
    for bname in args.backends.split(","):
        try:
            be = get_backend(bname)
        except BackendError as exc:
            print(f"skipping backend {bname}: {exc}")
            continue
        if be.xp is not cupy:
            print(f"skipping backend {bname}: it runs on the CUDA simulator here (unset NUMBA_ENABLE_CUDASIM)")
            continue
        backends.append(be)
    if not backends:
        die("no GPU backend could be constructed")

    timer = Timer(cupy, args.repeats, cold_l2=not args.warm_l2)
    rng = np.random.default_rng(0)
    header = (f"{'op':<19} {'shape':<44} {'backend':<7} {'kernel us':>10} {'numpy ms':>10} {'x numpy':>8} "
              f"{'MB moved':>9} {'GB/s':>7} {'% peak':>7} {'x memcpy':>9} {'tol used':>8}")
    print(header)
    print("-" * len(header))
    kernel_times = {}   # (op, shape) -> {backend: seconds}
    t = args.time or (256 if args.quick else 4096)
    batches = [int(v) for v in (args.batches or ("1,8" if args.quick else "1,8,64")).split(",")]
    for op, shape, make, nbytes in ultra_cases(t, batches):
        host_args, kwargs = make(rng)
        ref = reference_fn(op)
        t_ref = cpu_time(lambda: ref(*host_args, **kwargs), args.cpu_repeats)
        want = outputs(ref(*host_args, **kwargs))
        memcpy_s = None
        if op == "ssd_scan":   # a device-to-device copy moving the same bytes (half read, half written)
            src, dst = cupy.empty(nbytes // 2, dtype=np.uint8), cupy.empty(nbytes // 2, dtype=np.uint8)
            memcpy_s = timer(lambda: memcpy_d2d(dst, src, nbytes // 2))
        for be in backends:
            dev = [be.asarray(a) if isinstance(a, np.ndarray) else a for a in host_args]
            dkw = {k: be.asarray(v) for k, v in kwargs.items()}
            got = outputs(getattr(be, op)(*dev, **dkw))   # checked before it is timed
            used = max(assert_close(be.to_numpy(gg), ww, REFERENCE[op][1], what=f"{be.name} {op}")
                       for gg, ww in zip(got, want))
            if op in STATE_ARG:   # the decode loop's in-place update
                state = dev[STATE_ARG[op]]
                t_k = timer(lambda: getattr(be, op)(*dev, out_state=state, **dkw))
            else:
                t_k = timer(lambda: getattr(be, op)(*dev, **dkw))
            kernel_times.setdefault((op, shape), {})[be.name] = t_k
            bw = nbytes / t_k
            vs_copy = f"{t_k / memcpy_s:9.2f}" if memcpy_s else f"{'':>9}"
            print(f"{op:<19} {shape:<44} {be.name:<7} {t_k * 1e6:10.1f} {t_ref * 1e3:10.1f} {t_ref / t_k:8.1f} "
                  f"{nbytes / 1e6:9.1f} {bw / 1e9:7.0f} {100 * bw / peak:6.1f}% {vs_copy} {100 * used:7.1f}%")
        if memcpy_s:
            bw = nbytes / memcpy_s
            print(f"{'  memcpy d2d':<19} {'same bytes as ssd_scan':<44} {'cupy':<7} {memcpy_s * 1e6:10.1f} "
                  f"{'':>10} {'':>8} {nbytes / 1e6:9.1f} {bw / 1e9:7.0f} {100 * bw / peak:6.1f}% {1.0:9.2f}")
    print("x numpy: NumPy reference time / kernel time; x memcpy: kernel time / memcpy time (1 = memcpy speed); "
          "tol used: the largest share of the tests/tolerances.py budget the check used")
    pairs = [(key, v["numba"] / v["cupy"]) for key, v in kernel_times.items() if {"numba", "cupy"} <= set(v)]
    if pairs:
        print("\nnumba time / cupy time (same algorithm family; > 1: the CUDA C kernel is faster)")
        for (op, shape), ratio in pairs:
            print(f"  {op:<19} {shape:<44} {ratio:6.2f}")


if __name__ == "__main__":
    main()
