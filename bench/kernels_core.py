"""Benchmark the issue-8 GPU kernels at Nemotron 3 Ultra shapes: cupy vs numba, against the memory system.

Ops (the memory-bound ones of a decode step):
  gqa_decode    one token, 64 q heads over 2 kv heads x 128, against a float32 KV cache of 1K..32K tokens
                (split-K + merge): it must read the whole cache, so bytes = K + V (+ q and out).
  nvfp4_matmul  the fused W4A16 matmul at M = 1 (GEMV) and M = 16 (small batch) for Ultra's expert
                (up 5120 x 2048, down 2048 x 5120) and model (8192 x 8192) widths: bytes = packed codes +
                E4M3 block scales + x + y (the float32 weight is never written).
Every kernel is first checked against the NumPy reference (tests/tolerances.py ``kernel_*`` keys), then timed
with CUDA events after a warm-up. The timed calls rotate over copies of the inputs that together exceed
twice the L2 cache, so every call reads from device memory, not L2.

Reported per row: time, bytes, achieved GB/s, the share of the device's peak bandwidth (2 x memory clock x bus
width, read from the device attributes) and of a device-to-device copy measured in the same run (what this
memory system really sustains); and the numba / cupy time ratio.

    python bench/kernels_core.py [--quick] [--backends cupy,numba] [--iters N]

Exits with status 2 and a message when there is no CUDA GPU (or no cupy).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the one tolerance table

ULTRA_HEADS = (64, 2, 128)                                 # q heads, kv heads, head dim
ULTRA_MATMULS = [(5120, 2048), (2048, 5120), (8192, 8192)]  # (out, in): expert up, expert down, d x d
CONTEXTS = [1024, 4096, 16384, 32768]


def fail(message):
    print(f"bench/kernels_core.py: {message}", file=sys.stderr)
    sys.exit(2)


def need_gpu():
    """cupy and a CUDA device, or exit 2 with the reason."""
    try:
        import cupy
    except ImportError:
        fail("needs a CUDA GPU and cupy (pip install -e .[gpu-cuda12]); cupy is not installed")
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver: no GPU
        n_devices = 0
    if n_devices < 1:
        fail("needs a CUDA GPU; none is available here")
    return cupy


def device_info(cp):
    """(name, SM count, L2 bytes, peak GB/s or None): peak = 2 (DDR) x memory clock x bus width."""
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    attrs = dev.attributes
    clock_khz = attrs.get("MemoryClockRate") or props.get("memoryClockRate")
    bus_bits = attrs.get("GlobalMemoryBusWidth") or props.get("memoryBusWidth")
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name, attrs["MultiProcessorCount"], attrs["L2CacheSize"], peak


def time_us(cp, call, n_copies, iters):
    """Mean microseconds of call(i) over ``iters`` calls after a warm-up, inputs rotated over n_copies."""
    for i in range(max(3, n_copies)):
        call(i % n_copies)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for i in range(iters):
        call(i % n_copies)
    stop.record()
    stop.synchronize()
    return 1e3 * cp.cuda.get_elapsed_time(start, stop) / iters


def copies_for(nbytes, l2_bytes):
    """How many copies of an input set of ``nbytes`` exceed twice the L2 cache."""
    return max(2, -(-2 * l2_bytes // max(nbytes, 1)) + 1)


def d2d_copy_gbps(cp, l2_bytes, iters):
    """cudaMemcpyAsync device-to-device of max(1 GiB, 64 x L2): bytes read + written per second."""
    nbytes = max(1 << 30, 64 * l2_bytes)
    src, dst = cp.ones(nbytes, dtype=np.uint8), cp.empty(nbytes, dtype=np.uint8)
    us = time_us(cp, lambda i: dst.data.copy_from_device_async(src.data, nbytes), 1, iters)
    return 2 * nbytes / us / 1e3


def random_nvfp4(rng, out, inn):
    """A valid NVFP4 weight without quantizing: random E2M1 codes, E4M3 scales in [2^-3, 2^3], global 1e-2."""
    packed = rng.integers(0, 256, size=(out, inn // 2), dtype=np.uint8)
    block_scale = rng.integers(0x20, 0x50, size=(out, inn // 16), dtype=np.uint8)  # exponents 4..9: 2^-3..2^2
    return packed, block_scale, np.array(0.01, dtype=np.float32)


def bench_decode(cp, backends, s, info, iters):
    from tolerances import assert_close

    from nemo_scratch.ops import attention

    nq, nkv, dh = ULTRA_HEADS
    rng = np.random.default_rng(s)
    q = rng.uniform(-1, 1, (1, 1, nq, dh)).astype(np.float32)
    k, v = (rng.uniform(-1, 1, (1, s, nkv, dh)).astype(np.float32) for _ in range(2))
    ref = attention.gqa_decode(q, k, v)
    nbytes = k.nbytes + v.nbytes + 2 * q.nbytes
    n_copies = copies_for(nbytes, info[2])
    dq, dk, dv = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    pool = [(dq.copy(), dk.copy(), dv.copy()) for _ in range(n_copies)]
    rows = []
    for name, be in backends:
        assert_close(be.to_numpy(be.gqa_decode(dq, dk, dv)), ref, "kernel_attention", what=f"{name} gqa_decode")
        us = time_us(cp, lambda i: be.gqa_decode(*pool[i]), n_copies, iters)
        rows.append((f"gqa_decode s={s}", name, f"1x{nq}/{nkv}x{dh}", us, nbytes))
    return rows


def bench_nvfp4(cp, backends, m, out, inn, info, iters):
    from tolerances import assert_close

    from nemo_scratch.ops import quant

    rng = np.random.default_rng(out + inn + m)
    packed, block_scale, global_scale = random_nvfp4(rng, out, inn)
    x = rng.uniform(-1, 1, (m, inn)).astype(np.float32)
    ref = quant.nvfp4_matmul(x, packed, block_scale, global_scale)
    nbytes = packed.nbytes + block_scale.nbytes + x.nbytes + 4 * m * out
    n_copies = copies_for(nbytes, info[2])
    dx, dg = cp.asarray(x), cp.asarray(global_scale)
    pool = [(cp.asarray(packed), cp.asarray(block_scale)) for _ in range(n_copies)]
    rows = []
    for name, be in backends:
        got = be.to_numpy(be.nvfp4_matmul(dx, *pool[0], dg))
        assert_close(got, ref, "kernel_quant_matmul", what=f"{name} nvfp4_matmul")
        us = time_us(cp, lambda i: be.nvfp4_matmul(dx, *pool[i], dg), n_copies, iters)
        rows.append((f"nvfp4_matmul M={m}", name, f"{out}x{inn}", us, nbytes))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two contexts and one matmul shape")
    parser.add_argument("--backends", default="cupy,numba", help="comma-separated: cupy, numba")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per row")
    args = parser.parse_args(argv)
    cp = need_gpu()

    from nemo_scratch.backends import get_backend
    from nemo_scratch.errors import BackendError

    backends = []
    for name in args.backends.split(","):
        try:
            backends.append((name, get_backend(name)))
        except BackendError as exc:
            print(f"skipping backend {name}: {exc}")
    if not backends:
        fail("no GPU backend could be constructed")

    info = device_info(cp)
    name, n_sm, l2, peak = info
    copy = d2d_copy_gbps(cp, l2, max(5, args.iters // 5))
    print(f"device: {name}, {n_sm} SMs, L2 {l2 / 2**20:.0f} MiB")
    if peak:
        print(f"peak bandwidth {peak:.0f} GB/s (2 x memoryClockRate x memoryBusWidth); device-to-device copy "
              f"{copy:.0f} GB/s = {copy / peak:.0%} of peak")
    else:
        print(f"peak bandwidth unknown (no memory clock attribute); device-to-device copy {copy:.0f} GB/s")

    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    shapes = ULTRA_MATMULS[:1] if args.quick else ULTRA_MATMULS
    rows = []
    for s in contexts:
        rows += bench_decode(cp, backends, s, info, args.iters)
    for out, inn in shapes:
        for m in (1, 16):
            rows += bench_nvfp4(cp, backends, m, out, inn, info, args.iters)

    print(f"{'op':<22} {'backend':<8} {'shape':<14} {'time us':>9} {'MB':>8} {'GB/s':>7} {'%peak':>6} {'%copy':>6}")
    for op, backend, shape, us, nbytes in rows:
        gbps = nbytes / us / 1e3
        pct_peak = f"{gbps / peak:6.0%}" if peak else "     -"
        print(f"{op:<22} {backend:<8} {shape:<14} {us:9.1f} {nbytes / 1e6:8.1f} {gbps:7.0f} {pct_peak} "
              f"{gbps / copy:6.0%}")
    # numba / cupy time ratio for each op and shape measured by both
    times = {(op, shape, backend): us for op, backend, shape, us, _ in rows}
    pairs = [(op, shape) for op, backend, shape, _, _ in rows if backend == "cupy" and (op, shape, "numba") in times]
    if pairs:
        print("\nnumba / cupy time ratio (> 1: cupy faster)")
        for op, shape in pairs:
            print(f"  {op:<22} {shape:<14} {times[(op, shape, 'numba')] / times[(op, shape, 'cupy')]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
